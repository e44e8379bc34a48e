"""The audit trail over a real socket: every outcome recorded, starts durable first, nothing of a body kept."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import ConfigError, GuardConfig, MCPGuard, build_guard, open_store
from mcpguard.audit import SQLiteAuditStore
from mcpguard.keys import parse_key
from tests.audit.test_audit_store_conformance import append_all, end, start
from tests.conftest import cheap_keyring, free_port, make_keys, read_body, serve
from tests.test_guard import list_tools, rpc

CANARY = "canary-7f3a9c1e5b2d4086"
NESTING = 200_000


@dataclass
class ToolApp:
    """Answers tools/call (isError when the tool is 'failing'), checking first that the call's start is committed."""

    database: Path
    starts_seen: list[bool] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        with sqlite3.connect(self.database) as conn:
            starts = conn.execute("SELECT count(*) FROM audit_events WHERE phase = 'start'").fetchone()[0]
        self.starts_seen.append(starts > 0)
        request = json.loads(body) if body else {}
        failing = request.get("params", {}).get("name") == "failing"
        result = {"content": [{"type": "text", "text": f"result {CANARY}"}], "isError": failing}
        answer = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result}).encode()
        if request.get("params", {}).get("name") == "nested":
            # Deeper than Python's JSON parser can go: the audit's scan of the answer must give up, not break it.
            answer = answer.replace(b'"content": [', b'"content": [' + b"[" * NESTING + b"]" * NESTING + b",", 1)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


async def tools(host: str | None) -> list[Any]:
    """The recording app's tools plus one whose calls fail."""
    return [
        *await list_tools(host),
        {"name": "failing", "annotations": {"readOnlyHint": True}},
        {"name": "nested", "annotations": {"readOnlyHint": True}},
    ]


@dataclass
class Audited:
    url: str
    app: ToolApp
    database: Path
    keys: dict[str, str]
    operator: str

    def get(self, label: str, query: str = "", path: str = "/api/mcp/tool-calls") -> httpx.Response:
        return httpx.get(self.url + path + query, headers={"Authorization": f"Bearer {self.keys[label]}"})


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    database = tmp_path_factory.mktemp("audit") / "audit.db"
    store = open_store("memory://")

    keys = make_keys(
        store,
        {
            "acme": ("acme", ["mcp:read"]),
            "acme-audit": ("acme", ["mcp:audit"]),
            "globex": ("globex", ["mcp:admin"]),
            "operator": ("ops", ["mcp:audit"]),
        },
    )
    operator, _ = parse_key(keys["operator"])
    audit = SQLiteAuditStore(str(database))
    app = ToolApp(database)
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", operator_credentials=(operator,))
    guard = MCPGuard(app, config, keys=cheap_keyring(store), tool_lister=tools, audit=audit)
    with serve(guard, port) as url:
        yield Audited(url, app, database, keys, operator)


def call(
    a: Audited, label: str, tool: str, *, arguments: dict[str, Any] | None = None, **headers: str
) -> httpx.Response:
    body = rpc("tools/call", {"name": tool, "arguments": arguments or {}})
    return httpx.post(a.url + "/mcp", json=body, headers={"Authorization": f"Bearer {a.keys[label]}", **headers})


def calls(a: Audited, label: str, query: str = "") -> list[dict[str, Any]]:
    response = a.get(label, query)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["calls"]
    return result


def test_forwarded_call_is_started_durably_then_completed(audited: Audited) -> None:
    """The start is committed before the app runs; the call reads back joined with its outcome."""
    assert call(audited, "acme", "read_tool").status_code == 200
    assert audited.app.starts_seen[-1] is True
    latest = calls(audited, "acme-audit", "?tool=read_tool")[0]
    assert latest["outcome"] == "complete"
    assert latest["status"] == 200
    assert latest["decision"] == "allowed"
    assert latest["tenant"] == "acme"
    assert latest["subject"] == "key:acme"
    assert latest["rpc_method"] == "tools/call"
    assert latest["duration_ms"] >= 0


def test_tool_error_flag_is_recorded(audited: Audited) -> None:
    """A tool result with isError true is recorded as a tool error without keeping the result."""
    call(audited, "acme", "failing")
    latest = calls(audited, "acme-audit", "?tool=failing")[0]
    assert latest["tool_error"] is True


@pytest.mark.threat("T-DEEP-JSON")
def test_answer_too_deep_to_parse_still_arrives_and_is_recorded(audited: Audited) -> None:
    """An upstream answer nested past what the JSON parser can read reaches the client whole and is recorded."""
    response = call(audited, "acme", "nested")
    assert response.status_code == 200
    assert response.content.count(b"[") > NESTING
    assert response.content.endswith(b"}")
    latest = calls(audited, "acme-audit", "?tool=nested")[0]
    assert latest["outcome"] == "complete"
    assert latest["status"] == 200
    assert latest["bytes_out"] == len(response.content)


@pytest.mark.threat("T-AUDIT-GAP")
def test_refusals_are_recorded_with_their_reason(audited: Audited) -> None:
    """Scope refusals are in the trail as denied with reason scope; unauthenticated ones too, tenant unknown."""
    assert call(audited, "acme", "drop_tool").status_code == 403
    latest = calls(audited, "acme-audit", "?decision=denied")[0]
    assert latest["reason"] == "scope"
    assert latest["status"] == 403
    assert latest["outcome"] == "local"
    httpx.post(audited.url + "/mcp", json=rpc("ping"))
    anonymous = calls(audited, "operator", "?status=401")
    assert anonymous
    assert anonymous[0]["tenant"] is None
    assert anonymous[0]["reason"] == "auth"


