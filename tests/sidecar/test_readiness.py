"""``/readyz`` checks the audit store as well: 200 while it can take entries, 503 naming it when it cannot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from mcpguard import AuditStore, GuardConfig, open_audit_store, open_store
from sidecar.app import build_sidecar
from sidecar.proxy import ProxySettings
from tests.audit.test_audit_store_conformance import pg_url, postgres_schema, require_postgres
from tests.conftest import cheap_keyring, free_port, serve
from tests.test_guard import RecordingApp


@contextmanager
def sidecar_with(audit: AuditStore) -> Iterator[str]:
    """A sidecar in front of a live upstream, keeping its trail in ``audit``; yields its URL."""
    store = open_store("memory://")
    with serve(RecordingApp()) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", read_timeout=5),
            store=store,
            keys=cheap_keyring(store),
            audit=audit,
        )
        with serve(app, port) as url:
            yield url


def test_ready_with_a_working_sqlite_trail(tmp_path: Path) -> None:
    """With the state store, the upstream and the SQLite trail all working, /readyz is 200 with no problems."""
    with sidecar_with(open_audit_store(f"sqlite:///{tmp_path}/audit.db")) as url:
        ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "problems": []}


@pytest.mark.threat("T-STORE-FAIL")
def test_closed_sqlite_trail_makes_the_sidecar_unready(tmp_path: Path) -> None:
    """Once the trail can no longer take entries, /readyz is 503 and names the audit store, and only it."""
    audit = open_audit_store(f"sqlite:///{tmp_path}/audit.db")
    with sidecar_with(audit) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        asyncio.run(audit.close())
        ready = httpx.get(url + "/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unready", "problems": ["audit store unavailable"]}


@pytest.mark.threat("T-STORE-FAIL")
def test_unreachable_postgresql_trail_is_named_without_its_url() -> None:
    """A PostgreSQL trail with nothing listening makes /readyz 503 promptly, never quoting its URL or password."""
    require_postgres()
    port = free_port()
    with sidecar_with(open_audit_store(pg_url(port, password="hunter2"))) as url:
        ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["problems"] == ["audit store unavailable"]
    assert "hunter2" not in ready.text
    assert str(port) not in ready.text


def test_ready_with_a_working_postgresql_trail() -> None:
    """With a reachable PostgreSQL trail, /readyz is 200."""
    with postgres_schema() as schema, sidecar_with(open_audit_store(pg_url(schema=schema))) as url:
        ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["problems"] == []
