"""Tenant argument pinning through the sidecar: the argument is hidden, set, and cannot be smuggled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, open_store
from sidecar.app import build_sidecar
from sidecar.demo_server import http_app
from sidecar.proxy import ProxySettings
from tests.conftest import cheap_keyring, free_port, make_keys, read_body, replaying, serve

MODERN = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2026-07-28",
}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


@dataclass
class BodyCapture:
    """Records the tools/call bodies (and every JSON-RPC body) the upstream receives."""

    app: Any
    calls: list[dict[str, Any]] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        document = json.loads(body)
        self.documents.append(document)
        if document.get("method") == "tools/call":
            self.calls.append(document)
        await self.app(scope, replaying(body, receive), send)


@dataclass
class Pinned:
    url: str
    capture: BodyCapture
    keys: dict[str, str]

    def call(self, label: str, tool: str, arguments: dict[str, Any] | bytes) -> httpx.Response:
        if isinstance(arguments, bytes):
            content = arguments
        else:
            payload = {"name": tool, "arguments": arguments, "_meta": META}
            content = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": payload}).encode()
        headers = MODERN | {"Mcp-Method": "tools/call", "Mcp-Name": tool, "Content-Type": "application/json"}
        headers["Authorization"] = f"Bearer {self.keys[label]}"
        return httpx.post(self.url + "/mcp", content=content, headers=headers)

    def result(self, label: str, tool: str, arguments: dict[str, Any]) -> Any:
        response = self.call(label, tool, arguments)
        assert response.status_code == 200, response.text
        return response.json()["result"]["structuredContent"]["result"]


@pytest.fixture(scope="module")
def pinned() -> Iterator[Pinned]:
    capture = BodyCapture(http_app())
    store = open_store("memory://")
    keys = make_keys(store, {"acme": ("acme", ["mcp:write"]), "globex": ("globex", ["mcp:write"])})
    with serve(capture) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}", tenant_argument="tenant_id"),
            proxy=ProxySettings(upstream=f"{upstream}/mcp"),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(app, port) as url:
            yield Pinned(url, capture, keys)


def test_pinned_argument_hidden_from_tools_list(pinned: Pinned) -> None:
    """No tool's input schema offers tenant_id to the client, in properties or required."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    headers = MODERN | {"Mcp-Method": "tools/list", "Authorization": f"Bearer {pinned.keys['acme']}"}
    tools = httpx.post(pinned.url + "/mcp", json=body, headers=headers).json()["result"]["tools"]
    assert tools
    for tool in tools:
        schema = tool["inputSchema"]
        assert "tenant_id" not in schema.get("properties", {})
        assert "tenant_id" not in schema.get("required", [])


def test_calls_are_pinned_to_the_bound_tenant(pinned: Pinned) -> None:
    """A call without tenant_id runs for the key's tenant, and tenants never see each other's items."""
    before = len(pinned.capture.calls)
    pinned.result("acme", "add_item", {"text": "acme-only"})
    assert pinned.capture.calls[before]["params"]["arguments"]["tenant_id"] == "acme"
    assert "acme-only" in pinned.result("acme", "list_items", {})
    assert "acme-only" not in pinned.result("globex", "list_items", {})


def test_own_tenant_named_explicitly_is_accepted(pinned: Pinned) -> None:
    """Naming one's own tenant is not an attack: the call goes through unchanged in meaning."""
    assert pinned.result("acme", "list_items", {"tenant_id": "acme"}) is not None


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize(
    "arguments",
    [
        {"tenant_id": "globex"},
        {"tenant_id": "ACME"},
        {"Tenant_ID": "globex"},
        {"text": "x", "options": {"tenant_id": "globex"}},
        {"text": "x", "batch": [{"tenant_id": "globex"}]},
        {"tenant_id": ["acme", "globex"]},
        {"tenant_id": None},
    ],
    ids=["other", "case", "key-case", "nested", "in-list", "list-value", "null"],
)
def test_smuggled_tenant_argument_refused(pinned: Pinned, arguments: dict[str, Any]) -> None:
    """Any tenant_id that is not exactly the bound tenant, however spelled or nested, is 403 and not forwarded."""
    before = len(pinned.capture.calls)
    response = pinned.call("acme", "add_item", {"text": "x"} | arguments)
    assert response.status_code == 403
    assert response.json()["error"]["data"]["error"] == "tenant_mismatch"
    assert len(pinned.capture.calls) == before


