"""``mcpguard audit query``, run in process against an SQLite trail."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

from mcpguard import AuditEvent, SQLiteAuditStore
from mcpguard.audit import ALL_TENANTS, TOOL_CALLS_PATH, new_event_id
from tests.conftest import run_cli as run


def write_trail(path: Path) -> None:
    """A call of globex's, then the operator's reads of globex's trail and of every tenant's."""
    now = AuditEvent.now() - timedelta(minutes=1)

    def at(seconds: int) -> AuditEvent:
        moment = now + timedelta(seconds=seconds)
        return AuditEvent(id=new_event_id(moment.timestamp()), at=moment, phase="local")

    read = {"tenant": "ops", "subject": "key:operator", "http_method": "GET", "path": TOOL_CALLS_PATH, "status": 200}
    events = [
        at(0)._replace(tenant="globex", subject="key:globex", http_method="POST", path="/mcp", rpc_method="ping"),
        at(1)._replace(read_tenant="globex", decision="allowed", **read),
        at(2)._replace(read_tenant=ALL_TENANTS, decision="allowed", **read),
    ]

    async def append() -> None:
        store = SQLiteAuditStore(str(path))
        for event in events:
            await store.append(event, durable=True)
        await store.close()

    asyncio.run(append())


def test_a_read_of_a_trail_is_listed_with_the_tenant_it_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The listing of globex's trail holds the operator's read of it, its line naming the tenant read; the listing
    of every tenant also shows the read of every tenant (*); --json carries the field; acme's listing is empty."""
    trail = tmp_path / "audit.db"
    write_trail(trail)
    status, out, _ = run(capsys, "audit", "query", "--audit", str(trail), "--tenant", "globex")
    assert status == 0
    read, call = out.splitlines()
    assert read.split()[1:3] == ["ops", "key:operator"]
    assert "read_tenant=globex" in read.split()
    assert "read_tenant" not in call
    _, out, _ = run(capsys, "audit", "query", "--audit", str(trail))
    assert [word for line in out.splitlines() for word in line.split() if word.startswith("read_tenant=")] == [
        "read_tenant=*",
        "read_tenant=globex",
    ]
    _, out, _ = run(capsys, "audit", "query", "--audit", str(trail), "--tenant", "globex", "--json")
    assert [json.loads(line)["read_tenant"] for line in out.splitlines()] == ["globex", None]
    assert run(capsys, "audit", "query", "--audit", str(trail), "--tenant", "acme")[1] == ""
