"""The audit stores' readiness probe: cheap when the store can take entries, ``StorageUnavailable`` when not,
and bounded in time when PostgreSQL stops answering."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mcpguard.audit import AuditStore, PostgresAuditStore, SQLiteAuditStore, open_audit_store
from mcpguard.errors import StorageUnavailable
from tests.audit.test_audit_store_conformance import pg_url, postgres_schema, require_postgres, start
from tests.conftest import free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each backend's URL, in a file or schema of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/audit.db"
        return
    with postgres_schema() as schema:
        yield pg_url(schema=schema)


def test_open_store_is_ready_before_and_after_entries(url: str) -> None:
    """A store just opened answers the probe (PostgreSQL before any table exists), and still does once in use."""

    async def body() -> None:
        store = open_audit_store(url)
        try:
            await store.ping()
            await store.append(start(), durable=True)
            await store.ping()
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.threat("T-STORE-FAIL")
def test_closed_store_is_not_ready(url: str) -> None:
    """After close the probe is StorageUnavailable, so a readiness check reports the store."""

    async def body() -> None:
        store = open_audit_store(url)
        await store.append(start(), durable=True)
        await store.close()
        with pytest.raises(StorageUnavailable):
            await store.ping()

    asyncio.run(body())


@pytest.mark.threat("T-STORE-FAIL")
def test_sqlite_file_without_its_table_is_not_ready(tmp_path: Path) -> None:
    """An SQLite trail whose table is gone fails the probe rather than the next call."""
    path = tmp_path / "audit.db"

    async def body() -> None:
        store: AuditStore = SQLiteAuditStore(str(path))
        try:
            await store.ping()
            with sqlite3.connect(path) as conn:
                conn.execute("DROP TABLE audit_events")
            conn.close()
            with pytest.raises(StorageUnavailable):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.threat("T-STORE-FAIL")
def test_unreachable_postgresql_is_not_ready_and_never_quoted() -> None:
    """Nothing listening at the URL's port fails the probe, and the failure never carries the password."""
    require_postgres()

    async def body() -> None:
        store = PostgresAuditStore(pg_url(free_port(), password="hunter2"))
        try:
            with pytest.raises(StorageUnavailable) as caught:
                await store.ping()
            assert "hunter2" not in str(caught.value)
            assert "hunter2" not in repr(caught.value)
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.threat("T-STORE-FAIL")
def test_postgresql_that_never_answers_fails_the_probe_within_a_bound() -> None:
    """A server that takes the connection but never speaks fails the probe in seconds, not the connect timeout."""
    require_postgres()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepted: the handshake completes and then nothing is ever said
        store = PostgresAuditStore(pg_url(listener.getsockname()[1]), connect_timeout=30)

        async def body() -> float:
            began = time.monotonic()
            try:
                with pytest.raises(StorageUnavailable):
                    await store.ping()
                return time.monotonic() - began
            finally:
                await store.close()

        assert asyncio.run(body()) < 5
