"""Spellings of one request that the guard and the upstream could read differently, tried on real sockets.

Each test sends what a client may put on the wire (a path, a header set, a body, a framing) and checks that
the guard's decision holds for what the upstream MCP server actually receives and acts on.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, MCPGuard, open_store
from sidecar.app import build_sidecar
from sidecar.demo_server import build_server, http_app
from sidecar.proxy import ProxySettings
from tests.conftest import cheap_keyring, free_port, make_keys, read_body, replaying, serve

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


@dataclass
class Arrival:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class Recorder:
    """An ASGI shim in front of an MCP server that records every request reaching it, body included."""

    app: Any
    arrivals: list[Arrival] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        headers: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        self.arrivals.append(Arrival(scope["method"], scope["path"], headers, body))
        await self.app(scope, replaying(body, receive), send)

    def client_calls(self, before: int, mcp_path: str = "/mcp") -> list[Arrival]:
        """Forwarded client requests (they carry the guard's identity headers) served by the MCP endpoint."""
        return [a for a in self.arrivals[before:] if "x-mcpguard-tenant" in a.headers and a.path == mcp_path]


@dataclass
class Rig:
    port: int
    upstream: Recorder
    keys: dict[str, str]


KEYS = {
    "read": ("acme", ["mcp:read"]),
    "write": ("acme", ["mcp:write"]),
    "admin": ("acme", ["mcp:admin"]),
    "globex": ("globex", ["mcp:write"]),
}


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    recorder = Recorder(http_app())
    store = open_store("memory://")
    keys = make_keys(store, KEYS)
    with serve(recorder) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}", tenant_argument="tenant_id"),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", read_timeout=5),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(app, port):
            yield Rig(port, recorder, keys)


def wire(port: int, target: str, body: bytes, headers: list[str], *, method: str = "POST") -> tuple[int, bytes]:
    """Send one request exactly as written (no client-side URL or header normalisation); its status and body."""
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close", *headers]
    if not any(line.lower().startswith(("content-length:", "transfer-encoding:")) for line in headers):
        head.append(f"Content-Length: {len(body)}")
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        while chunk := conn.recv(65536):
            answer += chunk
    while answer.startswith(b"HTTP/1.1 100"):
        answer = answer.split(b"\r\n\r\n", 1)[1]
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def modern_headers(key: str, method: str = "tools/call", name: str | None = "delete_items") -> list[str]:
    headers = [
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"MCP-Protocol-Version: {MODERN}",
        f"Mcp-Method: {method}",
    ]
    return [*headers, f"Mcp-Name: {name}"] if name is not None else headers


def tool_call(name: str, arguments: dict[str, Any]) -> bytes:
    params = {"name": name, "arguments": arguments, "_meta": META}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()


def destructive_calls(arrivals: list[Arrival]) -> list[Arrival]:
    return [a for a in arrivals if b"tools/call" in a.body and b"delete_items" in a.body]


DELETE = tool_call("delete_items", {"tenant_id": "acme"})

# Guarded spellings (normalised or refused by the guard) and spellings that reached the upstream's /mcp
# classified as plain HTTP routes: `?` and `#` decoded from the path, `%25`-escapes, and tab/CR/LF.
PATHS = [
    "/MCP",
    "/mcp/",
    "//mcp",
    "/mcp;x",
    "/%6Dcp",
    "/./mcp",
    "/x/../mcp",
    "/acme%2Fother/mcp",
    "/acme/../other/mcp",
    "/mcp?x=1",
    "/mcp/x/..%3F",
    "/mcp%3F",
    "/mcp%3Fx=1",
    "/mcp%23",
    "/%256Dcp",
    "/mcp%09",
    "/mcp%0A",
    "/mcp%0D",
]


@pytest.mark.threat("T-PATH-EVASION", "T-SCOPE-ESCALATE")
@pytest.mark.parametrize("path", PATHS)
def test_path_spelling_cannot_bypass_tool_scopes(rig: Rig, path: str) -> None:
    """However the MCP path is spelled, a write key's call of a destructive tool (admin only) never runs."""
    before = len(rig.upstream.arrivals)
    status, body = wire(rig.port, path, DELETE, modern_headers(rig.keys["write"]))
    assert status >= 300, body
    assert destructive_calls(rig.upstream.client_calls(before)) == []


@pytest.mark.threat("T-PATH-EVASION", "T-TENANT-SPOOF")
@pytest.mark.parametrize("path", ["/mcp", "/mcp%3F", "/%256Dcp"])
def test_path_spelling_cannot_bypass_tenant_pinning(rig: Rig, path: str) -> None:
    """The pinned tenant argument is set to the caller's tenant on every spelling of the MCP path: a globex
    key never gets a tool call naming tenant acme to the upstream."""
    before = len(rig.upstream.arrivals)
    body = tool_call("list_items", {"tenant_id": "acme"})
    wire(rig.port, path, body, modern_headers(rig.keys["globex"], name="list_items"))
    named = [a.body for a in rig.upstream.client_calls(before) if b"list_items" in a.body]
    assert all(json.loads(sent)["params"]["arguments"]["tenant_id"] == "globex" for sent in named)


