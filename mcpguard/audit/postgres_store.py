"""The audit trail in PostgreSQL, shared by every replica, written with group commit and no timer.

Appends queue up; one writer task commits everything pending as soon as its previous commit ends, so
an idle guard pays one small commit per call and a busy one shares each commit among many calls. A
durable append returns once PostgreSQL has committed it. Queries and retention use a second connection,
so a reviewer never waits behind the writer. Connections are made on first use, in the event loop
that uses the store, and remade after a failure; every failure is ``StorageUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery
from mcpguard.audit.sql import COLUMNS, Dialect, calls_sql, delete_sql, insert_sql, page_of, row_of
from mcpguard.errors import StorageUnavailable

__all__ = ["PostgresAuditStore"]

logger = logging.getLogger("mcpguard.audit")

_T = TypeVar("_T")
_Connection = psycopg.AsyncConnection[tuple[Any, ...]]
_Cursor = psycopg.AsyncCursor[tuple[Any, ...]]
_Pending = tuple[tuple[Any, ...], "asyncio.Future[None] | None"]
# psycopg adapts an aware datetime to timestamptz, which keeps microseconds as SQLite's text does.
_DIALECT = Dialect(param="%s", time=lambda at: at)
# Ids sort by time only byte for byte; a locale's collation could order them otherwise.
_TYPES = {
    "id": 'text COLLATE "C" PRIMARY KEY',
    "at": "timestamptz NOT NULL",
    "phase": "text NOT NULL",
    "start_id": 'text COLLATE "C"',
    "status": "integer",
    "rpc_error": "bigint",
    "tool_error": "boolean",
    "duration_ms": "double precision",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
}
_COLUMN_TYPES = {c: _TYPES.get(c, "text") for c in COLUMNS}
_COLUMN_DEFINITIONS = ", ".join(f"{c} {kind}" for c, kind in _COLUMN_TYPES.items())
_TABLE = f"CREATE TABLE IF NOT EXISTS audit_events ({_COLUMN_DEFINITIONS})"
# The table's columns as statements name it (through the search path), to add those a table made before lacks:
# an ALTER TABLE run on every connection would take the table's exclusive lock each time.
_PRESENT_COLUMNS = (
    "SELECT attname FROM pg_attribute WHERE attrelid = 'audit_events'::regclass AND attnum > 0 AND NOT attisdropped"
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit_events (tenant, id)",
    "CREATE INDEX IF NOT EXISTS audit_by_start ON audit_events (start_id)",
    # Only reads of the trail name the tenant they read.
    "CREATE INDEX IF NOT EXISTS audit_by_read_tenant ON audit_events (read_tenant, id) WHERE read_tenant IS NOT NULL",
)
# Replicas starting together would race CREATE ... IF NOT EXISTS; this lock (any fixed number) serialises them.
_SCHEMA_LOCK = 0x6D63_7067_6175_6474
_INSERT = insert_sql(_DIALECT)
_COPY = f"COPY audit_events ({', '.join(COLUMNS)}) FROM STDIN"
_DELETE = delete_sql(_DIALECT)
_UNAVAILABLE = "audit store unavailable"
# A readiness probe answers well within a load balancer's own probe timeout.
_PING_TIMEOUT = 2.0
_FAILURES = (psycopg.Error, OSError, TimeoutError)
# What the server refuses in one entry (a repeated id, a number out of range) without anything being down.
# A value past a server limit (a tenant too long for its index) is refused as one entry too, not as an outage.
_REFUSED = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded)
# PostgreSQL text holds neither NUL nor a lone surrogate (a JSON escape such as \\ud800 in a client's method or
# tool name decodes to one, which UTF-8 cannot encode): either is kept visibly replaced.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


def _storable(value: Any) -> Any:
    return _UNSTORABLE.sub(_REPLACEMENT, value) if isinstance(value, str) else value


class PostgresAuditStore:
    """Append-only audit events in one PostgreSQL table; ``operation_timeout`` bounds each commit and query.

    A server that stops answering fails the operation after that bound (its connection dropped there and then),
    so the guard fails closed rather than waiting. An entry the server refuses, or psycopg cannot send, fails
    alone: never the other entries of its commit, nor the writer every later call needs.
    """

    def __init__(self, url: str, *, operation_timeout: float = 10.0, connect_timeout: int = 5) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            # Never the URL itself: it may hold a password.
            raise ValueError("not a PostgreSQL URL libpq can read") from None
        params.setdefault("connect_timeout", connect_timeout)
        self._conninfo = make_conninfo("", **params)
        self._timeout = operation_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._read_lock = asyncio.Lock()
        self._writer_task: asyncio.Task[None] | None = None
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._schema_ready = False
        self._failing = False
        self._closed = False
        # How many commits the writer has made: fewer than the appends shows them sharing commits.
        self.commits = 0

    @classmethod
    async def open(cls, url: str, *, operation_timeout: float = 10.0, connect_timeout: int = 5) -> PostgresAuditStore:
        """Connect now and create the schema, so a bad URL or an unreachable server shows at startup."""
        store = cls(url, operation_timeout=operation_timeout, connect_timeout=connect_timeout)
        try:
            await store._read(lambda cursor: cursor.execute("SELECT 1"))
        except StorageUnavailable:
            await store.close()
            raise
        return store

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._writer_task = loop.create_task(self._write(), name="mcpguard-audit")
        elif self._loop is not loop:
            raise RuntimeError("a PostgresAuditStore is used only from the event loop that first used it")

    async def _connect(self) -> _Connection:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        if self._schema_ready:
            return conn
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                await conn.execute(_TABLE)
                present = {row[0] for row in await (await conn.execute(_PRESENT_COLUMNS)).fetchall()}
                for column, kind in _COLUMN_TYPES.items():
                    if column not in present:
                        # A column added since the table was made: NULL in the rows it has.
                        await conn.execute(f"ALTER TABLE audit_events ADD COLUMN IF NOT EXISTS {column} {kind}")
                for statement in _INDEXES:
                    await conn.execute(statement)
        except BaseException:
            await _discard(conn)
            raise
        self._schema_ready = True
        return conn

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        """Queue ``event``; with ``durable``, return only once it is committed."""
        if self._closed or (self._writer_task is not None and self._writer_task.done()):
            raise StorageUnavailable(_UNAVAILABLE)
        self._bind()
        future = asyncio.get_running_loop().create_future() if durable else None
        self._pending.append((tuple(_storable(v) for v in row_of(event, _DIALECT)), future))
        self._wake.set()
        if future is not None:
            await future

    async def _write(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            try:
                await self._commit(batch)
            except BaseException as exc:
                # Cancelled with its loop, or a bug: nobody may be left waiting, nor told it was recorded.
                batch, self._pending = batch + self._pending, []
                for _, future in batch:
                    _settle(future, exc)
                raise

    async def _commit(self, batch: list[_Pending]) -> None:
        rows = [row for row, _ in batch]
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                if self._writer is None or self._writer.closed:
                    self._writer = await self._connect()
            await _within(deadline, self._writer, _insert(self._writer, rows))
        except _REFUSED as exc:
            refused: Exception = exc
        except _FAILURES as exc:
            await _discard(self._writer)
            self._writer = None
            # Durable callers learn it from their exception; the others' loss must not be silent, nor flood the log.
            if not self._failing:
                logger.warning("audit store unavailable (%s): entries are not being recorded", type(exc).__name__)
                self._failing = True
            for _, future in batch:
                _settle(future, exc)
            return
        except Exception as exc:
            # Neither an outage nor the server's refusal (a value psycopg cannot send, or a bug): it costs its own
            # entries, never the writer, which every later call needs. The connection is in an unknown state.
            await _discard(self._writer)
            self._writer = None
            refused = exc
        else:
            if self._failing:
                logger.warning("audit store available again")
                self._failing = False
            self.commits += 1
            for _, future in batch:
                _settle(future, None)
            return
        if len(batch) == 1:
            logger.warning("audit entry refused, not recorded (%s)", type(refused).__name__)
            _settle(batch[0][1], refused)
            return
        # One entry the server refuses must not cost every other call in its commit.
        for pending in batch:
            await self._commit([pending])

    async def _read(self, work: Callable[[_Cursor], Awaitable[_T]]) -> _T:
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        self._bind()
        async with self._read_lock:
            deadline = asyncio.get_running_loop().time() + self._timeout
            try:
                async with asyncio.timeout_at(deadline):
                    if self._reader is None or self._reader.closed:
                        self._reader = await self._connect()
                return await _within(deadline, self._reader, _on_cursor(self._reader, work))
            except _FAILURES as exc:
                await _discard(self._reader)
                self._reader = None
                raise StorageUnavailable(_UNAVAILABLE) from exc

    async def query(self, q: AuditQuery) -> AuditPage:
        """Calls matching ``q``, newest first: each start or local entry joined with its end, if any."""
        sql, args = calls_sql(q, _DIALECT)

        async def fetch(cursor: _Cursor) -> list[tuple[Any, ...]]:
            # A filter holding NUL matches the entry it was stored as, instead of failing the query.
            await cursor.execute(sql, [_storable(arg) for arg in args])
            return await cursor.fetchall()

        return page_of(await self._read(fetch), q)

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete every entry older than ``cutoff``; the number deleted."""

        async def delete(cursor: _Cursor) -> int:
            await cursor.execute(_DELETE, (cutoff.astimezone(UTC),))
            return cursor.rowcount

        return await self._read(delete)

    async def ping(self) -> None:
        """Readiness: PostgreSQL answers ``SELECT 1`` within a few seconds; else ``StorageUnavailable``.

        The probe uses a connection of its own, so it never waits behind a long query or a commit.
        """
        if self._closed or (self._writer_task is not None and self._writer_task.done()):
            raise StorageUnavailable(_UNAVAILABLE)
        try:
            async with asyncio.timeout(min(_PING_TIMEOUT, self._timeout)):
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                try:
                    await conn.execute("SELECT 1")
                finally:
                    await _discard(conn)
        except _FAILURES as exc:
            raise StorageUnavailable(_UNAVAILABLE) from exc

    async def close(self) -> None:
        """Commit what is queued, stop the writer and close both connections."""
        if self._closed:
            return
        self._closed = True
        if self._writer_task is not None and not self._writer_task.done():
            self._wake.set()
            await self._writer_task
        async with self._read_lock:
            await _discard(self._reader)
            self._reader = None
        await _discard(self._writer)
        self._writer = None