@pytest.mark.threat("T-AUDIT-LEAK")
def test_canary_never_reaches_the_trail(audited: Audited) -> None:
    """A secret in arguments, results, headers, cookies and the query string appears nowhere in the store."""
    response = httpx.post(
        audited.url + f"/mcp?token={CANARY}",
        json=rpc("tools/call", {"name": "read_tool", "arguments": {"secret": CANARY}}),
        headers={
            "Authorization": f"Bearer {audited.keys['acme']}",
            "Cookie": f"session={CANARY}",
            "X-Custom": CANARY,
        },
    )
    assert CANARY in response.text
    everything = json.dumps(calls(audited, "operator", "?limit=1000"))
    assert CANARY not in everything
    on_disk = b"".join(p.read_bytes() for p in audited.database.parent.iterdir())
    assert CANARY.encode() not in on_disk


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_tenant_sees_only_its_own_calls(audited: Audited) -> None:
    """However it filters, a tenant's reviewer never sees another tenant's calls."""
    call(audited, "globex", "read_tool")
    globex_ids = {c["id"] for c in calls(audited, "operator", "?tenant=globex")}
    assert globex_ids
    for query in ("", "?tool=read_tool", "?subject=key:globex", "?credential=" + "x", "?limit=1000"):
        seen = calls(audited, "acme-audit", query)
        assert all(c["tenant"] == "acme" for c in seen)
        assert not globex_ids & {c["id"] for c in seen}
    for call_id in globex_ids:
        assert audited.get("acme-audit", path=f"/api/mcp/tool-calls/{call_id}").status_code == 404


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_tenant_parameter_needs_the_operator(audited: Audited) -> None:
    """tenant= from a tenant's own reviewer is refused; the configured operator may use it."""
    assert audited.get("acme-audit", "?tenant=globex").status_code == 403
    assert audited.get("operator", "?tenant=globex").status_code == 200


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_cursor_pages_every_call_once_and_refuses_tampering(audited: Audited) -> None:
    """Paging returns every earlier call exactly once while new ones (the queries themselves) keep arriving."""
    for _ in range(5):
        call(audited, "acme", "read_tool")
    everything = [c["id"] for c in calls(audited, "acme-audit", "?limit=1000")]
    paged: list[str] = []
    cursor = ""
    while True:
        response = audited.get("acme-audit", "?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        body = response.json()
        paged += [c["id"] for c in body["calls"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    # Each query is itself recorded, so calls newer than the first page arrive while paging.
    assert [call_id for call_id in paged if call_id in set(everything)] == everything
    assert len(set(paged)) == len(paged)
    assert audited.get("acme-audit", "?cursor=not-a-cursor").status_code == 400


def test_audit_scope_required(audited: Audited) -> None:
    """A key without mcp:audit cannot read the trail."""
    response = audited.get("acme")
    assert response.status_code == 403
    assert 'scope="mcp:audit"' in response.headers["www-authenticate"]


def test_bad_filters_are_reported_together(audited: Audited) -> None:
    """Every bad filter is named in one 400."""
    response = audited.get("acme-audit", "?status=abc&limit=0&since=yesterday&colour=red")
    assert response.status_code == 400
    message = response.json()["error_description"]
    for word in ("status", "limit", "since", "colour"):
        assert word in message


@pytest.mark.threat("T-AUDIT-GAP")
@pytest.mark.parametrize("retention", [timedelta(days=-1), timedelta(0)], ids=["negative", "zero"])
def test_retention_that_would_delete_the_whole_trail_is_refused(tmp_path: Path, retention: timedelta) -> None:
    """A retention at or below zero is a ConfigError from MCPGuard and build_guard, and the trail keeps every entry."""
    database = tmp_path / "audit.db"
    first = start()
    seeded = (first, end(first))

    async def seed() -> None:
        store = SQLiteAuditStore(str(database))
        await append_all(store, *seeded)
        await store.close()

    asyncio.run(seed())
    audit = SQLiteAuditStore(str(database))
    with pytest.raises(ConfigError) as info:
        MCPGuard(ToolApp(database), audit=audit, audit_retention=retention)
    assert info.value.problems == ["audit_retention must be more than zero, or None to keep the trail for ever"]
    with pytest.raises(ConfigError):
        build_guard(ToolApp(database), GuardConfig(), audit=audit, audit_retention=retention)
    asyncio.run(audit.close())
    with sqlite3.connect(database) as conn:
        kept = {row[0] for row in conn.execute("SELECT id FROM audit_events")}
    assert kept == {event.id for event in seeded}


def test_no_retention_keeps_the_trail_for_ever(tmp_path: Path) -> None:
    """``audit_retention=None``, which keeps the trail for ever, is still accepted."""
    audit = SQLiteAuditStore(str(tmp_path / "audit.db"))
    MCPGuard(ToolApp(tmp_path / "audit.db"), audit=audit, audit_retention=None)
    asyncio.run(audit.close())
