"""The sidecar's audit trail survives SIGKILL under load, retention prunes it, and the CLI reads it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import AuditEvent, GuardConfig, MCPGuard, SQLiteAuditStore, open_store
from mcpguard.audit import new_event_id
from tests.conftest import cheap_keyring, free_port, make_keys, read_body, serve
from tests.test_guard import RecordingApp, list_tools, rpc

CALLS = 24
KEYS_CREATE = [sys.executable, "-m", "sidecar.cli", "keys", "create", "--tenant", "acme", "--scopes", "mcp:admin"]
SIDECAR = [sys.executable, "-m", "sidecar.cli", "sidecar", "--upstream"]


class SlowUpstream:
    """Records the tool of every call it receives, then takes its time to answer."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        request = json.loads(body) if body else {}
        if request.get("method") == "tools/call":
            with self.lock:
                self.received.append(request["params"]["name"])
            await asyncio.sleep(2)
        answer = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": {"tools": []}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "sidecar exited at start"
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("sidecar did not start")


@pytest.mark.threat("T-AUDIT-GAP")
def test_every_forwarded_call_is_audited_after_sigkill(tmp_path: Path) -> None:
    """Kill the sidecar mid-load: each call the upstream received has a committed start, read back as no outcome."""
    state = tmp_path / "state.db"
    env = os.environ | {"MCPGUARD_ARGON2_PROFILE": "cheapest"}
    created = subprocess.run(
        [*KEYS_CREATE, "--state", str(state), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(created.stdout)["key"]
    upstream = SlowUpstream()
    with serve(upstream) as upstream_url:
        port = free_port()
        sidecar = subprocess.Popen(
            [*SIDECAR, f"{upstream_url}/mcp", "--listen", f"127.0.0.1:{port}", "--state", str(state)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_port(port, sidecar)

            def fire(index: int) -> None:
                # Unlisted tool names need admin, which this key has; each name marks one call.
                body = rpc("tools/call", {"name": f"tool-{index}", "arguments": {}}, index)
                with contextlib.suppress(httpx.TransportError):  # the sidecar is killed under it
                    httpx.post(
                        f"http://127.0.0.1:{port}/mcp",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=10,
                    )

            threads = [threading.Thread(target=fire, args=(i,)) for i in range(CALLS)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 10
            while len(upstream.received) < CALLS // 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(sidecar.pid, signal.SIGKILL)
            sidecar.wait(timeout=10)
            for thread in threads:
                thread.join(timeout=15)
        finally:
            if sidecar.poll() is None:
                sidecar.kill()
    received = set(upstream.received)
    assert len(received) >= CALLS // 2
    with sqlite3.connect(state) as conn:
        started = {row[0] for row in conn.execute("SELECT tool FROM audit_events WHERE phase = 'start'")}
        ended = {
            row[0]
            for row in conn.execute(
                "SELECT s.tool FROM audit_events s JOIN audit_events e ON e.start_id = s.id WHERE e.phase = 'end'"
            )
        }
    assert received <= started
    in_flight = received - ended
    assert in_flight, "the kill should have caught calls in flight"
    listing = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "audit", "query", "--state", str(state), "--json", "--limit", "1000"],
        capture_output=True,
        text=True,
        check=True,
    )
    outcomes = {json.loads(line)["tool"]: json.loads(line)["outcome"] for line in listing.stdout.splitlines()}
    for tool in in_flight:
        assert outcomes[tool] == "no_outcome"


def test_retention_deletes_old_entries(tmp_path: Path) -> None:
    """Entries older than the retention period are deleted by the next request's pruning pass."""
    audit = SQLiteAuditStore(str(tmp_path / "audit.db"))
    old = AuditEvent.now() - timedelta(days=100)
    stale = AuditEvent(id=new_event_id(old.timestamp()), at=old, phase="local", tenant="acme", http_method="GET")
    asyncio.run(audit.append(stale, durable=True))
    store = open_store("memory://")
    keys = make_keys(store, {"audit": ("acme", ["mcp:admin"])})
    port = free_port()
    guard = MCPGuard(
        RecordingApp(),
        GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        keys=cheap_keyring(store),
        tool_lister=list_tools,
        audit=audit,
        audit_retention=timedelta(days=90),
    )
    with serve(guard, port) as url:
        headers = {"Authorization": f"Bearer {keys['audit']}"}
        deadline = time.monotonic() + 5
        while True:
            ids = {c["id"] for c in httpx.get(url + "/api/mcp/tool-calls", headers=headers).json()["calls"]}
            if stale.id not in ids or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # The queries above are recorded too: recent entries stay.
        recent = httpx.get(url + "/api/mcp/tool-calls", headers=headers).json()["calls"]
    assert stale.id not in ids
    assert recent