def open_legacy_session(rig: Rig, key: str) -> str:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    headers = {
        "Authorization": f"Bearer {key}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": LEGACY,
    }
    opened = httpx.post(f"http://127.0.0.1:{rig.port}/mcp", json=init, headers=headers, timeout=10)
    assert opened.status_code == 200
    return opened.headers["mcp-session-id"]


def legacy_headers(key: str, *session_lines: str) -> list[str]:
    return [
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"MCP-Protocol-Version: {LEGACY}",
        *session_lines,
    ]


LIST = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).encode()


@pytest.mark.threat("T-SESSION-HIJACK")
@pytest.mark.parametrize(
    ("path", "sessions"),
    [
        ("/mcp", ["Mcp-Session-Id: {victim}", "mcp-session-id: {own}"]),
        ("/mcp", ["Mcp-Session-Id: {own}", "MCP-SESSION-ID: {victim}"]),
        ("/mcp", ["Mcp-Session-Id: {own}, {victim}"]),
        ("/mcp", ["Mcp-Session-Id: {victim}, {own}"]),
        ("/mcp%3F", ["Mcp-Session-Id: {victim}"]),
        ("/mcp%23", ["Mcp-Session-Id: {victim}"]),
    ],
)
def test_session_hijack_with_another_tenants_id_refused(rig: Rig, path: str, sessions: list[str]) -> None:
    """Another tenant's session id, sent twice, comma-joined or on a path spelling, never reaches the upstream."""
    victim = open_legacy_session(rig, rig.keys["admin"])
    own = open_legacy_session(rig, rig.keys["globex"])
    lines = [line.format(victim=victim, own=own) for line in sessions]
    before = len(rig.upstream.arrivals)
    status, body = wire(rig.port, path, LIST, legacy_headers(rig.keys["globex"], *lines))
    assert status in (400, 404), body
    leaked = [a for a in rig.upstream.arrivals[before:] if victim in json.dumps(a.headers)]
    assert leaked == []


ECHO = tool_call("echo", {"text": "ambiguous-headers"})
READ_HEADERS = modern_headers("{read}", name="echo")


@pytest.mark.threat("T-PARSE-DIFF", "T-DNS-REBIND", "T-SMUGGLE")
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["Authorization: Bearer {globex}"], 401),
        (["authorization: Bearer {globex}"], 401),
        (["Mcp-Method: tools/list"], 400),
        (["mcp-method: tools/call"], 400),
        (["MCP-NAME: delete_items"], 400),
        (["Host: evil.example"], 421),
        (["Content-Length: {length}", "Content-Length: 5"], 400),
        (["Content-Length: +{length}"], 400),
        (["Transfer-Encoding: chunked", "Content-Length: {length}"], 400),
    ],
)
def test_duplicated_headers_are_refused_not_read_one_way(rig: Rig, extra: list[str], expected: int) -> None:
    """A header the guard decides on, sent a second time under any case, is refused: never checked on one copy
    while the upstream reads the other."""
    values = {"read": rig.keys["read"], "globex": rig.keys["globex"], "length": len(ECHO)}
    lines = [line.format(**values) for line in READ_HEADERS + extra]
    before = len(rig.upstream.arrivals)
    status, body = wire(rig.port, "/mcp", ECHO, lines)
    assert status == expected, body
    assert rig.upstream.client_calls(before) == []


def test_encoded_mcp_name_is_compared_after_decoding(rig: Rig) -> None:
    """An Mcp-Name in its base64 form is decoded before it is compared with the body's tool name."""
    headers = modern_headers(rig.keys["read"], name="=?base64?ZGVsZXRlX2l0ZW1z?=")  # delete_items
    before = len(rig.upstream.arrivals)
    status, _ = wire(rig.port, "/mcp", ECHO, headers)
    assert status == 400
    assert rig.upstream.client_calls(before) == []


def raw_call(method: str, params: str, rid: str = "1") -> bytes:
    return f'{{"jsonrpc":"2.0","id":{rid},"method":{method},"params":{params}}}'.encode()


