"""The SQLite trail's log is copied into the database off the event loop, and still starts over short."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from mcpguard.audit import AuditQuery, SQLiteAuditStore
from mcpguard.audit.sqlite_store import _CHECKPOINT_COMMITS as CHECKPOINT_COMMITS
from tests.audit.test_audit_store_conformance import end, start

# Without checkpoints, this many two-entry commits leave a log of well over 100 MiB.
CALLS = 10_000
LOG_BOUND = 24 * 1024 * 1024


class HeldCheckpoints(SQLiteAuditStore):
    """A store whose first two checkpoint copies (a checkpoint's bulk and its rest) each wait until the test
    lets them go, as on a disk that is slow to sync."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.entered = [threading.Event(), threading.Event()]
        self.release = [threading.Event(), threading.Event()]
        self.copies = 0

    def _checkpoint(self) -> None:
        copy, self.copies = self.copies, self.copies + 1
        if copy < len(self.entered):
            self.entered[copy].set()
            self.release[copy].wait(timeout=30)
        super()._checkpoint()


def test_log_stays_short_under_sustained_calls(tmp_path: Path) -> None:
    """Calls one after another, each a committed start and an end, keep the log near its checkpoint size."""

    async def run() -> int:
        store = SQLiteAuditStore(str(tmp_path / "audit.db"))
        for _ in range(CALLS):
            call = start()
            await store.append(call, durable=True)
            await store.append(end(call), durable=False)
        size = (tmp_path / "audit.db-wal").stat().st_size
        page = await store.query(AuditQuery(tenant="acme", limit=1))
        assert page.calls[0]["status"] == 200
        await store.close()
        return size

    assert asyncio.run(run()) < LOG_BOUND
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        assert conn.execute("SELECT count(*) FROM audit_events").fetchone() == (2 * CALLS,)


def test_loop_runs_on_while_a_checkpoint_waits_for_the_disk(tmp_path: Path) -> None:
    """While a checkpoint copies the bulk of the log, starts are committed as ever; while it copies the rest,
    a start waits for its commit and the loop keeps serving; nothing is lost."""

    async def run() -> None:
        store = HeldCheckpoints(str(tmp_path / "audit.db"))
        # Calls one after another commit one by one, and this many commits make a checkpoint due.
        for _ in range(CHECKPOINT_COMMITS):
            await store.append(start(), durable=True)
        bulk, rest = store.entered
        assert await asyncio.to_thread(bulk.wait, 10)
        await asyncio.wait_for(store.append(start(tenant="beta"), durable=True), timeout=1)
        assert not rest.is_set()
        store.release[0].set()
        assert await asyncio.to_thread(rest.wait, 10)
        waiting = asyncio.create_task(store.append(start(tenant="beta"), durable=True))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 20
        assert not waiting.done()
        lazy = start(tenant="gamma")
        await store.append(lazy, durable=False)
        reading = asyncio.create_task(store.query(AuditQuery(tenant="gamma")))
        await asyncio.sleep(0.05)
        assert not reading.done()
        store.release[1].set()
        await asyncio.wait_for(waiting, timeout=10)
        page = await asyncio.wait_for(reading, timeout=10)
        assert [row["id"] for row in page.calls] == [lazy.id]
        beta = await store.query(AuditQuery(tenant="beta"))
        assert len(beta.calls) == 2
        acme = await store.query(AuditQuery(tenant="acme", limit=1000))
        assert len(acme.calls) == CHECKPOINT_COMMITS
        await store.close()

    asyncio.run(run())
