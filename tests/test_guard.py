"""The guard stack over a real socket: every refusal path tried against a recording app behind it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import argon2
import httpx
import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider
from starlette.types import Receive, Scope, Send

from mcpguard import (
    GuardConfig,
    KeyRecord,
    KeyRing,
    MCPGuard,
    StorageUnavailable,
    Telemetry,
    build_guard,
    current_principal,
    open_store,
    stack_names,
)
from mcpguard.audit import SQLiteAuditStore
from mcpguard.keys import generate_key
from tests.conftest import answer_lifespan, free_port, read_body, serve
from tests.test_keys import checksummed

TOOLS: list[Mapping[str, Any]] = [
    {"name": "read_tool", "annotations": {"readOnlyHint": True}},
    {"name": "write_tool", "annotations": {"readOnlyHint": False, "destructiveHint": False}},
    {"name": "drop_tool", "annotations": {"destructiveHint": True}},
    {"name": "bare_tool"},
]


async def list_tools(host: str | None) -> list[Mapping[str, Any]]:
    """The tools the app behind the guard declares."""
    return TOOLS


@dataclass
class Seen:
    """One request as the app behind the guard received it."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    tenant: str | None


@dataclass
class RecordingApp:
    """An app that records what reaches it and answers 200 (or a slow stream on /stream)."""

    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        principal = current_principal()
        self.seen.append(
            Seen(scope["method"], scope["path"], scope["headers"], body, principal.tenant if principal else None)
        )
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            await anyio.to_thread.run_sync(self.release.wait, 10)
            await send({"type": "http.response.body", "body": b"second\n"})
            return
        if b'"tools/list"' in body:
            answer = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": TOOLS}}).encode()
            if (b"x-test-deep", b"1") in scope["headers"]:
                # Every tool, then nesting deeper than Python's JSON parser can read.
                answer = answer.replace(b"]}}", b", " + b"[" * 5000 + b"]" * 5000 + b"]}}")
        else:
            answer = b'{"jsonrpc":"2.0","id":1,"result":{}}'
        if (b"x-test-sse", b"1") in scope["headers"]:
            notice = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n'
            event = b"event: message\r\ndata: " + answer + b"\r\n\r\n"
            start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            await send(start)
            # Split mid-event so the filter has to reassemble it.
            await send({"type": "http.response.body", "body": notice + event[:20], "more_body": True})
            await send({"type": "http.response.body", "body": event[20:]})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})


class BrokenStore:
    """A key store whose backend is down."""

    url = "broken://"

    async def add_key(self, record: KeyRecord) -> None:
        raise StorageUnavailable("key store unavailable")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        raise StorageUnavailable("key store unavailable")

    async def list_keys(self, tenant: str) -> list[KeyRecord]:
        raise StorageUnavailable("key store unavailable")

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        raise StorageUnavailable("key store unavailable")

    async def close(self) -> None:
        return None


@dataclass
class Guarded:
    url: str
    app: RecordingApp
    keys: dict[str, str]
    key_ids: dict[str, str]


