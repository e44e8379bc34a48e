"""The audit trail in SQLite (WAL), committed on the event loop, each durable entry at once, and no timer.

A durable append (a call's start) commits there and then, in one transaction with everything pending,
before it returns; entries nobody waits for (a call's end) join the pending batch and ride along with the
next such commit, or are committed within 50 ms. So a call pays about one small commit, waits for no
other call, and pays no thread hop or cross-thread wake-up. (Sharing a commit among the calls of a loop
pass saved at most about 12 microseconds a call, and held every call back for a pass or two of a busy loop,
milliseconds, away from its upstream.) A commit in WAL mode with ``synchronous=NORMAL`` writes the log
without syncing it (tens of microseconds) and survives the process being killed; syncing happens at
checkpoints, which copy the log into the database (milliseconds, longer on a busy disk). Those run on a
thread of their own, about every thousand pages: the bulk of the log is copied while commits go on, then
commits are held back while the few pages they added meanwhile are copied, so the log is wholly copied and
starts over short (holding commits for the whole copy stalled every new call for its length, 6 ms every
quarter of a second under load). The event loop never waits for a disk sync, and calls wait only for
their start's commit. With ``synchronous=FULL`` every commit syncs, so commits move to a worker
thread and appends arriving meanwhile share the next one. A call's start is awaited until committed,
before the call is forwarded; its end is queued without waiting. Only retention deletes rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery
from mcpguard.audit.sql import COLUMNS, Dialect, calls_sql, iso_time, page_of, row_of
from mcpguard.errors import StorageUnavailable
from mcpguard.stores.sqlite_tables import immediate

__all__ = ["SQLiteAuditStore"]

_T = TypeVar("_T")
logger = logging.getLogger("mcpguard.audit")
# Times are ISO 8601 text in UTC with microseconds, so comparing the text compares the times.
_DIALECT = Dialect(param="?", time=iso_time)
_COLUMN_DEFINITIONS = ", ".join(c + (" TEXT PRIMARY KEY" if c == "id" else "") for c in COLUMNS)
_TABLE = f"CREATE TABLE IF NOT EXISTS audit_events ({_COLUMN_DEFINITIONS})"
# Only ends are indexed by their start (a start has none), so a start's row touches one index fewer; likewise only
# reads of the trail are indexed by the tenant they read. A table WITHOUT ROWID would append in id order, but
# SQLite advises it only for rows far smaller than these. Files made before keep their index of every entry, and
# read the same.
_INDEXES = """
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit_events (tenant, id);
CREATE INDEX IF NOT EXISTS audit_by_start ON audit_events (start_id) WHERE start_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_by_read_tenant ON audit_events (read_tenant, id) WHERE read_tenant IS NOT NULL;
"""
# The statement inserting a row's present columns, by which columns those are.
_INSERTS: dict[tuple[bool, ...], str] = {}
_NULLS = (None,) * len(COLUMNS)
_TOOL_ERROR = COLUMNS.index("tool_error")
# Retention deletes in slices, so a large backlog never holds the write lock (or the loop) for long.
_DELETE_SLICE = 1000
_DELETE = f"DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE at < ? LIMIT {_DELETE_SLICE})"  # noqa: S608 - fixed text, bound value
# How long an entry nobody waits for (a call's end) may wait for a commit to ride along with.
_LAZY_SECONDS = 0.05
# The log file is cut back to this after a checkpoint, so a burst does not leave a large file behind.
_JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024
# A checkpoint is due after this many commits or rows, whichever comes first: about SQLite's own interval of
# a thousand pages (a small commit writes four or five, a row of a large batch about a quarter of one).
_CHECKPOINT_COMMITS = 250
_CHECKPOINT_ROWS = 4000
_IN_MEMORY = ":memory:"
_UNAVAILABLE = "audit store unavailable"
_ERRORS = (sqlite3.Error, ValueError, OverflowError)

_Pending = tuple[tuple[Any, ...], "asyncio.Future[None] | None"]


def _unavailable(cause: BaseException) -> StorageUnavailable:
    failure = StorageUnavailable(_UNAVAILABLE)
    failure.__cause__ = cause
    return failure


def _insert(row: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """The statement and values appending ``row``: its non-NULL columns only, a flag bound as the integer it is.

    The sqlite3 module looks for an adapter for every bound value that is not exactly an int, float or str,
    and each look-up raises and clears an AttributeError: binding a call's twenty-odd mostly empty columns
    cost more than inserting them. Columns left out are NULL, as bound ones were.
    """
    if (flag := row[_TOOL_ERROR]) is not None:
        row = (*row[:_TOOL_ERROR], int(flag), *row[_TOOL_ERROR + 1 :])
    present = tuple(map(operator.is_not, row, _NULLS))
    sql = _INSERTS.get(present)
    if sql is None:
        names = ", ".join(itertools.compress(COLUMNS, present))
        marks = ", ".join("?" for _ in itertools.compress(COLUMNS, present))
        sql = _INSERTS[present] = f"INSERT INTO audit_events ({names}) VALUES ({marks})"  # noqa: S608 - column names only
    return sql, tuple(itertools.compress(row, present))


def _open(path: str, synchronous: str, *, autocheckpoint: bool = True) -> sqlite3.Connection:
    if path != _IN_MEMORY and not os.path.exists(path):
        # Owner-only from the first byte; SQLite gives its -wal and -shm files the same mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        # A checkpoint must be able to catch up with the log, or the log never starts over and every read and
        # commit slows as it grows: SQLite's own (by the committing connection) always does, and so does the
        # store's, which holds commits back while it runs.
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        if not autocheckpoint:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        # Another process (the CLI adding a key to a shared state file) holds the lock for milliseconds.
        conn.execute("PRAGMA busy_timeout = 2000")
        conn.execute(_TABLE)
        _add_missing_columns(conn)
        conn.executescript(_INDEXES)
    except BaseException:
        conn.close()
        raise
    return conn


def _missing_columns(conn: sqlite3.Connection) -> list[str]:
    present = {row[1] for row in conn.execute("PRAGMA table_info(audit_events)")}
    return [column for column in COLUMNS if column not in present]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A file made before a column was added gets it, NULL in the rows it has (added once, under the write lock,
    when two processes open the file at once)."""
    if not _missing_columns(conn):
        return
    with immediate(conn):
        for column in _missing_columns(conn):
            conn.execute(f"ALTER TABLE audit_events ADD COLUMN {column}")


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(_unavailable(error))


