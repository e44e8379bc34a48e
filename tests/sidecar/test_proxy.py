"""The sidecar in front of an unchanged MCP server: real sockets, the real ``mcp`` client, both eras."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider
from starlette.types import Receive, Scope, Send

from mcpguard import AssertionSigner, GuardConfig, Telemetry, open_store
from mcpguard.audit import SQLiteAuditStore
from sidecar.app import build_sidecar
from sidecar.demo_server import http_app
from sidecar.proxy import ProxySettings, UpstreamProxy
from tests.conftest import LEGACY_HEADERS, LEGACY_INITIALIZE, cheap_keyring, free_port, make_keys, serve

MODES = ["legacy", "auto"]
CLIENTS = ["aiohttp", "pool"]
UPSTREAM_SECRET = "upstream-credential-not-for-clients"


@dataclass
class Capture:
    """An ASGI shim in front of the demo server that records the headers the upstream receives."""

    app: Any
    headers: list[dict[str, list[str]]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen: dict[str, list[str]] = {}
            for name, value in scope["headers"]:
                seen.setdefault(name.decode().lower(), []).append(value.decode("latin-1"))
            self.headers.append(seen)
        await self.app(scope, receive, send)


@dataclass
class Stack:
    url: str
    upstream: str
    capture: Capture
    keys: dict[str, str]


@pytest.fixture(scope="module", params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    """Each upstream client the proxy can forward with."""
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def stack(client: str) -> Iterator[Stack]:
    capture = Capture(http_app())
    store = open_store("memory://")
    keys = make_keys(
        store,
        {
            "read": ("acme", ["mcp:read"]),
            "write": ("acme", ["mcp:write"]),
            "admin": ("acme", ["mcp:admin"]),
            "globex": ("globex", ["mcp:admin"]),
        },
    )
    with serve(capture) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(
                upstream=f"{upstream}/mcp",
                inject_headers={"Authorization": f"Bearer {UPSTREAM_SECRET}"},
                read_timeout=5,
                client=client,
            ),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(app, port) as url:
            yield Stack(url, upstream, capture, keys)


async def _with_client(stack: Stack, key: str, mode: str, action: Any, path: str = "/mcp") -> Any:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
    async with http, Client(streamable_http_client(stack.url + path, http_client=http), mode=mode) as client:
        return await action(client)


def run(stack: Stack, key: str, mode: str, action: Any, path: str = "/mcp") -> Any:
    return asyncio.run(_with_client(stack, key, mode, action, path))


@pytest.mark.parametrize("mode", MODES)
def test_tools_resources_prompts_through_the_sidecar(stack: Stack, mode: str) -> None:
    """Through the sidecar a write key lists the tools it may call, calls one, reads a resource and a prompt."""

    async def action(client: Client) -> tuple[list[str], Any, Any, Any]:
        names = sorted(t.name for t in (await client.list_tools()).tools)
        added = await client.call_tool("add_item", {"tenant_id": "acme", "text": "hello"})
        resource = await client.read_resource("demo://readme")
        prompts = await client.list_prompts()
        return names, added, resource, prompts

    names, added, resource, prompts = run(stack, stack.keys["write"], mode, action)
    assert "delete_items" not in names
    assert {"add_item", "list_items", "echo"} <= set(names)
    assert added.is_error is False
    assert resource.contents
    assert prompts.prompts


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("mode", MODES)
def test_destructive_tool_refused_for_write_key_through_sidecar(stack: Stack, mode: str) -> None:
    """The upstream's own annotations decide: its destructive tool needs admin through the sidecar."""

    async def action(client: Client) -> str:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("delete_items", {"tenant_id": "acme"})
        return str(caught.value)

    assert "mcp:admin" in run(stack, stack.keys["write"], mode, action)


