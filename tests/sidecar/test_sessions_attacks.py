"""MCP sessions under attack: another principal's id, revoked keys, reused ids, and one process per stdio session."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, JWTVerifier, open_store
from mcpguard.keys import parse_key
from sidecar.app import build_sidecar
from sidecar.demo_server import http_app
from sidecar.proxy import ProxySettings
from sidecar.stdio_upstream import StdioSettings, StdioUpstream
from tests.conftest import (
    LEGACY_HEADERS,
    LEGACY_INITIALIZE,
    answer_lifespan,
    cheap_keyring,
    free_port,
    make_keys,
    read_body,
    serve,
)
from tests.sidecar.test_stdio_upstream import stdio_sidecar

ISSUER = "https://issuer.test"
INIT = LEGACY_INITIALIZE
LEGACY = LEGACY_HEADERS
PING = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
STDERR_SECRET = "stderr-secret-4f1c9a"
# A raw newline-delimited JSON-RPC stdio server: `pid` reports its process, the others misbehave on purpose.
SERVER = """
import json, os, sys
def send(m):
    sys.stdout.write(json.dumps(m) + "\\n"); sys.stdout.flush()
for line in sys.stdin:
    m = json.loads(line)
    rid, method = m.get("id"), m.get("method")
    if rid is None:
        continue
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": rid, "result": {"protocolVersion": m["params"]["protocolVersion"],
              "capabilities": {"tools": {}}, "serverInfo": {"name": "pid", "version": "1"}}})
    elif method == "tools/list":
        tools = [{"name": n, "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}}
                 for n in ("pid", "garbage", "huge", "die")]
        send({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
    elif method == "tools/call":
        name = m["params"]["name"]
        if name == "garbage":
            sys.stdout.write("not json\\n{\\"half\\":\\n\\n[1,2]\\n"); sys.stdout.flush()
        elif name == "huge":
            sys.stdout.write("x" * 100000 + "\\n"); sys.stdout.flush()
        elif name == "die":
            sys.stderr.write("STDERR_SECRET\\n"); sys.stderr.flush(); os._exit(3)
        send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": str(os.getpid())}],
              "structuredContent": {"result": os.getpid()}, "isError": False}})
    else:
        send({"jsonrpc": "2.0", "id": rid, "result": {}})
""".replace("STDERR_SECRET", STDERR_SECRET)


def auth(key: str, session: str | None = None) -> dict[str, str]:
    headers = LEGACY | {"Authorization": f"Bearer {key}"}
    return headers | ({"Mcp-Session-Id": session} if session is not None else {})


def post(url: str, key: str, session: str | None = None, body: Any = PING, **extra: str) -> httpx.Response:
    return httpx.post(url + "/mcp", json=body, headers=auth(key, session) | extra, timeout=20)


def raw_status(url: str, key: str, session: str) -> int:
    """A ping written byte for byte, so the session header can carry what HTTP clients refuse to send."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(PING).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in auth(key).items())
    request = f"POST /mcp HTTP/1.1\r\nHost: {host}:{port}\r\n{head}Mcp-Session-Id:{session}\r\n"
    request += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode() + body)
        return int(sock.recv(64).split()[1])


def opened(url: str, key: str) -> str:
    answer = post(url, key, body=INIT)
    assert answer.status_code == 200, answer.text
    return answer.headers["mcp-session-id"]


class Counter:
    """An ASGI shim that counts the requests reaching the app behind it."""

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def http_stack() -> Iterator[tuple[str, Counter, dict[str, str], Any, Ed25519PrivateKey]]:
    """The sidecar before the demo HTTP server, with API keys and signed tokens of its issuer."""
    store = open_store("memory://")
    specs = {label: (tenant, ["mcp:admin"]) for label, tenant in [("a1", "acme"), ("a2", "acme"), ("g", "globex")]}
    keys = make_keys(store, specs)
    signing = Ed25519PrivateKey.generate()
    counter = Counter(http_app())
    with serve(counter) as upstream:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        app = build_sidecar(
            config=GuardConfig(public_url=origin),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", read_timeout=10),
            store=store,
            keys=cheap_keyring(store),
            tokens=JWTVerifier(issuer=ISSUER, audience=origin, key=signing.public_key()),
        )
        with serve(app, port) as url:
            yield url, counter, keys, store, signing