@pytest.fixture(scope="module")
def guarded() -> Iterator[Guarded]:
    store = open_store("memory://")
    ring = KeyRing(store=store, hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    labels = {
        "read": ("acme", ["mcp:read"]),
        "write": ("acme", ["mcp:write"]),
        "admin": ("acme", ["mcp:admin"]),
        "revoked": ("acme", ["mcp:admin"]),
        "globex": ("globex", ["mcp:admin"]),
    }

    async def make() -> tuple[dict[str, str], dict[str, str]]:
        keys, ids = {}, {}
        for label, (tenant, scopes) in labels.items():
            keys[label], record = await ring.create(tenant=tenant, scopes=scopes, name=label)
            ids[label] = record.key_id
        return keys, ids

    keys, ids = asyncio.run(make())
    app = RecordingApp()
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", max_body_bytes=64 * 1024, api_key_header="X-API-Key")
    # The key ring is handed over to the server's loop only after its keys are made.
    ring = KeyRing(store=store, hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    asyncio.run(ring.revoke(ids["revoked"]))
    with serve(MCPGuard(app, config, keys=ring, tool_lister=list_tools), port) as url:
        yield Guarded(url, app, keys, ids)


def rpc(method: str, params: dict[str, Any] | None = None, rid: int | None = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        message["id"] = rid
    if params is not None:
        message["params"] = params
    return message


def post(
    g: Guarded, key: str | None, body: Any, *, path: str = "/mcp", headers: dict[str, str] | None = None
) -> httpx.Response:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent.setdefault("content-type", "application/json")
    return httpx.post(g.url + path, content=content, headers=sent)


def call(g: Guarded, label: str, tool: str, **extra: Any) -> httpx.Response:
    return post(g, g.keys[label], rpc("tools/call", {"name": tool, "arguments": {}, **extra}))


def forwarded_after(g: Guarded, before: int) -> list[Seen]:
    return g.app.seen[before:]


def test_stack_order_is_decided_in_one_place() -> None:
    """build_guard assembles the layers in the documented order, audit, telemetry, authorization-server and
    rate-limit slots included."""

    def slot(name: str) -> Any:
        def make(app: Any) -> Any:
            layer = type(name, (), {"name": name, "app": app})()
            return layer

        return make

    store = SQLiteAuditStore(":memory:")
    telemetry = Telemetry(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    guard = build_guard(
        RecordingApp(),
        GuardConfig(),
        rate_limit=slot("rate_limit"),
        audit=store,
        telemetry=telemetry,
        authorization_server=slot("authorization_server"),
    )
    assert stack_names(guard) == [
        "entry",
        "telemetry",
        "audit",
        "errors",
        "public",
        "authorization_server",
        "origin",
        "parse",
        "authenticate",
        "tenant",
        "sessions",
        "rate_limit",
        "audit_api",
        "scopes",
        "audit_start",
    ]
    asyncio.run(store.close())


@pytest.mark.parametrize(
    ("label", "tool", "status"),
    [
        ("read", "read_tool", 200),
        ("read", "write_tool", 403),
        ("write", "write_tool", 200),
        ("write", "drop_tool", 403),
        ("write", "bare_tool", 403),
        ("admin", "drop_tool", 200),
        ("admin", "bare_tool", 200),
    ],
)
def test_tool_scopes_follow_server_annotations(guarded: Guarded, label: str, tool: str, status: int) -> None:
    """tools/call needs read, write or admin as the server's own annotations say."""
    assert call(guarded, label, tool).status_code == status


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_forged_client_annotations_are_ignored(guarded: Guarded) -> None:
    """Annotations a client puts in its own call do not lower the scope the tool needs."""
    before = len(guarded.app.seen)
    response = call(guarded, "read", "drop_tool", annotations={"readOnlyHint": True}, _meta={"readOnlyHint": True})
    assert response.status_code == 403
    assert forwarded_after(guarded, before) == []


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_unlisted_tool_refused_without_admin(guarded: Guarded) -> None:
    """A tool the server never listed needs admin, whatever its name suggests."""
    assert call(guarded, "write", "read_tool_but_unlisted").status_code == 403
    assert call(guarded, "admin", "read_tool_but_unlisted").status_code == 200


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_insufficient_scope_challenge_names_the_needed_scope(guarded: Guarded) -> None:
    """A scope refusal is 403 with an RFC 6750 challenge clients can step up from."""
    response = call(guarded, "read", "write_tool")
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="mcp:write"' in challenge
    assert f'resource_metadata="{guarded.url}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert response.json()["error"]["code"] == -32003
    assert response.json()["id"] == 1


def listing_answer(response: httpx.Response, *, sse: bool) -> Any:
    """The JSON-RPC answer to a tools/list: the body, or (SSE) the event after the progress notice."""
    if not sse:
        return response.json()
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert "notifications/progress" in events[0]
    return json.loads(events[1])


@pytest.mark.parametrize(
    ("label", "expected"),
    [("read", ["read_tool"]), ("write", ["read_tool", "write_tool"]), ("admin", [t["name"] for t in TOOLS])],
)
@pytest.mark.parametrize("sse", [False, True])
def test_tools_list_is_filtered_to_callable_tools(guarded: Guarded, label: str, expected: list[str], sse: bool) -> None:
    """A tools/list answer, JSON or SSE, names only the tools the caller may call."""
    response = post(guarded, guarded.keys[label], rpc("tools/list"), headers={"x-test-sse": "1"} if sse else None)
    assert response.status_code == 200
    payload = listing_answer(response, sse=sse)
    assert [tool["name"] for tool in payload["result"]["tools"]] == expected


@pytest.mark.threat("T-DEEP-JSON")
@pytest.mark.parametrize("sse", [False, True])
def test_tools_list_too_deep_to_read_is_refused_not_passed_on(guarded: Guarded, sse: bool) -> None:
    """A tools/list answer the guard cannot parse cannot be filtered, so the caller gets an error, not the list."""
    headers = {"x-test-deep": "1", **({"x-test-sse": "1"} if sse else {})}
    response = post(guarded, guarded.keys["read"], rpc("tools/list"), headers=headers)
    assert response.status_code == 200
    assert b"write_tool" not in response.content
    payload = listing_answer(response, sse=sse)
    assert payload["error"]["code"] == -32603
    assert payload["id"] == 1


@pytest.mark.threat("T-TENANT-SPOOF")
def test_spoofed_identity_headers_are_replaced(guarded: Guarded) -> None:
    """Inbound X-MCPGuard-* headers never reach the app; it sees only the guard's, from the credential."""
    before = len(guarded.app.seen)
    spoof = {"X-MCPGuard-Tenant": "globex", "x-mcpguard-scopes": "mcp:admin", "X-Mcpguard-Subject": "root"}
    assert post(guarded, guarded.keys["read"], rpc("ping"), headers=spoof).status_code == 200
    (seen,) = forwarded_after(guarded, before)
    identity = [(k, v) for k, v in seen.headers if k.startswith(b"x-mcpguard-")]
    assert (b"x-mcpguard-tenant", b"acme") in identity
    assert [v for k, v in identity if k == b"x-mcpguard-tenant"] == [b"acme"]
    assert b"globex" not in b"".join(v for _, v in identity)
    assert b"root" not in b"".join(v for _, v in identity)
    assert seen.tenant == "acme"


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize("path", ["/globex/mcp", "/globex//mcp/", "/GLOBEX/mcp"])
def test_tenant_in_path_must_match_the_credential(guarded: Guarded, path: str) -> None:
    """A per-tenant URL naming another tenant is refused and nothing is forwarded."""
    before = len(guarded.app.seen)
    response = post(guarded, guarded.keys["admin"], rpc("ping"), path=path)
    assert response.status_code == 403
    assert response.json()["error"]["data"]["error"] == "tenant_mismatch"
    assert forwarded_after(guarded, before) == []


def test_own_tenant_path_is_served(guarded: Guarded) -> None:
    """The credential's own per-tenant URL works like the plain endpoint."""
    assert post(guarded, guarded.keys["read"], rpc("ping"), path="/acme/mcp").status_code == 200


@pytest.mark.threat("T-PARSE-DIFF")
@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"drop_tool"}}', {}),
        (json.dumps([rpc("ping"), rpc("tools/call", {"name": "drop_tool"}, 2)]).encode(), {}),
        (json.dumps(rpc("tools/call", {"name": "drop_tool"})).encode(), {"Mcp-Method": "ping"}),
        (json.dumps(rpc("tools/call", {"name": "drop_tool"})).encode(), {"Mcp-Name": "read_tool"}),
        (b'{"jsonrpc":"2.0","id":1,"method":"ping"', {}),
        (b'\xff\xfe{"jsonrpc":"2.0"}', {}),
    ],
    ids=["duplicate-method", "batch", "method-header", "name-header", "truncated", "not-utf8"],
)
def test_ambiguous_bodies_refused_before_anything_is_decided(
    guarded: Guarded, body: bytes, headers: dict[str, str]
) -> None:
    """Duplicate keys, batches, header/body disagreement and broken JSON are 400 and never forwarded."""
    before = len(guarded.app.seen)
    response = post(guarded, guarded.keys["admin"], body, headers=headers)
    assert response.status_code == 400
    assert response.json()["jsonrpc"] == "2.0"
    assert forwarded_after(guarded, before) == []