@pytest.mark.parametrize("mode", MODES)
def test_progress_arrives_incrementally(stack: Stack, mode: str) -> None:
    """Progress notifications from a slow tool reach the client while the tool still runs."""
    arrivals: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append(time.monotonic())

    async def action(client: Client) -> Any:
        return await client.call_tool("slow_count", {"n": 4}, progress_callback=on_progress)

    start = time.monotonic()
    result = run(stack, stack.keys["read"], mode, action)
    done = time.monotonic()
    assert result.is_error is False
    if mode == "legacy":
        assert len(arrivals) == 4
        # The first notification is seen well before the call completes: nothing held it back.
        assert arrivals[0] - start < (done - start) * 0.75


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_client_credentials_never_reach_the_upstream(stack: Stack) -> None:
    """The upstream sees its own injected credential, never the client's key or cookies."""
    before = len(stack.capture.headers)
    key = stack.keys["read"]
    response = list_tools_with(
        stack,
        {"Cookie": "session=client-cookie", "Proxy-Authorization": "Basic Y2xpZW50", "X-MCPGuard-Tenant": "globex"},
    )
    assert response.status_code == 200
    seen = [h for h in stack.capture.headers[before:] if "x-mcpguard-tenant" in h]
    assert seen
    for headers in seen:
        assert headers["authorization"] == [f"Bearer {UPSTREAM_SECRET}"]
        flat = json.dumps(headers)
        assert key not in flat
        assert "client-cookie" not in flat
        assert "proxy-authorization" not in headers
        assert headers["x-mcpguard-tenant"] == ["acme"]
        assert headers["host"] == [stack.upstream.removeprefix("http://")]


def _meta() -> dict[str, Any]:
    return {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    }


def _modern(method: str, name: str | None = None) -> dict[str, str]:
    headers = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": method,
    }
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def list_tools_with(stack: Stack, headers: dict[str, str]) -> httpx.Response:
    """A stateless tools/list through the sidecar with the read key and ``headers``; the upstream records it."""
    return httpx.post(
        stack.url + "/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": _meta()},
        headers={"Authorization": f"Bearer {stack.keys['read']}", **headers, **_modern("tools/list")},
    )


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_hijack_through_sidecar_refused(stack: Stack) -> None:
    """A legacy session opened by one key is 404 for another key and nothing reaches the upstream."""
    init, common = LEGACY_INITIALIZE, LEGACY_HEADERS
    owner = {"Authorization": f"Bearer {stack.keys['admin']}"}
    opened = httpx.post(stack.url + "/mcp", json=init, headers=common | owner)
    session = opened.headers["mcp-session-id"]
    before = len(stack.capture.headers)
    stolen = httpx.post(
        stack.url + "/mcp",
        json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        headers=common | {"Authorization": f"Bearer {stack.keys['globex']}", "Mcp-Session-Id": session},
    )
    assert stolen.status_code == 404
    assert len(stack.capture.headers) == before


def test_health_and_readiness(stack: Stack) -> None:
    """/healthz answers without credentials; /readyz reports the store and upstream ready."""
    assert httpx.get(stack.url + "/healthz").status_code == 200
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["problems"] == []


@contextmanager
def lone_sidecar(proxy: ProxySettings) -> Iterator[tuple[str, str]]:
    """A sidecar with one admin key in front of ``proxy.upstream``; yields its URL and the key."""
    store = open_store("memory://")
    key = make_keys(store, {"admin": ("acme", ["mcp:admin"])})["admin"]
    port = free_port()
    app = build_sidecar(
        config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        proxy=proxy,
        store=store,
        keys=cheap_keyring(store),
    )
    with serve(app, port) as url:
        yield url, key


