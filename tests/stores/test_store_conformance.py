"""One conformance suite that every store backend runs, then what only SQLite promises."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mcpguard.errors import StorageUnavailable
from mcpguard.stores import Store, open_store
from mcpguard.stores.base import KeyRecord

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def key(key_id: str, tenant: str = "acme", *, minutes: int = 0, **fields: Any) -> KeyRecord:
    """A key record created ``minutes`` after T0, with any other field set by keyword."""
    record = KeyRecord(
        key_id=key_id,
        tenant=tenant,
        name=None,
        scopes=("mcp:read", "mcp:write"),
        secret_hash=f"$argon2id$v=19$m=8,t=1,p=1$hash-of-{key_id}",
        created_at=T0 + timedelta(minutes=minutes),
    )
    return replace(record, **fields)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each backend, opened from its URL."""
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/s.db"
    opened = open_store(url)
    yield opened
    asyncio.run(opened.close())


class TestKeyStoreConformance:
    """What every ``KeyStore`` backend guarantees."""

    def test_add_then_get_returns_the_same_record(self, store: Store) -> None:
        """A stored record comes back field for field, timestamps and optional fields included."""
        record = key("k1", name="ci bot", scopes=("mcp:admin",), expires_at=T0 + timedelta(days=90))
        asyncio.run(store.add_key(record))
        assert asyncio.run(store.get_key("k1")) == record

    def test_get_unknown_is_none(self, store: Store) -> None:
        """An id never added is ``None``, not an error."""
        assert asyncio.run(store.get_key("missing")) is None

    def test_duplicate_add_is_value_error(self, store: Store) -> None:
        """A second record with the same key id is a ValueError, and the first one stays."""
        first = key("k1")
        asyncio.run(store.add_key(first))
        with pytest.raises(ValueError, match="already exists"):
            asyncio.run(store.add_key(key("k1", tenant="other")))
        assert asyncio.run(store.get_key("k1")) == first

    def test_list_is_oldest_first(self, store: Store) -> None:
        """A tenant's keys are listed by creation time, whatever the insertion order."""
        for key_id, minutes in (("k2", 2), ("k1", 1), ("k3", 3)):
            asyncio.run(store.add_key(key(key_id, minutes=minutes)))
        assert [r.key_id for r in asyncio.run(store.list_keys("acme"))] == ["k1", "k2", "k3"]

    def test_list_is_tenant_scoped(self, store: Store) -> None:
        """A tenant's listing never holds another tenant's keys, even with a prefix-like name."""
        asyncio.run(store.add_key(key("a1", "tenant-a")))
        asyncio.run(store.add_key(key("b1", "tenant-b")))
        asyncio.run(store.add_key(key("b2", "tenant-a-b")))
        assert [r.key_id for r in asyncio.run(store.list_keys("tenant-a"))] == ["a1"]
        assert [r.key_id for r in asyncio.run(store.list_keys("tenant-b"))] == ["b1"]
        assert asyncio.run(store.list_keys("nobody")) == []

    def test_revoke_marks_the_record(self, store: Store) -> None:
        """Revoking returns the record with its revocation time, and get sees it too."""
        asyncio.run(store.add_key(key("k1")))
        at = T0 + timedelta(hours=1)
        revoked = asyncio.run(store.revoke_key("k1", at))
        assert revoked is not None
        assert revoked.revoked_at == at
        assert asyncio.run(store.get_key("k1")) == revoked

    def test_revoke_twice_keeps_the_first_time(self, store: Store) -> None:
        """A second revocation leaves the first revocation time in place."""
        asyncio.run(store.add_key(key("k1")))
        first = T0 + timedelta(hours=1)
        asyncio.run(store.revoke_key("k1", first))
        again = asyncio.run(store.revoke_key("k1", first + timedelta(hours=1)))
        assert again is not None
        assert again.revoked_at == first

    def test_revoke_unknown_is_none(self, store: Store) -> None:
        """Revoking an id never added returns ``None`` and adds nothing."""
        assert asyncio.run(store.revoke_key("missing", T0)) is None
        assert asyncio.run(store.get_key("missing")) is None

    def test_revoke_touches_only_that_key(self, store: Store) -> None:
        """Other keys of the same tenant stay unrevoked."""
        asyncio.run(store.add_key(key("k1")))
        asyncio.run(store.add_key(key("k2", minutes=1)))
        asyncio.run(store.revoke_key("k1", T0))
        other = asyncio.run(store.get_key("k2"))
        assert other is not None
        assert other.revoked_at is None