@pytest.mark.threat("T-BODY-EXHAUST")
def test_oversized_body_refused(guarded: Guarded) -> None:
    """A body over the cap is 413, declared by Content-Length or streamed in chunks, and not forwarded."""
    before = len(guarded.app.seen)
    big = json.dumps(rpc("tools/call", {"name": "read_tool", "arguments": {"x": "a" * 70_000}})).encode()
    assert post(guarded, guarded.keys["admin"], big).status_code == 413

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    response = httpx.post(
        guarded.url + "/mcp",
        content=chunks(),
        headers={"Authorization": f"Bearer {guarded.keys['admin']}", "content-type": "application/json"},
    )
    assert response.status_code == 413
    assert forwarded_after(guarded, before) == []


def test_body_reaches_the_app_byte_for_byte(guarded: Guarded) -> None:
    """The buffered body is replayed unchanged, whitespace and key order included."""
    before = len(guarded.app.seen)
    body = b'{ "params" : {"name":"read_tool", "arguments":{"b":1,"a":2}},"id":7,  "method":"tools/call",'
    body += b' "jsonrpc":"2.0"}'
    assert post(guarded, guarded.keys["read"], body).status_code == 200
    assert forwarded_after(guarded, before)[0].body == body


@pytest.mark.threat("T-KEY-GUESS")
@pytest.mark.parametrize(
    "credential",
    ["sk_live_abcdef", "mk_short", "mk_" + "A" * 12 + "_" + "B" * 43 + "000000", "Bearer", "eyJhbGciOiJub25lIn0.e30."],
)
def test_malformed_or_foreign_credentials_rejected(guarded: Guarded, credential: str) -> None:
    """Anything that is not a valid key or an acceptable token is 401 invalid_token."""
    response = post(guarded, credential, rpc("ping"))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.threat("T-KEY-REVOKE")