def ping(url: str, key: str, rid: int) -> httpx.Response:
    return httpx.post(
        url + "/mcp",
        json={"jsonrpc": "2.0", "id": rid, "method": "ping"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_upstream_down_is_a_clear_502(client: str) -> None:
    """With nothing listening upstream, a call gets 502 with a JSON-RPC error body, promptly."""
    proxy = ProxySettings(upstream=f"http://127.0.0.1:{free_port()}/mcp", connect_timeout=2, client=client)
    with lone_sidecar(proxy) as (url, key):
        response = ping(url, key, 3)
        ready = httpx.get(url + "/readyz")
    assert response.status_code == 502
    assert response.json()["id"] == 3
    assert response.json()["error"]["data"]["error"] == "bad_gateway"
    assert ready.status_code == 503


def test_hanging_upstream_times_out_with_504(client: str) -> None:
    """An upstream that accepts but never answers gets a 504 JSON-RPC error after the read timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    proxy = ProxySettings(upstream=f"http://127.0.0.1:{listener.getsockname()[1]}/mcp", read_timeout=1, client=client)
    try:
        with lone_sidecar(proxy) as (url, key):
            response = ping(url, key, 4)
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert response.status_code == 504
    assert response.json()["error"]["data"]["error"] == "gateway_timeout"


@contextmanager
def canned_upstream(answer: bytes) -> Iterator[str]:
    """An upstream on 127.0.0.1 that answers every request, on every connection, with exactly ``answer``."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer_each(connection: socket.socket) -> None:
        connection.settimeout(5)
        with connection, suppress(OSError):
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                connection.sendall(answer)

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer_each, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize(
    ("method", "answer", "length"),
    [
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n", None),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 8\r\n\r\n', None),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n", "8"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", None),
    ],
    ids=["204", "304", "head", "head-chunked"],
)
def test_answer_without_a_body_is_relayed_without_one(
    client: str, method: str, answer: bytes, length: str | None
) -> None:
    """An upstream 204 or 304 announcing a length, or an answer to HEAD, reaches the client with no body and the
    relay raises nothing: the 204's or 304's Content-Length is dropped, a HEAD's is kept as the upstream gave it."""
    failures: list[BaseException] = []
    with canned_upstream(answer) as origin:
        proxy = UpstreamProxy(ProxySettings(upstream=f"{origin}/mcp", client=client, read_timeout=2))

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await proxy(scope, receive, send)
            except BaseException as error:
                failures.append(error)
                raise

        with serve(app) as url, httpx.Client(base_url=url, timeout=5) as http:
            responses = [http.request(method, "/mcp") for _ in range(2)]
    status = int(answer.split(b" ", 2)[1])
    seen = [(r.status_code, r.headers.get("content-length"), r.content) for r in responses]
    assert seen == [(status, length, b"")] * 2
    assert failures == []


def test_signed_assertion_reaches_the_upstream_and_verifies(client: str) -> None:
    """With a signer configured, the upstream gets an EdDSA assertion of the principal, for itself only."""
    signing_key = Ed25519PrivateKey.generate()
    capture = Capture(http_app())
    store = open_store("memory://")
    key = make_keys(store, {"ci": ("acme", ["mcp:read"])})["ci"]
    with serve(capture) as upstream:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        signer = AssertionSigner(key=signing_key, issuer=origin, audience=f"{upstream}/mcp")
        app = build_sidecar(
            config=GuardConfig(public_url=origin),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", client=client),
            store=store,
            keys=cheap_keyring(store),
            assertions=signer,
        )
        with serve(app, port) as url:
            response = httpx.post(
                url + "/mcp",
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": _meta()},
                headers={"Authorization": f"Bearer {key}", **_modern("tools/list")},
            )
    assert response.status_code == 200
    assertion = next(h["x-mcpguard-assertion"][0] for h in capture.headers if "x-mcpguard-assertion" in h)
    claims = jwt.decode(
        assertion, signing_key.public_key(), algorithms=["EdDSA"], audience=f"{upstream}/mcp", issuer=origin
    )
    assert claims["tenant"] == "acme"
    assert claims["sub"] == "key:ci"
    assert claims["scope"] == "mcp:read"
    assert claims["exp"] - claims["iat"] == 60
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(assertion, signing_key.public_key(), algorithms=["EdDSA"], audience="http://elsewhere/mcp")


@pytest.mark.threat("T-TENANT-SPOOF")
def test_forged_assertion_header_from_client_is_dropped(stack: Stack) -> None:
    """A client-sent X-MCPGuard-Assertion never reaches the upstream (the whole X-MCPGuard-* family is stripped)."""
    before = len(stack.capture.headers)
    response = list_tools_with(stack, {"X-MCPGuard-Assertion": "forged.token.value"})
    assert response.status_code == 200
    for headers in stack.capture.headers[before:]:
        assert "forged.token.value" not in json.dumps(headers)


@pytest.mark.threat("T-HEADER-UNDERSCORE")
def test_underscored_twins_of_guarded_headers_never_reach_the_upstream(stack: Stack) -> None:
    """Servers that read headers CGI-style (Django, Rack, PHP) fold "_" into "-": a client's X_MCPGuard_Tenant,
    Mcp_Session_Id or X_Forwarded_For would reach them as the headers the guard writes or checks. No header
    with an underscore in its name is forwarded, so the upstream reads each of them as the guard decided it."""
    before = len(stack.capture.headers)
    response = list_tools_with(
        stack,
        {
            "X_MCPGuard_Tenant": "globex",
            "x_mcpguard_scopes": "mcp:admin",
            "Mcp_Session_Id": "someone-elses-session",
            "X_Forwarded_For": "203.0.113.9",
        },
    )
    assert response.status_code == 200
    seen = stack.capture.headers[before:]
    assert seen
    for headers in seen:
        assert not [name for name in headers if "_" in name]
        folded: dict[str, list[str]] = {}
        for name, values in headers.items():
            folded.setdefault(name.replace("_", "-"), []).extend(values)
        assert folded["x-mcpguard-tenant"] == ["acme"]
        assert "mcp:admin" not in folded["x-mcpguard-scopes"][0]
        assert "mcp-session-id" not in folded
        assert "203.0.113.9" not in json.dumps(folded)


def _ours(found: object) -> bool:
    return type(found).__module__.split(".")[0] in ("mcpguard", "sidecar")


def test_finished_calls_leave_nothing_to_the_cycle_collector(client: str) -> None:
    """Every object the guard and proxy make for a call (audited, refused, streamed or listed) is freed by
    reference counting when the call ends: left in a reference cycle, each call's request state would wait for
    the cycle collector, whose passes cost a loaded sidecar several per cent and pause every call in flight."""
    store = open_store("memory://")
    keys = make_keys(store, {"read": ("acme", ["mcp:read"])})
    audit = SQLiteAuditStore(":memory:")
    telemetry = Telemetry(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    with serve(http_app()) as upstream:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", client=client),
            store=store,
            keys=cheap_keyring(store),
            audit=audit,
            telemetry=telemetry,
        )
        with serve(app, port) as url, httpx.Client(base_url=url, timeout=10) as client:
            auth = {"Authorization": f"Bearer {keys['read']}"}

            def calls() -> list[int]:
                def rpc(method: str, params: dict[str, Any], name: str | None = None) -> int:
                    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params | _meta()}
                    return client.post("/mcp", json=body, headers=_modern(method, name) | auth).status_code

                return [
                    rpc("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, "echo"),
                    rpc("tools/call", {"name": "slow_count", "arguments": {"n": 2}}, "slow_count"),
                    rpc("tools/call", {"name": "delete_items", "arguments": {"tenant_id": "acme"}}, "delete_items"),
                    rpc("tools/list", {}),
                    client.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "ping"}).status_code,
                ]

            assert calls() == [200, 200, 403, 200, 401]  # warm: the catalog is fetched, pools are open
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                statuses = calls()
                gc.collect()
                cycled = sorted({type(found).__qualname__ for found in gc.garbage if _ours(found)})
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    asyncio.run(audit.close())
    assert statuses == [200, 200, 403, 200, 401]
    assert cycled == []
