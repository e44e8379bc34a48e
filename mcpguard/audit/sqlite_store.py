"""The audit trail in SQLite (WAL), written by one thread with group commit and no timer.

Appends queue up; the writer thread commits everything pending as soon as its previous commit ends, so
an idle guard pays one small commit per call and a busy one shares each commit among many calls. A
call's start is awaited until committed before the call is forwarded (it survives the process being
killed); its end is queued without waiting. Only retention deletes rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery
from mcpguard.audit.sql import COLUMNS, Dialect, calls_sql, delete_sql, insert_sql, iso_time, page_of, row_of
from mcpguard.errors import StorageUnavailable

__all__ = ["SQLiteAuditStore"]

_T = TypeVar("_T")
# Times are ISO 8601 text in UTC with microseconds, so comparing the text compares the times.
_DIALECT = Dialect(param="?", time=iso_time)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit_events ({", ".join(c + (" TEXT PRIMARY KEY" if c == "id" else "") for c in COLUMNS)});
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit_events (tenant, id);
CREATE INDEX IF NOT EXISTS audit_by_start ON audit_events (start_id);
"""
_INSERT = insert_sql(_DIALECT)
_DELETE = delete_sql(_DIALECT)
_UNAVAILABLE = "audit store unavailable"


class _Job:
    __slots__ = ("event", "future", "loop", "work")

    def __init__(
        self,
        *,
        event: AuditEvent | None = None,
        work: Callable[[sqlite3.Connection], Any] | None = None,
        future: asyncio.Future[Any] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.event, self.work, self.future, self.loop = event, work, future, loop


def _settle(job: _Job, result: Any, error: BaseException | None) -> None:
    future, loop = job.future, job.loop
    if future is None or loop is None:
        return

    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # A closed loop means nobody is left waiting to be told.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


class SQLiteAuditStore:
    """Append-only audit events in one SQLite file; ``synchronous`` NORMAL survives a killed process."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous is NORMAL (survives a killed process) or FULL (survives power loss)")
        self.url = f"sqlite:///{path}"
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, args=(path, synchronous, ready), name="mcpguard-audit", daemon=True
        )
        self._closed = False
        # How many commits the writer has made: fewer than the appends shows them sharing commits.
        self.commits = 0
        self._thread.start()
        problem = ready.get()
        if problem is not None:
            raise StorageUnavailable(_UNAVAILABLE) from problem

    def _run(self, path: str, synchronous: str, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            if path != ":memory:" and not os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            ready.put(exc)
            return
        ready.put(None)
        try:
            while True:
                job = self._queue.get()
                batch = [job]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = None in batch
                self._commit(conn, [j for j in batch if j is not None])
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        appends = [job for job in batch if job.event is not None]
        if appends:
            try:
                conn.execute("BEGIN")
                conn.executemany(_INSERT, [row_of(job.event, _DIALECT) for job in appends if job.event is not None])
                conn.execute("COMMIT")
                self.commits += 1
            except (sqlite3.Error, ValueError, OverflowError) as exc:  # a bad row must not kill the writer
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                failure = StorageUnavailable(_UNAVAILABLE)
                failure.__cause__ = exc
                for job in appends:
                    _settle(job, None, failure)
            else:
                for job in appends:
                    _settle(job, None, None)
        for job in batch:
            if job.work is not None:
                try:
                    result = job.work(conn)
                except (sqlite3.Error, ValueError, OverflowError):
                    _settle(job, None, StorageUnavailable(_UNAVAILABLE))
                else:
                    _settle(job, result, None)

    def _submit(self, job: _Job) -> None:
        if self._closed or not self._thread.is_alive():
            raise StorageUnavailable(_UNAVAILABLE)
        self._queue.put(job)

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        """Queue ``event``; with ``durable``, return only once it is committed."""
        if not durable:
            self._submit(_Job(event=event))
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._submit(_Job(event=event, future=future, loop=loop))
        await future

    async def _call(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._submit(_Job(work=work, future=future, loop=loop))
        return await future

    async def query(self, q: AuditQuery) -> AuditPage:
        """Calls matching ``q``, newest first: each start or local entry joined with its end, if any."""
        sql, args = calls_sql(q, _DIALECT)
        rows = await self._call(lambda conn: conn.execute(sql, args).fetchall())
        return page_of(rows, q)

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete every entry older than ``cutoff``; the number deleted."""
        stamp = iso_time(cutoff)
        return await self._call(lambda conn: conn.execute(_DELETE, (stamp,)).rowcount)

    async def close(self) -> None:
        """Commit what is queued and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
