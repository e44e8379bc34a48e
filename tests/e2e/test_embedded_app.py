"""The example app behind the guard, served on a real socket, driven by the real ``mcp`` client."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcpguard import open_store
from tests.conftest import cheap_keyring, free_port, make_keys, serve

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "embedded_app.py"
MODES = ["legacy", "auto"]


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedded_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Deployment:
    """The running example plus keys of each scope level for two tenants."""

    def __init__(self, url: str, keys: dict[str, str]) -> None:
        self.url = url
        self.keys = keys


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state = f"sqlite:///{tmp_path_factory.mktemp('state') / 'mcpguard.db'}"
    keys = make_keys(
        open_store(state),
        {
            "read": ("acme", ["mcp:read"]),
            "write": ("acme", ["mcp:read", "mcp:write"]),
            "admin": ("acme", ["mcp:admin"]),
            "other": ("globex", ["mcp:admin"]),
        },
    )
    example = _load_example()
    port = free_port()
    server_ring = cheap_keyring(open_store(state))
    app = example.create_app(state=state, public_url=f"http://127.0.0.1:{port}", keys=server_ring)
    with serve(app, port) as url:
        yield Deployment(url, keys)


async def _session(deployment: Deployment, key: str, mode: str, action: Any, statuses: list[int]) -> Any:
    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, event_hooks={"response": [record]})
    async with http, Client(streamable_http_client(f"{deployment.url}/mcp", http_client=http), mode=mode) as client:
        return await action(client)


def _run(deployment: Deployment, key: str, mode: str, action: Any, statuses: list[int] | None = None) -> Any:
    return asyncio.run(_session(deployment, key, mode, action, statuses if statuses is not None else []))


async def _tool_names(client: Client) -> list[str]:
    return sorted(tool.name for tool in (await client.list_tools()).tools)


@pytest.mark.parametrize("mode", MODES)
def test_read_key_lists_and_calls_only_the_read_tool(deployment: Deployment, mode: str) -> None:
    """A read-only key sees just the read tool in tools/list and can call it."""

    async def action(client: Client) -> tuple[list[str], Any]:
        return await _tool_names(client), await client.call_tool("list_notes", {})

    names, result = _run(deployment, deployment.keys["read"], mode, action)
    assert names == ["list_notes"]
    assert result.is_error is False


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("mode", MODES)
def test_read_key_refused_on_write_tool(deployment: Deployment, mode: str) -> None:
    """A read-only key calling the write tool gets insufficient_scope naming mcp:write."""

    async def action(client: Client) -> str:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("add_note", {"text": "x"})
        return str(caught.value)

    statuses: list[int] = []
    assert "mcp:write" in _run(deployment, deployment.keys["read"], mode, action, statuses)
    assert 403 in statuses


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("mode", MODES)
def test_write_key_refused_on_destructive_tool(deployment: Deployment, mode: str) -> None:
    """A write key can add a note but is refused the destructive tool, which it does not even see."""

    async def action(client: Client) -> list[str]:
        await client.call_tool("add_note", {"text": "hello"})
        names = await _tool_names(client)
        with pytest.raises(MCPError, match="mcp:admin"):
            await client.call_tool("delete_all_notes", {})
        return names

    assert _run(deployment, deployment.keys["write"], mode, action) == ["add_note", "list_notes"]


@pytest.mark.parametrize("mode", MODES)
def test_admin_key_calls_everything_within_its_tenant(deployment: Deployment, mode: str) -> None:
    """An admin key sees and calls all three tools; another tenant's notes stay untouched."""

    async def add(client: Client) -> None:
        await client.call_tool("add_note", {"text": "globex private"})

    _run(deployment, deployment.keys["other"], mode, add)

    async def action(client: Client) -> tuple[list[str], Any, Any]:
        names = await _tool_names(client)
        await client.call_tool("add_note", {"text": "to delete"})
        deleted = await client.call_tool("delete_all_notes", {})
        return names, deleted, await client.call_tool("list_notes", {})

    names, deleted, after = _run(deployment, deployment.keys["admin"], mode, action)
    assert names == ["add_note", "delete_all_notes", "list_notes"]
    assert deleted.is_error is False
    assert after.structured_content == {"result": []}

    async def other_notes(client: Client) -> Any:
        return await client.call_tool("list_notes", {})

    remaining = _run(deployment, deployment.keys["other"], mode, other_notes)
    assert "globex private" in remaining.structured_content["result"]


def test_unauthenticated_request_gets_a_followable_challenge(deployment: Deployment) -> None:
    """No credential: 401 whose challenge points at metadata naming this resource."""
    response = httpx2.post(f"{deployment.url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge
    metadata_url = challenge.split('resource_metadata="', 1)[1].rstrip('"')
    assert metadata_url == f"{deployment.url}/.well-known/oauth-protected-resource/mcp"
    metadata = httpx2.get(metadata_url).json()
    assert metadata["resource"] == f"{deployment.url}/mcp"
    assert response.json()["error"]["code"] == -32001


def _legacy_post(url: str, key: str, body: dict[str, Any], session: str | None = None) -> httpx2.Response:
    headers = {
        "authorization": f"Bearer {key}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-11-25",
    }
    if session is not None:
        headers["mcp-session-id"] = session
    return httpx2.post(f"{url}/mcp", json=body, headers=headers)


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_hijack_with_another_key_refused(deployment: Deployment) -> None:
    """A session id opened by one key is 404 for any other key, even of the same tenant; its owner goes on."""
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    opened = _legacy_post(deployment.url, deployment.keys["admin"], init)
    session = opened.headers["mcp-session-id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert _legacy_post(deployment.url, deployment.keys["admin"], initialized, session).status_code == 202
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}
    for thief in ("other", "write"):
        stolen = _legacy_post(deployment.url, deployment.keys[thief], call, session)
        assert stolen.status_code == 404
        assert stolen.json()["error"]["data"]["error"] == "session_not_found"
    assert _legacy_post(deployment.url, deployment.keys["admin"], call, session).status_code == 200
    ended = httpx2.delete(
        f"{deployment.url}/mcp",
        headers={"authorization": f"Bearer {deployment.keys['admin']}", "mcp-session-id": session},
    )
    assert ended.status_code == 200
    assert _legacy_post(deployment.url, deployment.keys["admin"], call, session).status_code == 404


@pytest.mark.threat("T-SESSION-HIJACK")
def test_made_up_session_id_refused(deployment: Deployment) -> None:
    """A session id the guard never saw opened is 404, so guessing ids gets nothing forwarded."""
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    assert _legacy_post(deployment.url, deployment.keys["admin"], call, "0" * 32).status_code == 404