ARGS = '{"name":"delete_items","arguments":{"tenant_id":"acme"}}'
BODIES = {
    "method twice": b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":' + ARGS.encode() + b"}",
    "name twice": raw_call('"tools/call"', '{"name":"echo","name":"delete_items","arguments":{"tenant_id":"acme"}}'),
    "batch": b"[" + DELETE + b"]",
    "byte order mark": b"\xef\xbb\xbf" + DELETE,
    "utf-16": DELETE.decode().encode("utf-16"),
    "utf-16 without bom": DELETE.decode().encode("utf-16-le"),
    "huge id": raw_call('"tools/call"', ARGS, rid="1e400"),
    "deep nesting": raw_call('"tools/call"', ARGS.replace('"acme"', '"acme","x":' + "[" * 200 + "]" * 200)),
    "nul after method": raw_call('"tools/call\\u0000"', ARGS),
    "escaped method": raw_call('"tools\\u002fcall"', ARGS),
    "escaped name": raw_call('"tools/call"', ARGS.replace("delete_items", "delete\\u005fitems")),
    "params array": raw_call('"tools/call"', '["delete_items",{"tenant_id":"acme"}]'),
}


@pytest.mark.threat("T-PARSE-DIFF", "T-SCOPE-ESCALATE")
@pytest.mark.parametrize("label", list(BODIES))
def test_ambiguous_body_cannot_smuggle_a_destructive_call(rig: Rig, label: str) -> None:
    """Bodies two JSON parsers could read differently are refused, or decided on the tool the server will run."""
    before = len(rig.upstream.arrivals)
    status, body = wire(rig.port, "/mcp", BODIES[label], modern_headers(rig.keys["write"]))
    assert 400 <= status < 500, body
    assert destructive_calls(rig.upstream.client_calls(before)) == []


@pytest.mark.threat("T-PARSE-DIFF")
def test_lone_surrogate_the_server_cannot_read_is_refused_not_a_crash(rig: Rig) -> None:
    """JSON the guard's parser accepts but the server's rejects (a lone surrogate) gets a clear 4xx refusal
    when the tenant argument is pinned, not an unhandled server error."""
    body = tool_call("echo", {"text": "x"}).replace(b'"x"', b'"\\ud800"')
    status, answer = wire(rig.port, "/mcp", body, modern_headers(rig.keys["read"], name="echo"))
    assert 400 <= status < 500, answer


@pytest.mark.threat("T-SMUGGLE", "T-SCOPE-ESCALATE")
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_body_on_get_or_delete_is_not_forwarded_unparsed(rig: Rig, method: str) -> None:
    """GET and DELETE are decided without reading a body (read scope), so a JSON-RPC call riding on one
    must be refused or dropped, never handed to the upstream to interpret."""
    before = len(rig.upstream.arrivals)
    headers = modern_headers(rig.keys["read"])
    wire(rig.port, "/mcp", DELETE, headers, method=method)
    assert [a for a in rig.upstream.arrivals[before:] if a.body] == []


@pytest.mark.threat("T-SMUGGLE", "T-SCOPE-ESCALATE")
def test_expect_continue_does_not_skip_the_decision(rig: Rig) -> None:
    """With Expect: 100-continue the body is still read and decided on before anything is forwarded."""
    before = len(rig.upstream.arrivals)
    status, _ = wire(rig.port, "/mcp", DELETE, [*modern_headers(rig.keys["write"]), "Expect: 100-continue"])
    assert status == 403
    assert destructive_calls(rig.upstream.client_calls(before)) == []


@pytest.mark.threat("T-PATH-EVASION", "T-SCOPE-ESCALATE")
def test_upstream_endpoint_at_another_path_cannot_bypass_mcp_rules() -> None:
    """When the upstream serves MCP at a path other than the guard's, that path is not a way around the guard."""
    recorder = Recorder(build_server().streamable_http_app(streamable_http_path="/api/v1/mcp", host="127.0.0.1"))
    store = open_store("memory://")
    key = make_keys(store, {"write": ("acme", ["mcp:write"])})["write"]
    with serve(recorder) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(upstream=f"{upstream}/api/v1/mcp", read_timeout=5),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(app, port):
            guarded, _ = wire(port, "/mcp", DELETE, modern_headers(key))
            status, body = wire(port, "/api/v1/mcp", DELETE, modern_headers(key))
    assert guarded == 403
    assert status >= 300, body
    assert destructive_calls(recorder.client_calls(0, "/api/v1/mcp")) == []


@pytest.mark.threat("T-PATH-EVASION", "T-SCOPE-ESCALATE")
def test_root_path_cannot_bypass_mcp_rules_of_embedded_guard() -> None:
    """Behind a prefix-stripping proxy (uvicorn --root-path), the app still routes /mcp to its MCP endpoint,
    so the guard must still apply MCP rules there: a write key cannot call a destructive tool."""
    store = open_store("memory://")
    key = make_keys(store, {"write": ("acme", ["mcp:write"])})["write"]
    port = free_port()
    app = MCPGuard(http_app(), GuardConfig(public_url=f"http://127.0.0.1:{port}"), keys=cheap_keyring(store))
    with serve(app, port, root_path="/svc/v1"):
        status, body = wire(port, "/mcp", DELETE, modern_headers(key))
    assert status == 403, body