def test_revoked_key_rejected(guarded: Guarded) -> None:
    """A revoked key is refused at once."""
    assert post(guarded, guarded.keys["revoked"], rpc("ping")).status_code == 401


@pytest.mark.threat("T-KEY-GUESS")
def test_two_credentials_rejected(guarded: Guarded) -> None:
    """Presenting two credentials is refused instead of picking one."""
    response = post(guarded, guarded.keys["read"], rpc("ping"), headers={"X-API-Key": guarded.keys["admin"]})
    assert response.status_code == 401


def test_api_key_header_accepted_when_configured(guarded: Guarded) -> None:
    """A key in the configured X-API-Key header authenticates like a bearer key."""
    response = post(guarded, None, rpc("ping"), headers={"X-API-Key": guarded.keys["read"]})
    assert response.status_code == 200


def test_plain_routes_scoped_by_http_method(guarded: Guarded) -> None:
    """Outside the MCP endpoint, GET needs read and DELETE needs admin."""
    read = {"Authorization": f"Bearer {guarded.keys['read']}"}
    write = {"Authorization": f"Bearer {guarded.keys['write']}"}
    assert httpx.get(guarded.url + "/things", headers=read).status_code == 200
    assert httpx.post(guarded.url + "/things", headers=read).status_code == 403
    assert httpx.delete(guarded.url + "/things", headers=write).status_code == 403
    assert httpx.get(guarded.url + "/things").status_code == 401


def test_metadata_is_public(guarded: Guarded) -> None:
    """RFC 9728 metadata is served without a credential and names the per-tenant resource asked for."""
    document = httpx.get(guarded.url + "/.well-known/oauth-protected-resource/acme/mcp").json()
    assert document["resource"] == guarded.url + "/acme/mcp"
    assert "mcp:read" in document["scopes_supported"]


@pytest.mark.threat("T-PATH-EVASION")
def test_dot_segments_refused(guarded: Guarded) -> None:
    """A path that only resolves to the MCP endpoint after dot-segment removal is refused."""
    before = len(guarded.app.seen)
    response = httpx.post(
        guarded.url + "/x/%2E%2E/mcp",
        content=json.dumps(rpc("tools/call", {"name": "drop_tool"})),
        headers={"Authorization": f"Bearer {guarded.keys['write']}"},
    )
    assert response.status_code == 400
    assert forwarded_after(guarded, before) == []


def test_streaming_responses_are_not_buffered(guarded: Guarded) -> None:
    """The first chunk of a streamed answer arrives while the app is still holding back the rest."""
    guarded.app.release.clear()
    headers = {"Authorization": f"Bearer {guarded.keys['read']}"}
    with httpx.stream("GET", guarded.url + "/stream", headers=headers, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines) == "first"
        guarded.app.release.set()
        assert next(lines) == "second"


