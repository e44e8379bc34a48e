"""A store in one SQLite file (WAL), for a single host: the connections and threads, and the key table.

Writes and scans run on one dedicated thread, so the event loop never waits on SQLite's write lock.
The hot-path reads (one key or one grant by id, on every request) run where they are asked, on a
read-only connection of that thread's own: in WAL mode a reader never waits for a writer, and a thread
hop would cost more than the read. Any SQLite or file-system failure becomes ``StorageUnavailable``.
The authorization server's tables live in their own modules, as mixins of :class:`SQLiteStore`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

from mcpguard.errors import StorageUnavailable
from mcpguard.stores.base import KeyRecord
from mcpguard.stores.sqlite_grants import GRANT_SCHEMA, GrantTables
from mcpguard.stores.sqlite_oauth import OAUTH_SCHEMA, OAuthTables
from mcpguard.stores.sqlite_tables import from_timestamp, timestamp

__all__ = ["SQLiteStore"]

_T = TypeVar("_T")

_SCHEME = "sqlite:///"
_IN_MEMORY = ":memory:"
# The description reaches clients in a 503: it names no path and carries no SQLite detail (the cause does).
_UNAVAILABLE = "storage unavailable"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mcp_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT,
    scopes TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);
CREATE INDEX IF NOT EXISTS mcp_keys_by_tenant ON mcp_keys (tenant, created_at);
"""
_COLUMNS = "key_id, tenant, name, scopes, secret_hash, created_at, expires_at, revoked_at"
# Built from the constant column list only; every value is a bound parameter.
_INSERT = f"INSERT INTO mcp_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (see above)
_SELECT_ONE = f"SELECT {_COLUMNS} FROM mcp_keys WHERE key_id = ?"  # noqa: S608 (see above)
_SELECT_TENANT = f"SELECT {_COLUMNS} FROM mcp_keys WHERE tenant = ? ORDER BY created_at, rowid"  # noqa: S608 (see above)
# COALESCE keeps the first revocation time; RETURNING gives the row as it is after the update.
_REVOKE = f"UPDATE mcp_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ? RETURNING {_COLUMNS}"  # noqa: S608 (see above)


def _row(record: KeyRecord) -> tuple[str | None, ...]:
    return (
        record.key_id,
        record.tenant,
        record.name,
        " ".join(record.scopes),
        record.secret_hash,
        timestamp(record.created_at),
        timestamp(record.expires_at),
        timestamp(record.revoked_at),
    )


def _record(row: Any) -> KeyRecord:
    key_id, tenant, name, scopes, secret_hash, created_at, expires_at, revoked_at = row
    return KeyRecord(
        key_id=key_id,
        tenant=tenant,
        name=name,
        scopes=tuple(scopes.split()),
        secret_hash=secret_hash,
        created_at=from_timestamp(created_at),
        expires_at=from_timestamp(expires_at),
        revoked_at=from_timestamp(revoked_at),
    )


def _create_private(path: str) -> None:
    # Created here rather than by SQLite so that it is owner-only from the first byte; SQLite gives the
    # -wal and -shm files the same mode as the database.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _connect(path: str) -> sqlite3.Connection:
    if path != _IN_MEMORY:
        _create_private(path)
    # Autocommit: every operation is a single statement, hence its own transaction.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Wait for another process's write lock rather than fail at once; only this thread ever waits.
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA + OAUTH_SCHEMA + GRANT_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStore(OAuthTables, GrantTables):
    """Every record in one SQLite file; the schema is created when the store is opened."""

    def __init__(self, path: str) -> None:
        self.url = _SCHEME + path
        self._path = path
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcpguard-sqlite")
        try:
            # Opening blocks its caller, once at start-up, so that a bad path fails there and not later.
            self._conn = self._executor.submit(_connect, path).result()
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            raise StorageUnavailable(_UNAVAILABLE) from exc

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """Open ``sqlite:///<path>``: everything after the third slash is the path (``:memory:`` allowed)."""
        if not url.startswith(_SCHEME) or len(url) == len(_SCHEME):
            raise ValueError(f"an SQLite store URL is {_SCHEME}<path> ({_SCHEME}/<path> when absolute)")
        return cls(url.removeprefix(_SCHEME))

    async def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, operation, self._conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(_UNAVAILABLE) from exc

    async def add_key(self, record: KeyRecord) -> None:
        """Insert a new key record; an existing ``key_id`` is a ``ValueError``."""

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(_INSERT, _row(record))
            except sqlite3.IntegrityError as exc:
                if exc.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
                    raise ValueError(f"key id {record.key_id!r} already exists") from None
                raise

        await self._run(insert)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{quote(self._path)}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            # A WAL reader waits only while the WAL index is being rebuilt: briefly, if ever.
            conn.execute("PRAGMA busy_timeout = 200")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._path == _IN_MEMORY:
            return await self._run(operation)  # a private in-memory database has only the worker's connection
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        try:
            return operation(self._reader())
        except sqlite3.Error as exc:
            raise StorageUnavailable(_UNAVAILABLE) from exc

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The record for ``key_id`` (revoked or not), or ``None``."""
        rows = await self._read(lambda conn: conn.execute(_SELECT_ONE, (key_id,)).fetchall())
        return _record(rows[0]) if rows else None

    async def list_keys(self, tenant: str) -> list[KeyRecord]:
        """Every key record of ``tenant``, oldest first."""

        def select(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(_SELECT_TENANT, (tenant,)).fetchall()

        return [_record(row) for row in await self._run(select)]

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        """Mark the key revoked at ``at`` (kept if already revoked); the record after, or ``None``."""

        def update(conn: sqlite3.Connection) -> list[Any]:
            # fetchall() runs the statement to its end, which is what commits it.
            return conn.execute(_REVOKE, (timestamp(at), key_id)).fetchall()

        rows = await self._run(update)
        return _record(rows[0]) if rows else None

    async def close(self) -> None:
        """Close the connection and stop the thread; later calls raise ``StorageUnavailable``."""
        if self._closed:
            return
        self._closed = True
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            # Each reader is used only by its own thread; closing from here is safe once no call can reach it.
            reader.close()
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=False)
