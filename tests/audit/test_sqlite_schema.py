"""The SQLite trail's tables: a reviewer's query reads through indexes, and files made earlier still work."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

from mcpguard.audit import AuditQuery, SQLiteAuditStore
from mcpguard.audit.sql import Dialect, calls_sql, iso_time
from tests.audit.test_audit_store_conformance import EARLIER_COLUMNS, end, start

# The tables as files were first made: every entry indexed by its start, starts (which have none) included.
EARLIER_SCHEMA = f"""
CREATE TABLE audit_events ({", ".join(c + (" TEXT PRIMARY KEY" if c == "id" else "") for c in EARLIER_COLUMNS)});
CREATE INDEX audit_by_tenant ON audit_events (tenant, id);
CREATE INDEX audit_by_start ON audit_events (start_id);
"""


def fill(path: Path, calls: int) -> None:
    async def run() -> None:
        store = SQLiteAuditStore(str(path))
        for _ in range(calls):
            call = start()
            await store.append(call, durable=True)
            await store.append(end(call), durable=False)
        await store.close()

    asyncio.run(run())


def test_a_tenants_calls_are_read_through_indexes_not_a_scan(tmp_path: Path) -> None:
    """The query for a tenant's calls finds its starts by the tenant index, the reads of its trail by others by the
    read-tenant index, and each end by the start index; only the two parts' pages are scanned, to merge them."""
    fill(tmp_path / "audit.db", 50)
    sql, args = calls_sql(AuditQuery(tenant="acme", tool="read", limit=20), Dialect(param="?", time=iso_time))
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        plan = " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        indexed = conn.execute("SELECT count(*) FROM audit_events INDEXED BY audit_by_start WHERE start_id > ''")
        ends_indexed = indexed.fetchone()[0]
        (index_sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit_by_start'").fetchone()
    assert "USING INDEX audit_by_tenant" in plan, plan
    assert "USING INDEX audit_by_read_tenant" in plan, plan
    assert "USING INDEX audit_by_start" in plan, plan
    assert set(re.findall(r"SCAN (\w+)", plan)) == {"own", "reads"}, plan
    assert ends_indexed == 50
    assert "WHERE start_id IS NOT NULL" in index_sql


def test_a_file_made_with_the_earlier_tables_takes_and_answers_calls_alike(tmp_path: Path) -> None:
    """A trail whose file predates the current tables is kept as it is, appended to and read the same way."""
    path = tmp_path / "earlier.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(EARLIER_SCHEMA)
    fill(path, 30)

    async def read() -> list[dict[str, object]]:
        store = SQLiteAuditStore(str(path))
        page = await store.query(AuditQuery(tenant="acme", limit=100))
        await store.close()
        return page.calls

    calls = asyncio.run(read())
    assert len(calls) == 30
    assert {call["outcome"] for call in calls} == {"complete"}
    assert {call["status"] for call in calls} == {200}
    with sqlite3.connect(path) as conn:
        (index_sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit_by_start'").fetchone()
    assert "WHERE" not in index_sql
