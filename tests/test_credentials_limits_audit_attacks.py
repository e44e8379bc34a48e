"""Attacks on credentials, rate limits and the audit trail, each over a real socket against a guarded app."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import argon2
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, KeyRing, MCPGuard, open_store
from mcpguard.audit import AuditEvent, AuditQuery, SQLiteAuditStore, new_event_id
from mcpguard.authentication import RECHECK_SECONDS
from mcpguard.errors import StorageUnavailable
from mcpguard.keys import parse_key
from mcpguard.ratelimit import RateLimits
from tests.conftest import answer_lifespan, cheap_keyring, free_port, make_keys, read_body, serve, stored_key
from tests.test_guard import RecordingApp, list_tools, rpc
from tests.test_keyring import CountingHasher
from tests.test_keys import checksummed

CANARY = "canary-5e1d77b04c3a9f26"
CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)


def forged(key: str) -> str:
    """``key`` with one character of its secret changed and a valid checksum: a real id, a wrong secret."""
    return checksummed(key[:16] + ("B" if key[16] != "B" else "C") + key[17:-6])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Served:
    url: str
    app: RecordingApp
    keys: dict[str, str]
    hasher: CountingHasher
    store: Any

    def post(self, headers: dict[str, str], body: Any = None, path: str = "/mcp") -> httpx.Response:
        return httpx.post(self.url + path, json=body if body is not None else rpc("ping"), headers=headers)

    def call(self, label: str, tool: str = "read_tool", rid: int | None = 1) -> httpx.Response:
        return self.post(bearer(self.keys[label]), rpc("tools/call", {"name": tool, "arguments": {}}, rid))


@contextmanager
def guarded(
    specs: dict[str, tuple[str, list[str]]],
    *,
    records: dict[str, str] | None = None,
    server: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[Served]:
    """A guard (MCPGuard ``options``) over a recording app, with a key per label of ``specs`` and, per label of
    ``records``, a key stored straight into the key store under that tenant name (as another issuer may); ``server``
    holds uvicorn options."""
    store = open_store("memory://")
    keys = make_keys(store, specs)
    for label, tenant in (records or {}).items():
        keys[label] = stored_key(store, tenant=tenant, name=label, scopes=("mcp:read",), hasher=CHEAP)
    hasher = CountingHasher.from_parameters(argon2.profiles.CHEAPEST)
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", api_key_header="X-API-Key")
    app = RecordingApp()
    guard = MCPGuard(app, config, keys=KeyRing(store=store, hasher=hasher), tool_lister=list_tools, **options)
    with serve(guard, port, **(server or {})) as url:
        yield Served(url, app, keys, hasher, store)


@pytest.fixture(scope="module")
def auth() -> Iterator[Served]:
    with guarded(
        {"read": ("acme", ["mcp:read"]), "admin": ("acme", ["mcp:admin"])}, failed_auth_limit="10000/minute"
    ) as g:
        yield g


def raw_status(url: str, header_lines: list[bytes]) -> int:
    """The status of a POST /mcp sent byte for byte (headers an HTTP client would refuse to write)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(rpc("ping")).encode()
    request = b"\r\n".join(
        [
            b"POST /mcp HTTP/1.1",
            f"Host: {host}:{port}".encode(),
            b"Content-Type: application/json",
            f"Content-Length: {len(body)}".encode(),
            *header_lines,
            b"Connection: close",
            b"",
            body,
        ]
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


# --- credentials -------------------------------------------------------------------------------------------


@pytest.mark.threat("T-KEY-GUESS")
def test_forged_secret_for_a_real_key_id_costs_one_argon2_and_is_refused(auth: Served) -> None:
    """A wrong secret under a real key id is refused after exactly one argon2 verification, also while the real
    key of that id is cached as verified."""
    key = auth.keys["read"]
    assert auth.post(bearer(key)).status_code == 200
    for _ in range(2):
        before = auth.hasher.verifies
        response = auth.post(bearer(forged(key)))
        assert response.status_code == 401
        assert auth.hasher.verifies == before + 1


@pytest.mark.threat("T-KEY-GUESS")
@pytest.mark.parametrize("where", ["query", "cookie", "other-header"])
def test_key_outside_the_credential_headers_is_not_accepted(auth: Served, where: str) -> None:
    """A valid key in the query string, a cookie or a header other than the configured ones authenticates nothing."""
    key, before = auth.keys["admin"], len(auth.app.seen)
    headers = {"Cookie": f"api_key={key}"} if where == "cookie" else {"X-Api-Token": key} if where != "query" else {}
    path = f"/mcp?api_key={key}&access_token={key}" if where == "query" else "/mcp"
    assert auth.post(headers, path=path).status_code == 401
    assert auth.app.seen[before:] == []


@pytest.mark.threat("T-KEY-GUESS")
@pytest.mark.parametrize(
    "shape",
    [
        "Bearer{k}",
        "Bearer,{k}",
        "Basic {k}",
        "Bearer {k} extra",
        "Bearer {k}, Bearer {k}",
        "Bearer {k}{k}",
        "Bearer \u00a0{k}",
        "Bearer {k}\u00a0",
        "Bearer {k}\u0085",
    ],
)
def test_mangled_authorization_headers_are_refused(auth: Served, shape: str) -> None:
    """Only `Bearer <key>` authenticates: a glued, doubled or foreign-scheme value, or a key wrapped in bytes HTTP
    does not count as whitespace (NBSP, NEL), is refused, so the guard and the app behind it read the same key."""
    value = shape.format(k=auth.keys["admin"]).encode("latin-1")
    assert raw_status(auth.url, [b"Authorization: " + value]) == 401


@pytest.mark.threat("T-KEY-GUESS")
def test_nul_byte_in_a_credential_is_refused(auth: Served) -> None:
    """A key followed by a NUL byte never authenticates, in either credential header."""
    key = auth.keys["admin"].encode()
    assert raw_status(auth.url, [b"Authorization: Bearer " + key + b"\x00"]) in (400, 401)
    assert raw_status(auth.url, [b"X-API-Key: " + key + b"\x00x"]) in (400, 401)


@pytest.mark.threat("T-KEY-GUESS")
def test_api_key_header_twice_or_beside_another_scheme_is_refused(auth: Served) -> None:
    """Two API-key headers, or one beside an Authorization header of any scheme, are refused, never picked from."""
    read, admin = auth.keys["read"].encode(), auth.keys["admin"].encode()
    assert raw_status(auth.url, [b"X-API-Key: " + read, b"X-API-Key: " + admin]) == 401
    assert raw_status(auth.url, [b"Authorization: Basic dXNlcjpwYXNz", b"X-API-Key: " + admin]) == 401


@pytest.mark.threat("T-KEY-GUESS")
@pytest.mark.parametrize("credential", ["mk_" + "A" * 30_000, "x" * 30_000, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."])
def test_oversized_or_foreign_credentials_cost_no_argon2(auth: Served, credential: str) -> None:
    """A very long key-like string, a very long token or a JWT in the API-key header is refused without argon2."""
    before = auth.hasher.verifies
    assert auth.post({"X-API-Key": credential}).status_code == 401
    assert auth.post(bearer(credential)).status_code == 401
    assert auth.hasher.verifies == before


@pytest.mark.threat("T-KEY-REVOKE")
def test_key_revoked_by_another_ring_is_refused_while_cached_by_the_guard() -> None:
    """A key the guard verified (and cached) a moment ago stops working on the next request once it is revoked
    through another key ring on the same store, as the CLI does."""
    with guarded({"read": ("acme", ["mcp:read"])}) as g:
        key = g.keys["read"]
        assert g.post(bearer(key)).status_code == 200
        assert asyncio.run(KeyRing(store=g.store, hasher=CHEAP).revoke(parse_key(key)[0])) is not None
        assert g.post(bearer(key)).status_code == 401
        assert g.post({"X-API-Key": key}).status_code == 401


@pytest.mark.threat("T-KEY-GUESS")
def test_concurrent_guesses_cannot_outrun_the_failed_authentication_limit() -> None:
    """A burst of simultaneous wrong secrets from one address causes no more argon2 verifications (and no more
    401 answers) than its failed-authentication limit allows; the rest are refused with 429."""
    with guarded({"read": ("acme", ["mcp:read"])}, failed_auth_limit="3/minute") as g:
        guesses = [forged(g.keys["read"])] * 40
        with ThreadPoolExecutor(max_workers=40) as pool:
            statuses = list(pool.map(lambda k: g.post(bearer(k)).status_code, guesses))
    assert set(statuses) <= {401, 429}
    assert statuses.count(401) <= 3, statuses
    assert g.hasher.verifies <= 3


@pytest.mark.threat("T-KEY-GUESS")
def test_forwarded_for_is_ignored_without_trusted_proxies() -> None:
    """Without trusted proxies, a guesser reaching the guard from a loopback peer (a sidecar, a TCP proxy) cannot
    reset its failed-authentication count with X-Forwarded-For, served with proxy headers off as `mcpguard serve`,
    the quickstart and the embedded example run it (uvicorn's own default would rewrite the peer from it)."""
    with guarded({"read": ("acme", ["mcp:read"])}, server={"proxy_headers": False}, failed_auth_limit="3/minute") as g:
        wrong = forged(g.keys["read"])
        for n in range(3):
            assert g.post({**bearer(wrong), "X-Forwarded-For": f"198.51.100.{n}"}).status_code == 401
        before = g.hasher.verifies
        assert g.post({**bearer(wrong), "X-Forwarded-For": "203.0.113.99"}).status_code == 429
        assert g.post({**bearer(wrong), "Forwarded": "for=203.0.113.98"}).status_code == 429
        assert g.hasher.verifies == before


# --- rate limits -------------------------------------------------------------------------------------------


@pytest.mark.threat("T-RATE-EXHAUST")
def test_parallel_calls_never_exceed_the_quota() -> None:
    """Thirty simultaneous tool calls against a quota of five: at most five are forwarded, the rest get 429."""
    limits = RateLimits(per_tenant="5/minute", strategy="moving-window")
    with guarded({"read": ("acme", ["mcp:read"])}, rate_limits=limits) as g:
        g.call("read")  # the key is verified and cached before the burst
        with ThreadPoolExecutor(max_workers=30) as pool:
            statuses = list(pool.map(lambda n: g.call("read", rid=n).status_code, range(30)))
    assert statuses.count(200) == 4
    assert statuses.count(429) == 26
    assert len(g.app.seen) == 5


@pytest.mark.threat("T-RATE-EXHAUST")
def test_tenants_whose_names_hold_key_separators_have_their_own_quotas() -> None:
    """Tenants `a`, `a/b`, `a%2Fb` and `{a}` (from an issuer that allows such names) each have a separate quota:
    none can use up another's, whatever limits does with `/`, `%` and `{}` in counter keys."""
    tenants = {"plain": "a", "slash": "a/b", "escaped": "a%2Fb", "braces": "{a}", "braces2": "{a}/b"}
    limits = RateLimits(per_tenant="2/minute", per_credential="2/minute", strategy="moving-window")
    with guarded({}, records=tenants, rate_limits=limits) as g:
        for label in tenants:
            assert [g.call(label).status_code for _ in range(2)] == [200, 200], label
        for label in tenants:
            assert g.call(label).status_code == 429, label


@pytest.mark.threat("T-RATE-EXHAUST")
def test_tool_call_notifications_count_against_the_quota() -> None:
    """A tools/call sent as a notification (no id) is counted like a request, so dropping the id is no bypass."""
    limits = RateLimits(per_tenant="2/minute", strategy="moving-window")
    with guarded({"read": ("acme", ["mcp:read"])}, rate_limits=limits) as g:
        assert [g.call("read", rid=None).status_code for _ in range(2)] == [200, 200]
        assert g.call("read", rid=None).status_code == 429
        assert g.call("read").status_code == 429


@pytest.mark.threat("T-RATE-EXHAUST")
@pytest.mark.parametrize(("limit", "window"), [("1/hour", 3600), ("1/day", 86400)])
@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window"])
def test_retry_after_stays_within_the_window(limit: str, window: int, strategy: Any) -> None:
    """For long windows Retry-After is whole seconds between 1 and the window, and RateLimit-Reset agrees."""
    with guarded({"read": ("acme", ["mcp:read"])}, rate_limits=RateLimits(per_tenant=limit, strategy=strategy)) as g:
        first = g.call("read")
        refused = g.call("read")
    assert first.status_code == 200
    assert 1 <= int(first.headers["ratelimit-reset"]) <= window
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= window
    assert int(refused.headers["ratelimit-reset"]) == retry_after


# --- the audit trail ---------------------------------------------------------------------------------------


async def canary_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every call with the canary in its result, or, for tool `erroring`, in a JSON-RPC error message."""
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    request = json.loads(body) if body else {}
    if request.get("params", {}).get("name") == "erroring":
        answer: dict[str, Any] = {"error": {"code": -32000, "message": f"failed {CANARY}", "data": CANARY}}
    else:
        answer = {"result": {"content": [{"type": "text", "text": CANARY}], "isError": True}}
    payload = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), **answer}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})


async def audit_tools(host: str | None) -> list[Any]:
    return [*await list_tools(host), {"name": "erroring", "annotations": {"readOnlyHint": True}}]


@dataclass
class Audited:
    url: str
    keys: dict[str, str]
    database: Path

    def get(self, label: str, query: str = "", path: str = "/api/mcp/tool-calls", **headers: str) -> httpx.Response:
        return httpx.get(self.url + path + query, headers={**bearer(self.keys[label]), **headers})

    def calls(self, label: str, query: str = "") -> list[dict[str, Any]]:
        response = self.get(label, query)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["calls"]
        return found

    def post(self, label: str, body: Any, **headers: str) -> httpx.Response:
        return httpx.post(self.url + "/mcp", json=body, headers={**bearer(self.keys[label]), **headers})

    def trail(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.database.parent.iterdir())


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    database = tmp_path_factory.mktemp("attacks-audit") / "audit.db"
    store = open_store("memory://")
    specs = {
        "acme": ("acme", ["mcp:admin"]),
        "acme-audit": ("acme", ["mcp:audit"]),
        "acme-write": ("acme", ["mcp:write"]),
        "globex": ("globex", ["mcp:admin"]),
        "globex-audit": ("globex", ["mcp:audit"]),
        "operator": ("ops", ["mcp:audit"]),
    }
    keys = make_keys(store, specs)
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", operator_credentials=(parse_key(keys["operator"])[0],))
    audit = SQLiteAuditStore(str(database))
    guard = MCPGuard(canary_app, config, keys=cheap_keyring(store), tool_lister=audit_tools, audit=audit)
    with serve(guard, port) as url:
        a = Audited(url, keys, database)
        a.post("globex", rpc("tools/call", {"name": "read_tool", "arguments": {}}))
        yield a


@pytest.mark.threat("T-AUDIT-LEAK")
def test_canary_in_errors_agent_session_and_other_methods_never_reaches_the_trail(audited: Audited) -> None:
    """A secret in an upstream error message, past the kept part of the user agent, in a session id, a JSON-RPC id,
    a resources/read URI or prompt arguments is nowhere in the trail, as read back or on disk."""
    agent = "agent/1.0 " + "x" * 300 + CANARY
    assert CANARY in audited.post("acme", rpc("tools/call", {"name": "erroring", "arguments": {}})).text
    assert CANARY in audited.post("acme", rpc("tools/call", {"name": "read_tool"}), **{"User-Agent": agent}).text
    audited.post("acme", rpc("ping"), **{"Mcp-Session-Id": CANARY})
    audited.post("acme", {"jsonrpc": "2.0", "id": CANARY, "method": "ping"})
    audited.post("acme", rpc("resources/read", {"uri": f"file:///{CANARY}"}))
    audited.post("acme", rpc("prompts/get", {"name": "p", "arguments": {"q": CANARY}}))
    recorded = audited.calls("operator", "?limit=1000")
    assert any(c["user_agent"] and c["user_agent"].startswith("agent/1.0") for c in recorded)
    assert CANARY not in json.dumps(recorded)
    assert CANARY.encode() not in audited.trail()


@pytest.mark.threat("T-AUDIT-LEAK")
def test_very_long_tool_name_is_not_kept_whole(audited: Audited) -> None:
    """A client-chosen tool name tens of kilobytes long (a place to smuggle data) is kept only in part, as the user
    agent is: its tail never reaches the trail."""
    name = "t" * 20_000 + CANARY
    audited.post("acme", rpc("tools/call", {"name": name, "arguments": {}}))
    recorded = [c for c in audited.calls("acme-audit", "?limit=50") if (c["tool"] or "").startswith("ttt")]
    assert recorded
    assert all(len(c["tool"]) <= 256 for c in recorded)
    assert CANARY.encode() not in audited.trail()


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("query", ["?tenant=acme", "?te%6Eant=globex", "?tenant=globex&tenant=acme", "?tenant="])
def test_tenant_parameter_in_any_spelling_needs_the_operator(audited: Audited, query: str) -> None:
    """tenant= from a tenant's reviewer is refused whether it names its own tenant, is percent-encoded, repeated or
    empty."""
    assert audited.get("acme-audit", query).status_code == 403


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_cursor_from_another_tenant_or_forged_shows_only_own_calls(audited: Audited) -> None:
    """A cursor issued to globex, or one forged at the far future, only moves acme's reviewer within acme's calls;
    a cursor with anything after the position is refused."""
    for _ in range(3):
        audited.post("globex", rpc("tools/call", {"name": "read_tool", "arguments": {}}))
    foreign = audited.get("globex-audit", "?limit=1").json()["next_cursor"]
    assert foreign
    future = base64.urlsafe_b64encode(b"v1:" + b"Z" * 26).decode().rstrip("=")
    for cursor in (foreign, future):
        seen = audited.calls("acme-audit", f"?limit=1000&cursor={cursor}")
        assert all(c["tenant"] == "acme" for c in seen)
    padded = base64.urlsafe_b64encode(b"v1:" + b"Z" * 26 + b"' OR 1=1 --").decode()
    assert audited.get("acme-audit", f"?cursor={padded}").status_code == 400


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "query",
    ["?tool=' OR '1'='1", "?subject=x' OR 1=1 --", "?method=%25", "?credential=*", "?tool=read_tool' UNION SELECT *--"],
)
def test_sql_metacharacters_in_filters_match_literally(audited: Audited, query: str) -> None:
    """Quotes, comments, wildcards and UNION in a filter are compared as text: no call matches, none of another
    tenant's appears."""
    assert audited.calls("acme-audit", query) == []


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_call_id_path_with_sql_is_not_found(audited: Audited) -> None:
    """A call id made of SQL finds nothing rather than every call."""
    for call_id in ("' OR '1'='1", "x' OR tenant='globex' --", "%25"):
        assert audited.get("acme-audit", path=f"/api/mcp/tool-calls/{call_id}").status_code == 404


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "query",
    [
        "?limit=\u00b2",
        "?status=\u00b2",
        "?limit=99999999999999999999999",
        "?since=9999-12-31T23:59:59-23:00",
        "?until=0001-01-01T00:00:00%2B23:00",
    ],
)
def test_odd_filter_values_are_refused_not_crashing(audited: Audited, query: str) -> None:
    """Superscript digits, a huge limit and times that leave the calendar once made UTC are refused with 400."""
    assert audited.get("acme-audit", query).status_code == 400


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_format_parameter_does_not_switch_format_or_scope(audited: Audited) -> None:
    """format= is not a filter (400); the trail needs mcp:audit, which mcp:write does not include."""
    assert audited.get("acme-audit", "?format=csv").status_code == 400
    assert audited.get("acme-write").status_code == 403
    assert audited.get("acme-write", **{"Accept": "text/csv"}).status_code == 403
    assert audited.get("acme", **{"Accept": "text/csv"}).status_code == 200


async def ticking_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """An app whose every answer is an event stream with a tick each 50 ms, until the client leaves."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    gone = asyncio.ensure_future(until_disconnect())
    tick = 0
    while not gone.done():
        await send({"type": "http.response.body", "body": f"data: {tick}\n\n".encode(), "more_body": True})
        tick += 1
        await asyncio.sleep(0.05)


@pytest.mark.threat("T-KEY-REVOKE")
def test_an_open_stream_ends_once_its_key_is_revoked() -> None:
    """A stream opened before the key was revoked carries nothing more than a recheck interval after the revocation,
    and then ends: the revoked client gets none of the server's later messages."""
    store = open_store("memory://")
    keys = make_keys(store, {"read": ("acme", ["mcp:read"]), "other": ("acme", ["mcp:read"])})
    ring = KeyRing(store=store, hasher=CHEAP)
    port = free_port()
    guard = MCPGuard(
        ticking_stream, GuardConfig(public_url=f"http://127.0.0.1:{port}"), keys=ring, tool_lister=list_tools
    )
    headers = {"Accept": "text/event-stream"}
    with serve(guard, port) as url, httpx.Client(timeout=10) as client:
        with (
            client.stream("GET", url + "/mcp", headers={**headers, **bearer(keys["read"])}) as revoked,
            client.stream("GET", url + "/mcp", headers={**headers, **bearer(keys["other"])}) as kept,
        ):
            assert (revoked.status_code, kept.status_code) == (200, 200)
            ticks = revoked.iter_raw()
            next(ticks)
            asyncio.run(ring.revoke(parse_key(keys["read"])[0]))
            revoked_at = time.monotonic()
            arrivals = []
            for _ in ticks:
                arrivals.append(time.monotonic() - revoked_at)
                if arrivals[-1] > RECHECK_SECONDS + 2:
                    break  # still flowing: the assertion below says so
            assert [t for t in arrivals if t > RECHECK_SECONDS + 0.5] == []
            # The other key's stream goes on.
            other = kept.iter_raw()
            started = time.monotonic()
            while time.monotonic() - started < RECHECK_SECONDS + 0.5:
                assert next(other)
        assert client.get(url + "/mcp", headers={**headers, **bearer(keys["read"])}).status_code == 401


@pytest.mark.threat("T-RATE-EXHAUST")
def test_audit_reads_are_counted_per_credential(tmp_path: Path) -> None:
    """Each read of the trail (a page, an export, one call) counts against its credential's audit-read limit: past
    it, 429 with Retry-After and nothing read; another reviewer of the tenant and the tenant's tool calls are not
    held back by it."""
    audit = SQLiteAuditStore(str(tmp_path / "audit.db"))
    specs = {"reviewer": ("acme", ["mcp:audit"]), "other": ("acme", ["mcp:audit"]), "caller": ("acme", ["mcp:read"])}
    with guarded(specs, audit=audit, rate_limits=RateLimits(per_audit_read="3/minute")) as g:
        reads = [
            httpx.get(g.url + "/api/mcp/tool-calls", headers=bearer(g.keys["reviewer"])),
            httpx.get(g.url + "/api/mcp/tool-calls", headers={**bearer(g.keys["reviewer"]), "Accept": "text/csv"}),
            httpx.get(g.url + "/api/mcp/tool-calls/01ARZ3NDEKTSV4RRFFQ69G5FAV", headers=bearer(g.keys["reviewer"])),
        ]
        assert [r.status_code for r in reads] == [200, 200, 404]
        refused = httpx.get(g.url + "/api/mcp/tool-calls", headers=bearer(g.keys["reviewer"]))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert "calls" not in refused.json()
        assert httpx.get(g.url + "/api/mcp/tool-calls", headers=bearer(g.keys["other"])).status_code == 200
        assert g.call("caller").status_code == 200


@pytest.mark.threat("T-AUDIT-GAP")
@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_an_entry_sqlite_cannot_store_fails_alone(tmp_path: Path, synchronous: str) -> None:
    """An entry SQLite refuses (a lone surrogate no UTF-8 can hold, however it got there) costs only itself: the
    entries committed with it, a durable start among them, land, and the store goes on taking entries."""

    def entry(tool: str, phase: str = "local") -> AuditEvent:
        now = datetime.now(UTC)
        fields: dict[str, Any] = {"tenant": "acme", "http_method": "POST", "path": "/mcp", "tool": tool}
        return AuditEvent(id=new_event_id(now.timestamp()), at=now, phase=phase, **fields)  # type: ignore[arg-type]

    async def scenario() -> None:
        store = SQLiteAuditStore(str(tmp_path / "audit.db"), synchronous=synchronous)
        try:
            ends = [entry("quiet_tool") for _ in range(3)]
            bad = entry("tool\ud800")
            queued = [asyncio.ensure_future(store.append(e, durable=False)) for e in [ends[0], bad, *ends[1:]]]
            start = entry("read_tool", "start")
            await store.append(start, durable=True)
            await asyncio.gather(*queued, return_exceptions=True)
            await store.append(entry("later_tool", "start"), durable=True)
            page = await store.query(AuditQuery(tenant="acme", limit=100))
            assert sorted(c["tool"] for c in page.calls) == ["later_tool", *["quiet_tool"] * 3, "read_tool"]
        finally:
            await store.close()

    asyncio.run(scenario())


class _CommitsThenFails:
    """An audit store whose next durable append commits and then fails, as when the database's answer is lost
    on its way back (a server that stopped answering, then answered)."""

    def __init__(self, store: SQLiteAuditStore) -> None:
        self.store = store
        self.fail_next = False

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        await self.store.append(event, durable=durable)
        if durable and self.fail_next:
            self.fail_next = False
            raise StorageUnavailable("audit store unavailable")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.threat("T-AUDIT-GAP")
def test_a_start_that_landed_after_its_commit_failed_reads_back_as_the_refusal(tmp_path: Path) -> None:
    """A call refused because its start's commit failed is never forwarded; if that start landed all the same,
    the trail shows the call once, as the local refusal it was, never as a forwarded call without an outcome."""
    audit = _CommitsThenFails(SQLiteAuditStore(str(tmp_path / "audit.db")))
    with guarded({"caller": ("acme", ["mcp:read"]), "reviewer": ("acme", ["mcp:audit"])}, audit=audit) as g:
        audit.fail_next = True
        assert g.call("caller").status_code == 503
        assert g.app.seen == []
        assert g.call("caller").status_code == 200
        calls = httpx.get(g.url + "/api/mcp/tool-calls", headers=bearer(g.keys["reviewer"])).json()["calls"]
        tool_calls = [(c["tool"], c["outcome"], c["status"]) for c in calls if c["tool"] == "read_tool"]
        assert tool_calls == [("read_tool", "complete", 200), ("read_tool", "local", 503)]
