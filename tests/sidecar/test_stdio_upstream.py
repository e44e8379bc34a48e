"""The sidecar in front of a stdio MCP server: one process per session, real sockets, the real ``mcp`` client."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcpguard import GuardConfig, open_store
from sidecar.app import SidecarApp, build_stdio_sidecar
from sidecar.stdio_upstream import StdioSettings, StdioUpstream
from tests.conftest import LEGACY_HEADERS, LEGACY_INITIALIZE, cheap_keyring, free_port, make_keys, serve

REPO = Path(__file__).resolve().parents[2]
DEMO = (sys.executable, "-m", "sidecar.demo_server", "--stdio")
MODES = ["legacy", "auto"]
INIT = LEGACY_INITIALIZE
LEGACY = LEGACY_HEADERS


@dataclass
class Stack:
    url: str
    upstream: StdioUpstream
    keys: dict[str, str]


@contextmanager
def stdio_sidecar(settings: StdioSettings, labels: dict[str, tuple[str, str]]) -> Iterator[Stack]:
    """A sidecar in front of ``settings.argv`` with one key per label (tenant, scope), served on a real socket."""
    store = open_store("memory://")
    keys = make_keys(store, {label: (tenant, [scope]) for label, (tenant, scope) in labels.items()})
    port = free_port()
    app: SidecarApp = build_stdio_sidecar(
        config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        stdio=settings,
        store=store,
        keys=cheap_keyring(store),
    )
    assert isinstance(app.proxy, StdioUpstream)
    with serve(app, port) as url:
        yield Stack(url, app.proxy, keys)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    labels = {"read": ("acme", "mcp:read"), "write": ("acme", "mcp:write"), "globex": ("globex", "mcp:admin")}
    with stdio_sidecar(StdioSettings(argv=DEMO, cwd=str(REPO), read_timeout=10), labels) as running:
        yield running


def run(stack: Stack, key: str, mode: str, action: Callable[[Client], Any]) -> Any:
    async def go() -> Any:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
        async with http, Client(streamable_http_client(stack.url + "/mcp", http_client=http), mode=mode) as client:
            return await action(client)

    return asyncio.run(go())


def initialize(stack: Stack, key: str) -> tuple[str, int]:
    """Open a session with a raw initialize; returns its id and the pid of the process serving it."""
    before = set(stack.upstream.pids)
    opened = httpx.post(stack.url + "/mcp", json=INIT, headers=LEGACY | {"Authorization": f"Bearer {key}"}, timeout=10)
    assert opened.status_code == 200
    assert opened.json()["result"]["serverInfo"]["name"] == "mcpguard-demo"
    (pid,) = set(stack.upstream.pids) - before
    return opened.headers["mcp-session-id"], pid


def tools_list(stack: Stack, key: str, session: str) -> httpx.Response:
    headers = LEGACY | {"Authorization": f"Bearer {key}", "Mcp-Session-Id": session}
    return httpx.post(stack.url + "/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=headers)


def gone(pid: int, within: float = 8.0) -> bool:
    """Whether process ``pid`` has exited and been reaped, polling for up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mcp_errors(error: BaseException) -> list[MCPError]:
    """The ``MCPError`` leaves of an exception (group)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in mcp_errors(inner)]
    return [error] if isinstance(error, MCPError) else []


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


@pytest.mark.parametrize("mode", MODES)
def test_tools_through_stdio_sidecar(stack: Stack, mode: str) -> None:
    """A read key sees only read-only tools and calls one; a write key adds an item; auto falls back to 2025-11-25."""

    async def read(client: Client) -> tuple[str, set[str], Any]:
        names = {tool.name for tool in (await client.list_tools()).tools}
        return client.protocol_version, names, await client.call_tool("echo", {"text": "hi"})

    async def write(client: Client) -> tuple[Any, Any]:
        added = await client.call_tool("add_item", {"tenant_id": "acme", "text": "x"})
        return added, await client.call_tool("list_items", {"tenant_id": "acme"})

    version, names, echoed = run(stack, stack.keys["read"], mode, read)
    assert version == "2025-11-25"
    assert names == {"list_items", "echo", "slow_count"}
    assert echoed.is_error is False
    assert echoed.structured_content == {"result": "hi"}
    added, listed = run(stack, stack.keys["write"], mode, write)
    assert added.is_error is False
    assert listed.structured_content == {"result": ["x"]}


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_destructive_tool_refused_for_write_key_through_stdio(stack: Stack) -> None:
    """The stdio server's own annotations decide: its destructive tool needs admin."""

    async def action(client: Client) -> str:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("delete_items", {"tenant_id": "acme"})
        return str(caught.value)

    assert "mcp:admin" in run(stack, stack.keys["write"], "legacy", action)