@pytest.mark.threat("T-UNDECIDED")
def test_websocket_refused(guarded: Guarded) -> None:
    """A WebSocket handshake is refused: MCP has no WebSocket transport to guard."""
    response = httpx.get(
        guarded.url + "/mcp",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert response.status_code == 403


@pytest.mark.threat("T-STORE-FAIL")
def test_store_outage_fails_closed() -> None:
    """When the key store cannot answer, the guard answers 503 and forwards nothing."""
    app = RecordingApp()
    ring = KeyRing(store=BrokenStore(), hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    # A well-formed key (valid checksum), so the store is actually consulted.
    _, key = generate_key()
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}")
    with serve(MCPGuard(app, config, keys=ring, tool_lister=list_tools), port) as url:
        response = httpx.post(url + "/mcp", json=rpc("ping"), headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    assert app.seen == []


@pytest.mark.threat("T-KEY-REVOKE")
def test_expired_key_rejected() -> None:
    """A key past its expiry is refused even though its hash still verifies."""
    clock = [datetime.now(UTC)]
    store = open_store("memory://")
    hasher = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    ring = KeyRing(store=store, hasher=hasher, now=lambda: clock[0])
    key, _ = asyncio.run(ring.create(tenant="acme", expires_at=clock[0] + timedelta(days=1)))
    clock[0] += timedelta(days=2)
    ring = KeyRing(store=store, hasher=hasher, now=lambda: clock[0])
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}")
    with serve(MCPGuard(RecordingApp(), config, keys=ring, tool_lister=list_tools), port) as url:
        response = httpx.post(url + "/mcp", json=rpc("ping"), headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 401


@pytest.mark.threat("T-DNS-REBIND")
@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1:1", "attacker.example:80"])
def test_foreign_host_refused(guarded: Guarded, host: str) -> None:
    """A Host this guard does not serve (DNS rebinding) is 421 before any credential is checked."""
    before = len(guarded.app.seen)
    response = post(guarded, guarded.keys["admin"], rpc("ping"), headers={"Host": host})
    assert response.status_code == 421
    assert forwarded_after(guarded, before) == []


@pytest.mark.threat("T-DNS-REBIND")
def test_foreign_origin_refused(guarded: Guarded) -> None:
    """A browser request from another origin is 403 even with a valid key; the guard's own origin passes."""
    before = len(guarded.app.seen)
    evil = post(guarded, guarded.keys["admin"], rpc("ping"), headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403
    assert evil.json()["error"]["data"]["error"] == "origin_not_allowed"
    assert forwarded_after(guarded, before) == []
    port = guarded.url.rsplit(":", 1)[1]
    for origin in (guarded.url, f"http://localhost:{port}"):
        assert post(guarded, guarded.keys["read"], rpc("ping"), headers={"Origin": origin}).status_code == 200


def test_loopback_names_are_one_host(guarded: Guarded) -> None:
    """On a loopback public URL, localhost and 127.0.0.1 at the same port are both served."""
    port = guarded.url.rsplit(":", 1)[1]
    response = post(guarded, guarded.keys["read"], rpc("ping"), headers={"Host": f"localhost:{port}"})
    assert response.status_code == 200


def failed_auth_guard() -> tuple[MCPGuard, str, int]:
    """A guard behind a trusted proxy at 127.0.0.1 allowing 3 failed authentications a minute, a valid key of
    tenant acme, and the port to serve it on."""
    store = open_store("memory://")
    hasher = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
    key, _ = asyncio.run(KeyRing(store=store, hasher=hasher).create(tenant="acme"))
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", trusted_proxies=("127.0.0.1",))
    guard = MCPGuard(
        RecordingApp(),
        config,
        keys=KeyRing(store=store, hasher=hasher),
        tool_lister=list_tools,
        failed_auth_limit="3/minute",
    )
    return guard, key, port


@pytest.mark.threat("T-KEY-GUESS")
def test_key_guessing_address_is_refused_before_verification() -> None:
    """After its failed attempts an address gets 429 even with a valid key; another address is unaffected."""
    guard, key, port = failed_auth_guard()
    _, wrong = generate_key()
    with serve(guard, port) as url:

        def ping(credential: str, address: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {credential}", "X-Forwarded-For": address}
            return httpx.post(url + "/mcp", json=rpc("ping"), headers=headers)

        assert [ping(wrong, "203.0.113.7").status_code for _ in range(3)] == [401, 401, 401]
        blocked = ping(key, "203.0.113.7")
        other = ping(key, "198.51.100.9")
    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert blocked.json()["error"]["data"]["error"] == "rate_limited"
    assert other.status_code == 200


@pytest.mark.threat("T-KEY-GUESS")
def test_blocked_address_keeps_a_key_it_just_used_but_no_guess_at_it() -> None:
    """A key verified a moment ago still works from an address over its failed-authentication limit (it costs
    no argon2 and is no guess), while a forged secret for that same key id is refused before verification."""
    guard, key, port = failed_auth_guard()
    forged = checksummed(key[:16] + ("B" if key[16] != "B" else "C") + key[17:-6])
    _, wrong = generate_key()
    with serve(guard, port) as url:

        def ping(credential: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {credential}", "X-Forwarded-For": "203.0.113.7"}
            return httpx.post(url + "/mcp", json=rpc("ping"), headers=headers)

        assert ping(key).status_code == 200
        assert [ping(wrong).status_code for _ in range(3)] == [401, 401, 401]
        kept = ping(key)
        guess = ping(forged)
    assert kept.status_code == 200
    assert guess.status_code == 429
    assert guess.json()["error"]["data"]["error"] == "rate_limited"