class TestOpenStore:
    """Choosing a backend from a URL."""

    def test_url_names_the_backend(self, tmp_path: Path) -> None:
        """Each supported scheme opens its backend and keeps the URL it was opened from."""
        for url in ("memory://", f"sqlite:///{tmp_path}/a.db", "sqlite:///:memory:"):
            store = open_store(url)
            assert store.url == url
            asyncio.run(store.close())

    def test_unknown_scheme_is_value_error_without_the_rest_of_the_url(self) -> None:
        """An unsupported scheme is named with the supported ones, and a password in the URL is not echoed."""
        with pytest.raises(ValueError, match="unsupported store URL scheme 'ftp'") as caught:
            open_store("ftp://admin:hunter2@example.com/db")
        assert "hunter2" not in str(caught.value)
        assert "memory://" in str(caught.value)

    @pytest.mark.parametrize(
        "url", ["", "/var/lib/mcpguard.db", "hunter2", "memory://extra", "sqlite://", "sqlite:///"]
    )
    def test_malformed_url_is_value_error(self, url: str) -> None:
        """A plain path, an empty string or a backend URL of the wrong shape is a ValueError."""
        with pytest.raises(ValueError, match="URL") as caught:
            open_store(url)
        assert "hunter2" not in str(caught.value)


class TestSQLite:
    """What only the SQLite backend promises: a private file that persists, and failures that fail closed."""

    def test_records_persist_across_reopen(self, tmp_path: Path) -> None:
        """A record written and revoked before closing is read back after reopening the file."""
        url = f"sqlite:///{tmp_path}/s.db"
        store = open_store(url)
        asyncio.run(store.add_key(key("k1", name="bot")))
        revoked = asyncio.run(store.revoke_key("k1", T0 + timedelta(hours=1)))
        asyncio.run(store.close())
        reopened = open_store(url)
        try:
            assert asyncio.run(reopened.get_key("k1")) == revoked
            assert asyncio.run(reopened.list_keys("acme")) == [revoked]
        finally:
            asyncio.run(reopened.close())

    @pytest.mark.threat("T-KEY-LEAK")
    def test_new_file_is_owner_only(self, tmp_path: Path) -> None:
        """A database file the store creates, and its WAL file, are readable by their owner alone."""
        path = tmp_path / "s.db"
        store = open_store(f"sqlite:///{path}")
        try:
            asyncio.run(store.add_key(key("k1")))
            for created in (path, tmp_path / "s.db-wal"):
                assert stat.S_IMODE(created.stat().st_mode) & 0o077 == 0, created.name
        finally:
            asyncio.run(store.close())

    def test_wal_and_schema_on_open(self, tmp_path: Path) -> None:
        """Opening switches the file to WAL and creates the keys table with its tenant index."""
        path = tmp_path / "s.db"
        asyncio.run(open_store(f"sqlite:///{path}").close())
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            indexes = {row[1] for row in conn.execute("PRAGMA index_list(mcp_keys)")}
        conn.close()
        assert "mcp_keys_by_tenant" in indexes

    @pytest.mark.threat("T-STORE-FAIL")
    def test_missing_directory_refused_as_unavailable(self, tmp_path: Path) -> None:
        """A path in a directory that does not exist fails at open, as StorageUnavailable without the path."""
        with pytest.raises(StorageUnavailable) as caught:
            open_store(f"sqlite:///{tmp_path}/no/such/dir/s.db")
        assert str(tmp_path) not in str(caught.value)
        assert caught.value.status == 503

    @pytest.mark.threat("T-STORE-FAIL")
    def test_not_a_database_refused_as_unavailable(self, tmp_path: Path) -> None:
        """A file that is not an SQLite database fails at open as StorageUnavailable."""
        path = tmp_path / "s.db"
        path.write_bytes(b"this is not a database, just some text long enough to have a header" * 20)
        with pytest.raises(StorageUnavailable):
            open_store(f"sqlite:///{path}")

    @pytest.mark.threat("T-STORE-FAIL")
    def test_corrupted_while_open_refused_as_unavailable(self, tmp_path: Path) -> None:
        """A table dropped behind the store's back makes every operation StorageUnavailable, not a crash."""
        path = tmp_path / "s.db"
        store = open_store(f"sqlite:///{path}")
        try:
            with sqlite3.connect(path) as conn:
                conn.execute("DROP TABLE mcp_keys")
            conn.close()
            with pytest.raises(StorageUnavailable):
                asyncio.run(store.get_key("k1"))
            with pytest.raises(StorageUnavailable):
                asyncio.run(store.add_key(key("k1")))
            with pytest.raises(StorageUnavailable):
                asyncio.run(store.revoke_key("k1", T0))
        finally:
            asyncio.run(store.close())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_closed_store_refused_as_unavailable(self, tmp_path: Path) -> None:
        """After close, every operation is StorageUnavailable."""
        store = open_store(f"sqlite:///{tmp_path}/s.db")
        asyncio.run(store.close())
        with pytest.raises(StorageUnavailable):
            asyncio.run(store.get_key("k1"))
        with pytest.raises(StorageUnavailable):
            asyncio.run(store.list_keys("acme"))