class SQLiteAuditStore:
    """Append-only audit events in one SQLite file; ``synchronous`` NORMAL survives a killed process."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous is NORMAL (survives a killed process) or FULL (survives power loss)")
        self.url = f"sqlite:///{path}"
        self._path = path
        self._inline = synchronous == "NORMAL"
        # Inline commits leave checkpoints (the disk syncs) to a thread; FULL-mode commits already run on one.
        self._checkpoints = self._inline and path != _IN_MEMORY
        try:
            self._conn = _open(path, synchronous, autocheckpoint=not self._checkpoints)
        except (sqlite3.Error, OSError) as exc:
            raise StorageUnavailable(_UNAVAILABLE) from exc
        # One thread for what must not run on the loop: reads, and FULL-mode writes, in order.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcpguard-audit")
        self._reader: sqlite3.Connection | None = None
        self._pending: list[_Pending] = []
        # Appends and commits come from the loop; a query from another thread may commit what is pending.
        self._lock = threading.Lock()
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._lazy: asyncio.TimerHandle | None = None
        self._lazy_loop: asyncio.AbstractEventLoop | None = None
        self._committing = False
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcpguard-audit-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpointing: Future[None] | None = None
        # None, or how far the checkpoint under way has got: copying the bulk, or the rest with commits held.
        self._checkpoint_phase: Literal["bulk", "final"] | None = None
        self._unchecked_commits = 0
        self._unchecked_rows = 0
        self._closed = False
        # How many commits have been made: fewer than the appends shows them sharing commits.
        self.commits = 0

    def _commit(self, rows: list[tuple[Any, ...]]) -> BaseException | None:
        try:
            self._conn.execute("BEGIN")
            # Runs of rows with the same columns (a batch of ends) share one prepared statement.
            for sql, run in itertools.groupby(map(_insert, rows), key=operator.itemgetter(0)):
                self._conn.executemany(sql, (values for _, values in run))
            self._conn.execute("COMMIT")
        except _ERRORS as exc:  # a bad row must not wedge the store: the batch fails, the next may not
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            return exc
        self.commits += 1
        return None

    def _commit_all(self, rows: list[tuple[Any, ...]]) -> list[BaseException | None]:
        """Commit ``rows`` in one transaction; when one of them is what failed (not the store), each alone, so that
        only that entry fails and never the calls committed with it: an error, or ``None``, per row."""
        error = self._commit(rows)
        if error is None or len(rows) == 1 or isinstance(error, sqlite3.OperationalError):
            return [error] * len(rows)
        return [self._commit([row]) for row in rows]

    def _schedule(self, loop: asyncio.AbstractEventLoop, *, urgent: bool) -> None:
        # A flush scheduled on a loop that has since stopped never ran: schedule it where we are now.
        if self._committing or self._flush_loop is loop:
            return  # the commit under way, or the flush already due, takes this entry along
        if urgent:
            self._flush_loop = loop
            loop.call_soon(self._flush)
        elif self._lazy is None or self._lazy_loop is not loop:
            self._lazy, self._lazy_loop = loop.call_later(_LAZY_SECONDS, self._lazy_flush), loop

    def _lazy_flush(self) -> None:
        # Left running when an urgent flush takes its entries along: at most one timer per interval, not per call.
        self._lazy = None
        self._flush()

    def _flush(self) -> None:
        self._flush_loop = None
        with self._lock:
            if self._committing or not self._pending:
                return
            batch, self._pending = self._pending, []
            rows = [row for row, _ in batch]
            if self._inline:
                errors = self._commit_all(rows)
        if self._inline:
            self._settle(batch, errors)
            if self._checkpoints and None in errors:
                self._unchecked_commits += 1
                self._unchecked_rows += len(rows)
                due = self._unchecked_commits >= _CHECKPOINT_COMMITS or self._unchecked_rows >= _CHECKPOINT_ROWS
                if self._checkpoint_phase == "bulk":
                    self._finish_checkpoint(asyncio.get_running_loop())
                elif due and self._checkpoint_phase is None:
                    self._start_checkpoint(asyncio.get_running_loop())
            return
        self._committing = True
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._worker, self._commit_all, rows)

        def committed(outcome: asyncio.Future[list[BaseException | None]]) -> None:
            self._committing = False
            failure = outcome.exception()
            self._settle(batch, [failure] * len(batch) if failure is not None else outcome.result())
            if self._pending:
                self._schedule(loop, urgent=any(future is not None for _, future in self._pending))

        done.add_done_callback(committed)

    def _start_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        # The bulk of the log is copied while commits go on; then commits wait (entries queue up, the loop runs
        # on) while the few pages they added meanwhile are copied too: only a wholly copied log starts over, and
        # a start waits for that short copy, not for the whole one.
        self._checkpoint_phase = "bulk"
        self._unchecked_commits = self._unchecked_rows = 0
        self._checkpointing = self._checkpointer.submit(self._checkpoint)

        def bulk_copied(_: Future[None]) -> None:
            # Also noticed by the next commit, for a loop too busy to run this soon.
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: close() ends the checkpoint
                loop.call_soon_threadsafe(self._finish_checkpoint, loop)

        self._checkpointing.add_done_callback(bulk_copied)

    def _finish_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """Once the bulk is copied: hold commits back and copy the rest (on the loop, once per checkpoint)."""
        if self._checkpoint_phase != "bulk" or self._checkpointing is None or not self._checkpointing.done():
            return
        if self._closed:
            self._checkpoint_phase = None
            return
        self._checkpoint_phase = "final"
        with self._lock:
            self._committing = True
        self._checkpointing = self._checkpointer.submit(self._checkpoint)

        def finished(_: Future[None]) -> None:
            with self._lock:
                self._committing = False
                self._checkpoint_phase = None
                waiting = bool(self._pending)
                urgent = any(future is not None for _, future in self._pending)
            if waiting and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile: the next append flushes
                    loop.call_soon_threadsafe(lambda: self._schedule(loop, urgent=urgent))

        self._checkpointing.add_done_callback(finished)

    def _checkpoint(self) -> None:
        """Copy the log into the database (on the checkpoint thread, with its own connection)."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self._path, isolation_level=None)
                self._checkpoint_conn.execute("PRAGMA busy_timeout = 2000")
            # PASSIVE never waits for a reader; a reader's snapshot only defers the log's restart to a later one.
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, OSError):  # the log only grows until the next checkpoint; commits go on
            logger.warning("audit log checkpoint failed", exc_info=True)

    @staticmethod
    def _settle(batch: list[_Pending], errors: list[BaseException | None]) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for (_, future), error in zip(batch, errors, strict=True):
            if future is None:
                continue
            loop = future.get_loop()
            if loop is running:
                _resolve(future, error)
            elif not loop.is_closed():
                # A query in another thread committed this entry: its waiter is told on its own loop.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future, error)

    def _read_connection(self) -> sqlite3.Connection:
        # Only ever used on the worker thread; a WAL reader never waits for the writer.
        if self._reader is None:
            self._reader = sqlite3.connect(f"file:{quote(self._path)}", uri=True, isolation_level=None)
            self._reader.execute("PRAGMA busy_timeout = 2000")
        return self._reader

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        """Queue ``event``; with ``durable``, return only once it is committed."""
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] | None = loop.create_future() if durable else None
        row = row_of(event, _DIALECT)
        with self._lock:
            self._pending.append((row, future))
        if durable and self._inline:
            # Committed here and now, with what is pending: a group commit would keep the call (and every call
            # behind it) from its upstream for a pass or two of a busy loop, milliseconds, to save microseconds.
            self._flush()
        else:
            self._schedule(loop, urgent=durable)
        if future is not None:
            await future  # at once, unless a checkpoint holds commits back

    async def _read(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        # What was appended before a read is visible to it (committed after a checkpoint under way, if one is).
        if self._checkpointing is not None and not self._checkpointing.done():
            await asyncio.wrap_future(self._checkpointing)
        self._flush()
        try:
            if self._path == _IN_MEMORY:
                return work(self._conn)  # a private in-memory database has no second connection
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._worker, lambda: work(self._read_connection()))
        except _ERRORS as exc:
            raise _unavailable(exc) from None

    async def _write(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StorageUnavailable(_UNAVAILABLE)
        try:
            if self._inline:
                return work(self._conn)
            return await asyncio.get_running_loop().run_in_executor(self._worker, work, self._conn)
        except _ERRORS as exc:
            raise _unavailable(exc) from None

    async def query(self, q: AuditQuery) -> AuditPage:
        """Calls matching ``q``, newest first: each start or local entry joined with its end, if any."""
        sql, args = calls_sql(q, _DIALECT)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return page_of(rows, q)

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete every entry older than ``cutoff``; the number deleted."""
        stamp = iso_time(cutoff)
        deleted = 0
        while True:
            count = await self._write(lambda conn: conn.execute(_DELETE, (stamp,)).rowcount)
            deleted += count
            if count < _DELETE_SLICE:
                return deleted
            await asyncio.sleep(0)  # let the traffic's commits in between slices

    async def ping(self) -> None:
        """Readiness: the store is open and its writing connection can read the trail's table."""
        # On the connection appends use, so a closed store or a file that lost its table both show here.
        await self._write(lambda conn: conn.execute("SELECT 1 FROM audit_events LIMIT 0").fetchall())

    async def close(self) -> None:
        """Commit what is queued and release the file."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._checkpointing is not None:
            await asyncio.wrap_future(self._checkpointing)
        if self._checkpoint_conn is not None:
            await loop.run_in_executor(self._checkpointer, self._checkpoint_conn.close)
        self._checkpointer.shutdown(wait=True)
        # The worker runs jobs in order, so this commit follows one still in flight.
        batch, self._pending = self._pending, []
        if batch:
            errors = await loop.run_in_executor(self._worker, self._commit_all, [row for row, _ in batch])
            self._settle(batch, errors)

        def release() -> None:
            if self._reader is not None:
                self._reader.close()
            with contextlib.suppress(sqlite3.Error):
                if self._path != _IN_MEMORY:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()

        await loop.run_in_executor(self._worker, release)
        self._worker.shutdown(wait=True)