async def _insert(writer: _Connection, rows: list[tuple[Any, ...]]) -> None:
    if len(rows) == 1:
        # Autocommit: the insert is its own transaction, one round trip for an idle guard.
        await writer.execute(_INSERT, rows[0])
        return
    async with writer.transaction(), writer.cursor() as cursor, cursor.copy(_COPY) as copy:
        for row in rows:
            await copy.write_row(row)


async def _on_cursor(conn: _Connection, work: Callable[[_Cursor], Awaitable[_T]]) -> _T:
    async with conn.cursor() as cursor:
        return await work(cursor)


async def _within(deadline: float, conn: _Connection, work: Coroutine[Any, Any, _T]) -> _T:
    """``work`` on ``conn``, or ``TimeoutError`` at ``deadline`` (loop time) with ``conn`` closed there and then.

    Cancelled, psycopg would first ask the server to cancel the statement and then wait for it, five seconds
    each: for a server that accepts connections but has stopped answering, ten seconds more per call.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    except BaseException:
        task.cancel()
        raise
    if task not in done:
        conn.pgconn.finish()  # psycopg sees a broken connection, not a running statement, and cancels nothing
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled():
            task.exception()  # read, so it is not reported as never retrieved
        raise TimeoutError
    return task.result()


def _settle(future: asyncio.Future[None] | None, failure: BaseException | None) -> None:
    if future is None or future.done():  # not durable, or its caller stopped waiting
        return
    if failure is None:
        future.set_result(None)
    else:
        # One exception per waiter: a shared one would collect every waiter's traceback.
        error = StorageUnavailable(_UNAVAILABLE)
        error.__cause__ = failure
        future.set_exception(error)


async def _discard(conn: _Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()