def test_progress_arrives_incrementally(stack: Stack) -> None:
    """Progress notifications from the process reach the client while the tool still runs."""
    arrivals: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append(time.monotonic())

    async def action(client: Client) -> tuple[float, Any, float]:
        start = time.monotonic()
        result = await client.call_tool("slow_count", {"n": 5}, progress_callback=on_progress)
        return start, result, time.monotonic()

    start, result, done = run(stack, stack.keys["read"], "legacy", action)
    assert result.structured_content == {"result": 5}
    assert len(arrivals) == 5
    assert arrivals[0] - start < (done - start) * 0.75


@pytest.mark.threat("T-STDIO-SHARE")
def test_concurrent_tenants_never_share_a_process(stack: Stack) -> None:
    """Two sessions open at once run in two child processes; one tenant's items are not in the other's process."""
    before = set(stack.upstream.pids)
    seen: dict[str, int] = {}
    both_open = asyncio.Event()

    async def session(label: str, action: Callable[[Client], Any]) -> Any:
        key = stack.keys[label]
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
        async with http, Client(streamable_http_client(stack.url + "/mcp", http_client=http), mode="legacy") as client:
            seen[label] = len(seen)
            if len(seen) == 2:
                both_open.set()
            await asyncio.wait_for(both_open.wait(), 15)
            return set(stack.upstream.pids) - before, await action(client)

    async def both() -> list[Any]:
        return await asyncio.gather(
            session("write", lambda c: c.call_tool("add_item", {"tenant_id": "acme", "text": "secret"})),
            # Without pinning the demo server trusts this argument: only a separate process keeps acme's items out.
            session("globex", lambda c: c.call_tool("list_items", {"tenant_id": "acme"})),
        )

    (pids, added), (_, stolen) = asyncio.run(both())
    assert added.is_error is False
    assert stolen.structured_content == {"result": []}
    assert len(pids) == 2
    assert all(parent_of(pid) == os.getpid() for pid in pids)
    assert all(gone(pid) for pid in pids)


def test_delete_reaps_the_process_and_ends_the_session(stack: Stack) -> None:
    """DELETE ends the process serving the session; the session is 404 from then on."""
    session, pid = initialize(stack, stack.keys["read"])
    headers = LEGACY | {"Authorization": f"Bearer {stack.keys['read']}", "Mcp-Session-Id": session}
    assert httpx.delete(stack.url + "/mcp", headers=headers).status_code == 200
    assert gone(pid)
    assert tools_list(stack, stack.keys["read"], session).status_code == 404


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_of_another_key_refused_and_unknown_session_404(stack: Stack) -> None:
    """Another key presenting a live session id gets 404, and so does an id nobody opened."""
    session, _ = initialize(stack, stack.keys["write"])
    stolen = tools_list(stack, stack.keys["globex"], session)
    unknown = tools_list(stack, stack.keys["write"], "0" * 32)
    own = tools_list(stack, stack.keys["write"], session)
    headers = LEGACY | {"Authorization": f"Bearer {stack.keys['write']}", "Mcp-Session-Id": session}
    httpx.delete(stack.url + "/mcp", headers=headers)
    assert stolen.status_code == 404
    assert unknown.status_code == 404
    assert own.status_code == 200
    assert "add_item" in own.text


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_whose_process_died_is_404_not_reused(stack: Stack) -> None:
    """When a session's process dies, its id is gone: the next request gets 404, never another process."""
    session, pid = initialize(stack, stack.keys["read"])
    count = stack.upstream.session_count
    os.kill(pid, signal.SIGKILL)
    assert gone(pid)
    deadline = time.monotonic() + 5
    while stack.upstream.session_count >= count and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = tools_list(stack, stack.keys["read"], session)
    assert answer.status_code == 404
    assert answer.json()["error"]["data"]["error"] == "session_not_found"


@pytest.mark.threat("T-PATH-EVASION")
def test_json_rpc_on_another_path_never_reaches_a_process(stack: Stack) -> None:
    """An initialize posted outside the MCP endpoint is scoped as plain HTTP, so it must not start a server."""
    before = stack.upstream.session_count
    answer = httpx.post(
        stack.url + "/other", json=INIT, headers=LEGACY | {"Authorization": f"Bearer {stack.keys['globex']}"}
    )
    assert answer.status_code == 404
    assert "mcp-session-id" not in answer.headers
    assert stack.upstream.session_count == before


