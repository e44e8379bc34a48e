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
from dataclasses import astuple, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery, encode_cursor
from mcpguard.errors import StorageUnavailable

__all__ = ["SQLiteAuditStore"]

_T = TypeVar("_T")
_COLUMNS = [f.name for f in fields(AuditEvent)]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS audit_events ({", ".join(c + (" TEXT PRIMARY KEY" if c == "id" else "") for c in _COLUMNS)});
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit_events (tenant, id);
CREATE INDEX IF NOT EXISTS audit_by_start ON audit_events (start_id);
"""
# Built from the dataclass's own field names only; every value is a bound parameter.
_INSERT = f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"  # noqa: S608
_UNAVAILABLE = "audit store unavailable"
# Outcome columns of an end entry that overlay its start when a call is read back.
_OUTCOME = ("status", "rpc_error", "tool_error", "decision", "reason", "duration_ms", "bytes_in", "bytes_out")


def _row(event: AuditEvent) -> tuple[Any, ...]:
    values = list(astuple(event))
    values[_COLUMNS.index("at")] = event.at.astimezone(UTC).isoformat(timespec="microseconds")
    return tuple(values)


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
                conn.executemany(_INSERT, [_row(job.event) for job in appends if job.event is not None])
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
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
                except sqlite3.Error:
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
        where = ["s.phase IN ('start', 'local')"]
        args: list[Any] = []
        # The tenant condition is always present: None (operator, all tenants) is the only way round it.
        if q.tenant is not None:
            where.append("s.tenant = ?")
            args.append(q.tenant)
        for column, value in (
            ("s.tool", q.tool),
            ("s.rpc_method", q.method),
            ("s.subject", q.subject),
            ("s.credential_id", q.credential),
            ("COALESCE(e.status, s.status)", q.status),
            ("COALESCE(e.decision, s.decision)", q.decision),
            ("s.id", q.call_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.since is not None:
            where.append("s.at >= ?")
            args.append(q.since.astimezone(UTC).isoformat(timespec="microseconds"))
        if q.until is not None:
            where.append("s.at < ?")
            args.append(q.until.astimezone(UTC).isoformat(timespec="microseconds"))
        if q.before_id is not None:
            where.append("s.id < ?")
            args.append(q.before_id)
        start_cols = ", ".join(f"s.{c}" for c in _COLUMNS)
        end_cols = ", ".join(f"e.{c}" for c in _OUTCOME)
        sql = (
            f"SELECT {start_cols}, e.id, {end_cols} FROM audit_events s "  # noqa: S608 - fixed column names
            "LEFT JOIN audit_events e ON e.phase = 'end' AND e.start_id = s.id "
            f"WHERE {' AND '.join(where)} ORDER BY s.id DESC LIMIT ?"
        )
        args.append(q.limit + 1)
        rows = await self._call(lambda conn: conn.execute(sql, args).fetchall())
        calls = [_call_of(row) for row in rows[: q.limit]]
        next_cursor = encode_cursor(calls[-1]["id"]) if len(rows) > q.limit and calls else None
        return AuditPage(calls, next_cursor)

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete every entry older than ``cutoff``; the number deleted."""
        stamp = cutoff.astimezone(UTC).isoformat(timespec="microseconds")
        return await self._call(lambda conn: conn.execute("DELETE FROM audit_events WHERE at < ?", (stamp,)).rowcount)

    async def close(self) -> None:
        """Commit what is queued and stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)


def _call_of(row: tuple[Any, ...]) -> dict[str, Any]:
    start = dict(zip(_COLUMNS, row[: len(_COLUMNS)], strict=True))
    end_id = row[len(_COLUMNS)]
    outcome = dict(zip(_OUTCOME, row[len(_COLUMNS) + 1 :], strict=True))
    call = {k: v for k, v in start.items() if k not in ("phase", "start_id")}
    if start["phase"] == "start":
        if end_id is None:
            call["outcome"] = "no_outcome"
        else:
            call.update({name: value for name, value in outcome.items() if value is not None})
            call["outcome"] = "complete"
    else:
        call["outcome"] = "local"
    if call.get("tool_error") is not None:
        call["tool_error"] = bool(call["tool_error"])
    return call
