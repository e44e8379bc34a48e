"""Fixtures the OAuth tests share: the guarded server over each store backend, and a settable clock with
signing keys that follow it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mcpguard.oauth import SigningKeys
from tests.oauth.flow_helpers import Deployment, deploy


class Clock:
    """A settable clock that starts at the real present, since the verifier checks `exp` against real time."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture(params=["memory", "sqlite"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The guarded notes server with the built-in authorization server, over each store backend."""
    with deploy(request.param, tmp_path) as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    """A clock the test moves by hand."""
    return Clock()


@pytest.fixture
def keys(tmp_path: Path, clock: Clock) -> SigningKeys:
    """A signing key set in the test's own directory, on ``clock``."""
    return SigningKeys.load_or_create(tmp_path / "keys", clock=clock)