def token(signing: Ed25519PrivateKey, audience: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": audience, "sub": "user", "iat": now, "exp": now + 300, "scope": "mcp:admin"}
    return jwt.encode(body | {"jti": uuid.uuid4().hex, "tenant": "acme"} | claims, signing, algorithm="EdDSA")


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_hijack_by_same_tenant_key_and_id_spellings_refused(http_stack: Any) -> None:
    """Another key of the same tenant, and every respelling of the id (case, lists), get 404; nothing is forwarded."""
    url, counter, keys, _, _ = http_stack
    session = opened(url, keys["a1"])
    before = counter.seen
    attempts = [(keys["a2"], session), (keys["g"], session)]
    attempts += [(keys["a1"], session.upper()), (keys["a1"], f"{session}, {session}"), (keys["a2"], f"x,{session}")]
    answers = [post(url, key, sid) for key, sid in attempts]
    assert [a.status_code for a in answers] == [404] * len(attempts)
    assert all(a.json()["error"]["data"]["error"] == "session_not_found" for a in answers)
    assert counter.seen == before
    twice = httpx.post(
        url + "/mcp",
        json=PING,
        headers=[*auth(keys["a2"]).items(), ("Mcp-Session-Id", "mine"), ("Mcp-Session-Id", session)],
    )
    assert twice.status_code == 400
    padded = [raw_status(url, keys[label], f" \t{session}\t ") for label in ("a2", "a1")]
    assert padded == [404, 200]


@pytest.mark.threat("T-SESSION-HIJACK")
def test_foreign_delete_get_and_stateless_use_refused_and_session_survives(http_stack: Any) -> None:
    """DELETE, GET and a 2026-07-28 stateless request with another's id are 404, unforwarded; the owner goes on."""
    url, counter, keys, _, _ = http_stack
    session = opened(url, keys["a1"])
    before = counter.seen
    deleted = httpx.delete(url + "/mcp", headers=auth(keys["a2"], session))
    with httpx.stream("GET", url + "/mcp", headers=auth(keys["g"], session), timeout=10) as stream:
        streamed = stream.status_code
    modern = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list", "Mcp-Session-Id": session}
    stateless = httpx.post(
        url + "/mcp",
        json={"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}},
        headers={"Authorization": f"Bearer {keys['g']}", "Accept": LEGACY["Accept"]} | modern,
    )
    reopened = post(url, keys["a2"], session, body=INIT)
    assert (deleted.status_code, streamed, stateless.status_code, reopened.status_code) == (404, 404, 404, 404)
    assert counter.seen == before
    assert post(url, keys["a1"], session).status_code == 200


@pytest.mark.threat("T-KEY-REVOKE", "T-SESSION-HIJACK")
def test_revoked_key_session_refused_to_it_and_to_its_successor(http_stack: Any) -> None:
    """After revocation the key is refused at authentication; a new key for the same subject gets 404."""
    url, _, _, store, _ = http_stack
    old = make_keys(store, {"rotated": ("acme", ["mcp:admin"])})["rotated"]
    session = opened(url, old)

    async def revoke() -> None:
        ring = cheap_keyring(store)
        await ring.revoke(parse_key(old)[0])
        await ring.aclose()

    asyncio.run(revoke())
    successor = make_keys(store, {"rotated": ("acme", ["mcp:admin"])})["rotated"]
    assert post(url, old, session).status_code == 401
    answer = post(url, successor, session)
    assert answer.status_code == 404
    assert answer.json()["error"]["data"]["error"] == "session_not_found"


@pytest.mark.threat("T-SESSION-HIJACK")
def test_session_opened_by_token_refused_to_a_key_of_its_tenant(http_stack: Any) -> None:
    """A session opened with an access token is 404 to an API key of the same tenant."""
    url, _, keys, _, signing = http_stack
    by_token = opened(url, token(signing, url))
    assert post(url, keys["a1"], by_token).status_code == 404
    assert post(url, token(signing, url), by_token).status_code == 404


@pytest.mark.threat("T-SESSION-HIJACK")
def test_token_whose_jti_equals_a_key_id_refused_that_keys_session(http_stack: Any) -> None:
    """A token and a key are different credentials even when the token's jti spells the key's id."""
    url, _, keys, _, signing = http_stack
    by_key = opened(url, keys["a2"])
    impostor = token(signing, url, sub="someone-else", jti=parse_key(keys["a2"])[0])
    assert post(url, impostor, by_key).status_code == 404


@contextmanager
def reusing_upstream() -> Iterator[tuple[str, dict[str, str]]]:
    """A sidecar before an upstream that hands every initialize the same session id."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        message = json.loads(body or b"{}")
        result = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "r", "version": "1"}}
        reply = {"jsonrpc": "2.0", "id": message.get("id"), "result": result if "params" in message else {}}
        data = json.dumps(reply).encode()
        headers = [(b"content-type", b"application/json"), (b"mcp-session-id", b"always-the-same")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    with serve(app) as upstream:
        store = open_store("memory://")
        keys = make_keys(store, {"a": ("acme", ["mcp:admin"]), "g": ("globex", ["mcp:admin"])})
        port = free_port()
        sidecar = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(upstream=f"{upstream}/mcp", read_timeout=5),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(sidecar, port) as url:
            yield url, keys


@pytest.mark.threat("T-SESSION-HIJACK")
def test_upstream_reissuing_a_bound_id_does_not_hand_it_to_a_new_opener() -> None:
    """An id the upstream issues again stays with the principal that opened it first: the new opener's answer is
    a 502 that does not carry the id, and using the id anyway gets 404."""
    with reusing_upstream() as (url, keys):
        session = opened(url, keys["a"])
        second = post(url, keys["g"], body=INIT)
        owner = post(url, keys["a"], session)
        stolen = post(url, keys["g"], session)
    assert second.status_code == 502
    assert "mcp-session-id" not in second.headers
    assert (owner.status_code, stolen.status_code) == (200, 404)


@contextmanager
def stdio_stack(tmp_path: Path, **options: Any) -> Iterator[tuple[str, StdioUpstream, dict[str, str]]]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    settings = StdioSettings(argv=(sys.executable, str(script)), **({"read_timeout": 60.0} | options))
    labels = {"a1": ("acme", "mcp:admin"), "a2": ("acme", "mcp:admin"), "g": ("globex", "mcp:admin")}
    with stdio_sidecar(settings, labels) as running:
        yield running.url, running.upstream, running.keys


def call(url: str, key: str, session: str, name: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": name, "arguments": {}}}
    return post(url, key, session, body=body, Accept="application/json")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def gone(pid: int, within: float = 8.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.threat("T-STDIO-SHARE", "T-SESSION-HIJACK")
def test_stdio_sessions_own_processes_and_foreign_delete_refused(tmp_path: Path) -> None:
    """One process per session; another key's DELETE, GET or initialize leaves it running; its owner's ends it."""
    with stdio_stack(tmp_path) as (url, upstream, keys):
        sessions = {label: opened(url, keys[label]) for label in ("a1", "a2", "g")}
        pids = {
            label: call(url, keys[label], sid, "pid").json()["result"]["structuredContent"]["result"]
            for label, sid in sessions.items()
        }
        assert len(set(pids.values())) == 3
        assert set(pids.values()) <= set(upstream.pids)
        victim = sessions["a1"]
        assert httpx.delete(url + "/mcp", headers=auth(keys["a2"], victim)).status_code == 404
        with httpx.stream("GET", url + "/mcp", headers=auth(keys["g"], victim), timeout=10) as stream:
            assert stream.status_code == 404
        count = upstream.session_count
        assert post(url, keys["g"], victim, body=INIT).status_code == 404
        assert upstream.session_count == count
        assert alive(pids["a1"])
        assert call(url, keys["a1"], victim, "pid").json()["result"]["structuredContent"]["result"] == pids["a1"]
        assert httpx.delete(url + "/mcp", headers=auth(keys["a1"], victim)).status_code == 200
        assert gone(pids["a1"])
        assert alive(pids["a2"])
        assert alive(pids["g"])


@pytest.mark.threat("T-STDIO-SHARE")
def test_initialize_flood_forks_no_more_than_a_tenants_share(tmp_path: Path) -> None:
    """Many concurrent initializes from one key start at most its tenant's share of ``max_sessions`` (half)
    processes; the rest get 503."""
    with stdio_stack(tmp_path, max_sessions=4) as (url, upstream, keys):
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: post(url, keys["a1"], body=INIT), range(12)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] * 2 + [503] * 10
        assert upstream.session_count == 2


@pytest.mark.threat("T-RATE-EXHAUST")
def test_one_tenant_cannot_take_every_stdio_process_from_another(tmp_path: Path) -> None:
    """One tenant's keys holding sessions open (its share, half of ``max_sessions``, is soon used up) leave
    another tenant able to open its own."""
    with stdio_stack(tmp_path, max_sessions=2) as (url, _, keys):
        for _ in range(2):
            post(url, keys["a1"], body=INIT)
        other = post(url, keys["g"], body=INIT)
    assert other.status_code == 200


@pytest.mark.parametrize("tool", ["die", "huge"])
def test_misbehaving_process_gives_a_clean_error_without_its_stderr(tmp_path: Path, tool: str) -> None:
    """A process that exits mid-call or writes a line over the limit: a JSON-RPC error at once, no stderr, 404 after."""
    with stdio_stack(tmp_path, max_message_bytes=4096) as (url, upstream, keys):
        session = opened(url, keys["a1"])
        pid = call(url, keys["a1"], session, "pid").json()["result"]["structuredContent"]["result"]
        answer = call(url, keys["a1"], session, tool)
        assert gone(pid)
        after = call(url, keys["a1"], session, "pid")
        assert upstream.session_count == 0
    assert answer.status_code == 502
    assert answer.json()["id"] == 9
    assert answer.json()["error"]["data"]["error"] == "bad_gateway"
    assert STDERR_SECRET not in answer.text
    assert after.status_code == 404


def test_garbage_on_stdout_is_skipped_and_the_answer_still_arrives(tmp_path: Path) -> None:
    """Lines that are not JSON-RPC messages are dropped; the response that follows reaches the client."""
    with stdio_stack(tmp_path) as (url, _, keys):
        session = opened(url, keys["a1"])
        answer = call(url, keys["a1"], session, "garbage")
    assert answer.status_code == 200
    assert isinstance(answer.json()["result"]["structuredContent"]["result"], int)
