"""How a refresh-token family moves when a token is presented (RFC 9700 §4.14), apart from any backend.

Every backend runs :func:`rotate` inside one atomic operation of its own, so they all decide alike.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from mcpguard.stores.base import GrantRecord, RotationOutcome

__all__ = ["Family", "MAX_GRACE", "REUSE", "check_grace", "rotate"]

MAX_GRACE = timedelta(seconds=60)
# The revocation reason a detected reuse records.
REUSE = "reuse"


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """A grant with its rotation state: the live token, the one it replaced, and when that happened."""

    grant: GrantRecord
    current_hash: str = field(repr=False)
    previous_hash: str | None = field(default=None, repr=False)
    rotated_at: datetime | None = None


def check_grace(grace: timedelta) -> None:
    """Refuse a grace window outside 0 (off) to 60 seconds with a ``ValueError``."""
    if not timedelta(0) <= grace <= MAX_GRACE:
        raise ValueError("the refresh grace window is between 0 (off) and 60 seconds")


def _outcome(family: Family, presented_hash: str, at: datetime, grace: timedelta) -> RotationOutcome:
    grant = family.grant
    if grant.revoked_at is not None:
        return RotationOutcome.REVOKED
    if at >= grant.expires_at:
        return RotationOutcome.EXPIRED
    if hmac.compare_digest(presented_hash, family.current_hash):
        return RotationOutcome.ROTATED
    if (
        grace > timedelta(0)
        and family.previous_hash is not None
        and family.rotated_at is not None
        and hmac.compare_digest(presented_hash, family.previous_hash)
        and at - family.rotated_at <= grace
    ):
        return RotationOutcome.GRACE_REISSUED
    return RotationOutcome.REUSE_REVOKED


def rotate(
    family: Family, presented_hash: str, new_hash: str, at: datetime, grace: timedelta
) -> tuple[RotationOutcome, Family]:
    """The outcome of presenting ``presented_hash``, a token ``family`` issued, and the family after it.

    Only ``ROTATED`` and ``GRACE_REISSUED`` make ``new_hash`` the live token, and each makes it the only
    one: the rotated token becomes the previous one, or the successor it had is dropped. A grace reissue
    neither moves the window nor counts as a rotation.
    """
    check_grace(grace)
    outcome = _outcome(family, presented_hash, at, grace)
    grant = family.grant
    if outcome is RotationOutcome.ROTATED:
        return outcome, Family(
            grant=replace(grant, generation=grant.generation + 1),
            current_hash=new_hash,
            previous_hash=presented_hash,
            rotated_at=at,
        )
    if outcome is RotationOutcome.GRACE_REISSUED:
        return outcome, replace(family, current_hash=new_hash)
    if outcome is RotationOutcome.REUSE_REVOKED:
        return outcome, replace(family, grant=replace(grant, revoked_at=at, revoked_reason=REUSE))
    return outcome, family