@pytest.mark.threat("T-PARSE-DIFF")
def test_duplicate_tenant_key_refused(pinned: Pinned) -> None:
    """Two tenant_id keys (first- vs last-wins) are refused by the parser before pinning."""
    before = len(pinned.capture.calls)
    raw = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_items",'
        b'"arguments":{"tenant_id":"acme","tenant_id":"globex"},"_meta":' + json.dumps(META).encode() + b"}}"
    )
    assert pinned.call("acme", "list_items", raw).status_code == 400
    assert len(pinned.capture.calls) == before


def get_prompt(pinned: Pinned, label: str, arguments: dict[str, Any]) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "prompts/get",
        "params": {"name": "summarize_items", "arguments": arguments, "_meta": META},
    }
    headers = MODERN | {"Mcp-Method": "prompts/get", "Mcp-Name": "summarize_items", "Content-Type": "application/json"}
    return httpx.post(
        pinned.url + "/mcp", json=body, headers=headers | {"Authorization": f"Bearer {pinned.keys[label]}"}
    )


@pytest.mark.threat("T-TENANT-SPOOF")
def test_prompt_arguments_are_pinned_like_tool_arguments(pinned: Pinned) -> None:
    """prompts/get fills a prompt from its arguments as a tool runs on its own: another tenant named there is
    refused (403), and a prompt asked without one is built for the key's tenant."""
    assert get_prompt(pinned, "acme", {"tenant_id": "globex"}).status_code == 403
    assert get_prompt(pinned, "acme", {"Tenant_ID": "globex"}).status_code == 403
    built = get_prompt(pinned, "acme", {})
    assert built.status_code == 200, built.text
    text = json.dumps(built.json()["result"])
    assert "acme" in text
    assert "globex" not in text


def complete(pinned: Pinned, params: dict[str, Any]) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "completion/complete", "params": params | {"_meta": META}}
    headers = MODERN | {"Mcp-Method": "completion/complete", "Content-Type": "application/json"}
    return httpx.post(
        pinned.url + "/mcp", json=body, headers=headers | {"Authorization": f"Bearer {pinned.keys['acme']}"}
    )


@pytest.mark.threat("T-TENANT-SPOOF")
def test_completion_never_completes_across_tenants(pinned: Pinned) -> None:
    """A completion request is answered from the arguments already given: another tenant named there is refused
    (403), the caller's own is always among them when it reaches the server, and the pinned argument itself is
    never completed (that would list the tenants sharing a prefix)."""
    ref = {"type": "ref/prompt", "name": "summarize_items"}
    item = {"name": "text", "value": "a"}
    before = len(pinned.capture.documents)
    assert complete(pinned, {"ref": ref, "argument": {"name": "tenant_id", "value": "g"}}).status_code == 403
    assert complete(pinned, {"ref": ref, "argument": {"name": "TENANT_ID", "value": "g"}}).status_code == 403
    named = {"ref": ref, "argument": item, "context": {"arguments": {"tenant_id": "globex"}}}
    assert complete(pinned, named).status_code == 403
    assert pinned.capture.documents[before:] == []
    complete(pinned, {"ref": ref, "argument": item})
    (sent,) = [d for d in pinned.capture.documents[before:] if d.get("method") == "completion/complete"]
    assert sent["params"]["context"]["arguments"] == {"tenant_id": "acme"}


@pytest.mark.threat("T-TENANT-SPOOF")
def test_pinned_argument_hidden_from_prompts_list(pinned: Pinned) -> None:
    """No prompt offers tenant_id to the client either: prompts/list answers lose it, whatever else they list."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "prompts/list", "params": {"_meta": META}}
    headers = MODERN | {"Mcp-Method": "prompts/list", "Authorization": f"Bearer {pinned.keys['acme']}"}
    prompts = httpx.post(pinned.url + "/mcp", json=body, headers=headers).json()["result"]["prompts"]
    (summarize,) = [prompt for prompt in prompts if prompt["name"] == "summarize_items"]
    assert "arguments" in summarize
    assert [argument["name"] for argument in summarize["arguments"]] == []