def test_stateless_request_told_to_open_a_legacy_session(stack: Stack) -> None:
    """A 2026-07-28 request without a session gets 400 with -32022 naming the handshake versions."""
    answer = httpx.post(
        stack.url + "/mcp",
        json={"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}},
        headers={
            "Authorization": f"Bearer {stack.keys['read']}",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/list",
        },
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == -32022
    assert "2025-11-25" in error["data"]["supported"]
    assert "2026-07-28" not in error["data"]["supported"]


def test_readiness(stack: Stack) -> None:
    """/readyz is ready when the store answers and the command can be run."""
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["problems"] == []


@pytest.mark.parametrize("mode", MODES)
def test_crashing_command_is_a_clear_error(mode: str) -> None:
    """A command that exits at once gives the client a JSON-RPC error naming the exit, promptly."""
    crash = StdioSettings(argv=(sys.executable, "-c", "import sys; sys.exit(1)"), read_timeout=10)
    with stdio_sidecar(crash, {"admin": ("acme", "mcp:admin")}) as running:
        key = running.keys["admin"]
        start = time.monotonic()
        with pytest.raises(Exception) as caught:  # noqa: PT011  # the client wraps it in exception groups
            run(running, key, mode, lambda client: client.list_tools())
        raw = httpx.post(running.url + "/mcp", json=INIT, headers=LEGACY | {"Authorization": f"Bearer {key}"})
        assert running.upstream.session_count == 0
    assert time.monotonic() - start < 8
    assert any("exited (status 1)" in str(error) for error in mcp_errors(caught.value))
    assert raw.status_code == 502
    assert raw.json()["id"] == 1
    assert "exited (status 1)" in raw.json()["error"]["message"]
    assert "mcp-session-id" not in raw.headers


def test_missing_command_is_unready_and_502() -> None:
    """A command that does not exist makes /readyz 503 and initialize a 502."""
    missing = StdioSettings(argv=("/nonexistent/mcp-server",))
    with stdio_sidecar(missing, {"admin": ("acme", "mcp:admin")}) as running:
        ready = httpx.get(running.url + "/readyz")
        opened = httpx.post(
            running.url + "/mcp", json=INIT, headers=LEGACY | {"Authorization": f"Bearer {running.keys['admin']}"}
        )
    assert ready.status_code == 503
    assert ready.json()["problems"] == ["upstream command not found or not executable"]
    assert opened.status_code == 502
    assert opened.json()["error"]["message"] == "the upstream MCP server command could not be started"


def test_idle_session_reaped_and_shutdown_leaves_no_child() -> None:
    """A session idle past the timeout loses its process; at shutdown every remaining process is ended."""
    settings = StdioSettings(argv=DEMO, cwd=str(REPO), idle_timeout=1.0)
    with stdio_sidecar(settings, {"admin": ("acme", "mcp:admin")}) as running:
        key = running.keys["admin"]
        idle, idle_pid = initialize(running, key)
        assert gone(idle_pid, within=5)
        assert tools_list(running, key, idle).status_code == 404
        _, live_pid = initialize(running, key)
        assert running.upstream.session_count == 1
    assert gone(live_pid, within=0)
    assert running.upstream.session_count == 0


def test_session_and_message_limits() -> None:
    """Past max_sessions a new session gets 503; a message over the size cap is refused or ends the session."""
    settings = StdioSettings(argv=DEMO, cwd=str(REPO), max_sessions=1, max_message_bytes=4096)
    with stdio_sidecar(settings, {"admin": ("acme", "mcp:admin")}) as running:
        key = running.keys["admin"]
        session, pid = initialize(running, key)
        headers = LEGACY | {"Authorization": f"Bearer {key}"}
        full = httpx.post(running.url + "/mcp", json=INIT, headers=headers)
        in_session = headers | {"Mcp-Session-Id": session}

        def echo(text: str, accept: str = LEGACY["Accept"]) -> httpx.Response:
            call = {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": text}},
            }
            return httpx.post(running.url + "/mcp", json=call, headers=in_session | {"Accept": accept}, timeout=10)

        small = echo("hi", accept="application/json")
        too_big = echo("x" * 5000)
        answer_too_big = echo("x" * 3000)
        assert gone(pid)
        after = echo("hi")
    assert full.status_code == 503
    assert full.json()["error"]["data"]["error"] == "temporarily_unavailable"
    assert small.headers["content-type"] == "application/json"
    assert small.json()["result"]["structuredContent"] == {"result": "hi"}
    assert too_big.status_code == 413
    assert "larger than the limit" in answer_too_big.text
    assert after.status_code == 404


@pytest.mark.threat("T-DEEP-JSON")
def test_line_too_deep_to_parse_is_ignored_and_the_session_goes_on() -> None:
    """A line of JSON nested past what the parser can read is dropped like any line that is not JSON."""
    deep_first = (
        "import runpy, sys; "
        "sys.stdout.write('[' * 5000 + ']' * 5000 + '\\n'); sys.stdout.flush(); "
        "sys.argv = ['demo', '--stdio']; runpy.run_module('sidecar.demo_server', run_name='__main__')"
    )
    settings = StdioSettings(argv=(sys.executable, "-c", deep_first), cwd=str(REPO), read_timeout=10)
    with stdio_sidecar(settings, {"read": ("acme", "mcp:read")}) as running:
        key = running.keys["read"]
        session, _ = initialize(running, key)
        listed = tools_list(running, key, session)
    assert listed.status_code == 200
    assert "echo" in listed.text
