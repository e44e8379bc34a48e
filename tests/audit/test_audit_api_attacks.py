"""Attacks on the audit query API and on token revocation, each over a real socket against a guarded app.

The audit API: who may read it, every way a caller might name another tenant (query, path spelling, headers,
cursor, call id), filters that look like SQL patterns, odd limits and methods, what its answers carry and how
they may be cached or read cross-origin, whether a read is itself recorded, and whether its refusals tell
tenants that exist from tenants that do not. Token revocation (RFC 7009) at the built-in authorization
server: other clients, failed client authentication, lying hints, whole refresh chains, rotated tokens, and
whether a revoked token stops at once, on another replica, inside an open session and on an open stream.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard import GuardConfig, JWTVerifier, MCPGuard, RateLimits, open_store
from mcpguard.audit import AuditQuery, AuditStore, PostgresAuditStore, SQLiteAuditStore
from mcpguard.keys import parse_key
from mcpguard.oauth.builtin import BuiltInAuthorizationServer
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.oauth.signing import SigningKeys
from mcpguard.oauth.users import LocalUsers
from tests.audit.test_audit_store_conformance import pg_url, postgres_schema
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
from tests.oauth.flow_helpers import PASSWORD, REDIRECT, Deployment, Pkce, deploy, register
from tests.oauth.test_authorization_server import code_for, exchange, refresh, tokens_for, tools_list
from tests.test_guard import RecordingApp, list_tools, rpc

TOOL_CALLS = "/api/mcp/tool-calls"
CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
# A well-formed call id that no entry has (ids sort by time; this one is from the first millisecond).
NO_SUCH_ID = "0000000000ZZZZZZZZZZZZZZZZ"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def cursor_for(call_id: str) -> str:
    """The cursor the API would issue for a page ending at ``call_id``."""
    return base64.urlsafe_b64encode(f"v1:{call_id}".encode()).decode().rstrip("=")


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_get(url: str, target: str, headers: dict[str, str], method: str = "GET") -> RawAnswer:
    """``method target`` sent byte for byte (a path an HTTP client would normalise first)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    if found.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return RawAnswer(int(status_line.split()[1]), found, body)


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


# --- the audit query API --------------------------------------------------------------------------------------


@dataclass
class Trail:
    url: str
    origin: str
    keys: dict[str, str]
    database: Path
    globex_ids: list[str]
    acme_ids: list[str]

    def get(self, label: str, query: str = "", path: str = TOOL_CALLS, **headers: str) -> httpx.Response:
        return httpx.get(self.url + path + query, headers={**bearer(self.keys[label]), **headers})

    def calls(self, label: str, query: str = "", **headers: str) -> list[dict[str, Any]]:
        response = self.get(label, query, **headers)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["calls"]
        return found

    def key_id(self, label: str) -> str:
        return parse_key(self.keys[label])[0]


def trails(calls: list[dict[str, Any]]) -> set[str]:
    """The tenants whose trails ``calls`` are in: a read of a trail is in the trail it read (an operator's read
    of another tenant too), any other call in its own tenant's."""
    return {call["read_tenant"] or call["tenant"] for call in calls}


def tool_call(url: str, key: str, tool: str = "read_tool", path: str = "/mcp") -> httpx.Response:
    return httpx.post(url + path, json=rpc("tools/call", {"name": tool, "arguments": {}}), headers=bearer(key))


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    database = tmp_path_factory.mktemp("audit-api-attacks") / "audit.db"
    store = open_store("memory://")
    keys = make_keys(
        store,
        {
            "acme": ("acme", ["mcp:admin"]),
            "acme-audit": ("acme", ["mcp:audit"]),
            "acme-read": ("acme", ["mcp:read"]),
            "globex": ("globex", ["mcp:admin"]),
            "globex-audit": ("globex", ["mcp:audit"]),
            "operator": ("ops", ["mcp:audit"]),
        },
    )
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    config = GuardConfig(
        public_url=origin, tenant_path="/{tenant}/mcp", operator_credentials=(parse_key(keys["operator"])[0],)
    )
    guard = MCPGuard(
        RecordingApp(),
        config,
        keys=cheap_keyring(store),
        tool_lister=list_tools,
        audit=SQLiteAuditStore(str(database)),
        # The probes read the trail far more often in a minute than the default allows a reviewer.
        rate_limits=RateLimits(per_audit_read="10000/minute"),
    )
    with serve(guard, port) as url:
        for _ in range(3):
            assert tool_call(url, keys["globex"]).status_code == 200
            assert tool_call(url, keys["acme"]).status_code == 200
        assert tool_call(url, keys["globex"], path="/globex/mcp").status_code == 200
        operator = bearer(keys["operator"])
        globex = httpx.get(url + TOOL_CALLS + "?tenant=globex&limit=1000", headers=operator).json()["calls"]
        acme = httpx.get(url + TOOL_CALLS + "?tenant=acme&limit=1000", headers=operator).json()["calls"]
        assert len(globex) >= 4
        yield Trail(url, origin, keys, database, [c["id"] for c in globex], [c["id"] for c in acme])


def assert_no_globex(trail: Trail, body: bytes) -> None:
    """Nothing of globex's trail is in ``body``: no call of it, no row naming it. (acme's own entries may name a
    globex id in their path: those are acme's lookups, recorded as acme's; acme's trail also holds the operator's
    reads of it.)"""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "calls" in parsed:
        rows = parsed["calls"]
    elif isinstance(parsed, dict) and "id" in parsed:
        rows = [parsed]
    else:
        text = body.decode("utf-8", "replace")
        assert not any(call_id in text for call_id in trail.globex_ids)
        assert "globex" not in text.replace("tenant=globex", "")
        return
    assert not {row["id"] for row in rows} & set(trail.globex_ids)
    assert trails(rows) <= {"acme"}


@pytest.mark.threat("T-AUDIT-CROSS-TENANT", "T-PATH-EVASION")
@pytest.mark.parametrize(
    "target",
    [
        TOOL_CALLS + "/",
        TOOL_CALLS + "%2F",
        TOOL_CALLS + "%2f?tenant=globex",
        "/" + TOOL_CALLS,
        "/api/mcp//tool-calls",
        "/API/mcp/tool-calls",
        "/api/mcp/Tool-Calls",
        TOOL_CALLS + "/..;",
        TOOL_CALLS + "/..;/?tenant=globex",
        TOOL_CALLS + ";tenant=globex",
        TOOL_CALLS + "/%2e%2e/?tenant=globex",
        TOOL_CALLS + "/../tool-calls?tenant=globex",
        "/globex/api/mcp/tool-calls",
        "/globex" + TOOL_CALLS + "?tenant=globex",
        "/globex/mcp/../../api/mcp/tool-calls",
        "/acme/mcp" + TOOL_CALLS,
        TOOL_CALLS + "?tenant%00=globex",
        TOOL_CALLS + "?tenant[]=globex",
        TOOL_CALLS + "?%20tenant=globex",
        TOOL_CALLS + "?TENANT=globex",
        TOOL_CALLS + "?limit=5;tenant=globex",
        TOOL_CALLS + "?limit=5&&tenant=globex",
    ],
)
def test_no_spelling_of_the_path_or_query_reaches_another_tenants_calls(trail: Trail, target: str) -> None:
    """Trailing slashes, encoded slashes, doubled slashes, case, dot and ``..;`` segments, path parameters, a
    per-tenant prefix and mangled tenant= names: whatever answers, none of globex's calls is in it."""
    answer = raw_get(trail.url, target, bearer(trail.keys["acme-audit"]))
    assert_no_globex(trail, answer.body)


@pytest.mark.threat("T-AUDIT-CROSS-TENANT", "T-TENANT-SPOOF", "T-HEADER-UNDERSCORE")
def test_identity_headers_name_neither_a_tenant_nor_the_operator(trail: Trail) -> None:
    """The guard's own identity headers, sent by the client in any spelling and naming globex and the operator
    credential, change nothing: the reviewer still sees acme alone and still may not pass tenant=."""
    spoofed = {
        "X-MCPGuard-Tenant": "globex",
        "X-MCPGuard-Credential": trail.key_id("operator"),
        "X-MCPGuard-Subject": "key:operator",
        "X-MCPGuard-Scopes": "mcp:admin mcp:audit",
        "X_MCPGuard_Tenant": "globex",
        "x-mcpguard-tenant ": "globex",
    }
    answer = raw_get(trail.url, TOOL_CALLS + "?limit=1000", {**bearer(trail.keys["acme-audit"]), **spoofed})
    assert answer.status in (200, 400)
    if answer.status == 200:
        assert trails(json.loads(answer.body)["calls"]) == {"acme"}
    assert_no_globex(trail, answer.body)
    tidy = {k: v for k, v in spoofed.items() if not k.endswith(" ")}
    assert trails(trail.calls("acme-audit", "?limit=1000", **tidy)) == {"acme"}
    assert trail.get("acme-audit", "?tenant=globex", **tidy).status_code == 403


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_another_tenants_audit_key_reads_only_its_own_tenant(trail: Trail) -> None:
    """globex's reviewer sees globex alone, whether asking for everything, for acme's call ids or with acme's
    cursor; acme's call ids read as no call at all."""
    seen = trail.calls("globex-audit", "?limit=1000")
    assert trails(seen) == {"globex"}
    for call_id in trail.acme_ids[:3]:
        assert trail.get("globex-audit", path=f"{TOOL_CALLS}/{call_id}").status_code == 404
    after_acme = trail.calls("globex-audit", f"?limit=1000&cursor={cursor_for(trail.acme_ids[0])}")
    assert trails(after_acme) <= {"globex"}


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_another_tenants_call_id_reads_exactly_like_no_call(trail: Trail) -> None:
    """The single-call form answers a globex call id, an id no entry has, and a malformed id with the same
    status and the same bytes, so it cannot be used to learn which ids exist elsewhere."""
    answers = [
        trail.get("acme-audit", path=f"{TOOL_CALLS}/{call_id}")
        for call_id in (trail.globex_ids[0], NO_SUCH_ID, "not-an-id", trail.globex_ids[0].lower())
    ]
    assert {a.status_code for a in answers} == {404}
    assert len({a.content for a in answers}) == 1


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_tenant_parameter_refusal_does_not_tell_existing_tenants_from_unknown_ones(trail: Trail) -> None:
    """A reviewer naming globex (which has calls), an unknown tenant, its own tenant, or tenant= beside a bad
    filter gets one and the same refusal."""
    answers = [
        trail.get("acme-audit", query)
        for query in ("?tenant=globex", "?tenant=no-such-tenant", "?tenant=acme", "?tenant=globex&limit=0")
    ]
    assert {a.status_code for a in answers} == {403}
    assert len({a.content for a in answers}) == 1


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_cursor_at_another_tenants_call_pages_exactly_the_own_older_calls(trail: Trail) -> None:
    """A cursor forged at one of globex's calls is only a position: the page holds exactly acme's calls older
    than that call, in order, and nothing of globex's."""
    pivot = sorted(trail.globex_ids)[len(trail.globex_ids) // 2]
    expected = [call_id for call_id in trail.acme_ids if call_id < pivot]
    assert expected, "the seeded calls interleave"
    seen = trail.calls("acme-audit", f"?limit=1000&cursor={cursor_for(pivot)}")
    assert [c["id"] for c in seen] == expected
    first_page = trail.get("acme-audit", f"?limit=1&cursor={cursor_for(pivot)}").json()
    assert [c["id"] for c in first_page["calls"]] == expected[:1]
    assert first_page["next_cursor"] == (cursor_for(expected[0]) if len(expected) > 1 else None)


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "cursor",
    [
        base64.b64encode(b"v1:" + b"Z" * 26).decode(),  # padded, standard alphabet
        base64.urlsafe_b64encode(b"v1:" + b"z" * 26).decode().rstrip("="),  # lower-case id
        base64.urlsafe_b64encode(b"v2:" + b"Z" * 26).decode().rstrip("="),
        base64.urlsafe_b64encode(b"v1:" + b"Z" * 26 + b"\n").decode().rstrip("="),
        base64.urlsafe_b64encode(b"v1:" + b"Z" * 25 + b"%").decode().rstrip("="),
        base64.urlsafe_b64encode(b"v1:globex:" + b"Z" * 26).decode().rstrip("="),
        base64.urlsafe_b64encode(b'{"tenant":"globex","id":"' + b"Z" * 26 + b'"}').decode().rstrip("="),
    ],
)
def test_forged_cursors_are_refused_or_stay_within_the_tenant(trail: Trail, cursor: str) -> None:
    """Cursors in another alphabet, padded, with a lower-case or cut id, another version, or a tenant written in:
    refused with 400, or (when they still decode to a position) paging acme's calls only."""
    answer = trail.get("acme-audit", f"?limit=1000&cursor={cursor}")
    assert answer.status_code in (200, 400)
    assert_no_globex(trail, answer.content)
    if answer.status_code == 200:
        assert trails(answer.json()["calls"]) <= {"acme"}


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "query",
    [
        "?tool=read_too_",
        "?tool=read%25",
        "?tool=read*",
        "?tool=read_tool*",
        "?tool=[r]ead_tool",
        "?tool=READ_TOOL",
        "?tool=read_tool%20",
        "?tool=%20read_tool",
        "?tool=read_tool%00",
        "?tool=read_tool%00globex",
        "?subject=key:%25",
        "?subject=key:_lobex",
        "?subject=key:globex",
        "?credential=%25",
        "?method=tools/%25",
        "?method=tools/call'--",
        "?decision=allowed'%20OR%20'1'='1",
    ],
)
def test_pattern_characters_case_padding_and_nul_in_filters_match_exactly(trail: Trail, query: str) -> None:
    """LIKE and GLOB wildcards, another case, surrounding spaces, NUL and a globex subject match nothing, or are
    refused: filters compare whole values, within the tenant."""
    answer = trail.get("acme-audit", query)
    assert answer.status_code in (200, 400)
    if answer.status_code == 200:
        assert answer.json()["calls"] == []
    assert trail.calls("acme-audit", "?tool=read_tool"), "the exact name still matches"


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "limit", ["1001", "0", "-1", "+5", "5.0", "1_000", "0x10", "%205", "5%20", "", "1e3", "٣", "1000000000"]
)
def test_limits_outside_one_to_a_thousand_or_not_plain_digits_are_refused(trail: Trail, limit: str) -> None:
    """Signs, decimals, underscores, hex, spaces, exponents, other scripts' digits and the empty string are 400."""
    assert trail.get("acme-audit", f"?limit={limit}").status_code == 400


def test_largest_limit_and_leading_zeros_are_honoured(trail: Trail) -> None:
    """limit=1000 and limit=0001 are accepted and never return more than they name."""
    assert len(trail.calls("acme-audit", "?limit=1000")) <= 1000
    assert len(trail.calls("acme-audit", "?limit=0001")) == 1


@pytest.mark.threat("T-AUDIT-GAP")
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
def test_the_trail_cannot_be_changed_through_the_api(trail: Trail, method: str) -> None:
    """Every method but GET and HEAD is refused, on the list and on one call, even for an admin key, and the
    call is still there afterwards."""
    target = trail.acme_ids[-1]
    for path in (TOOL_CALLS, f"{TOOL_CALLS}/{target}"):
        for label in ("acme-audit", "acme"):
            answer = httpx.request(method, trail.url + path, headers=bearer(trail.keys[label]), content=b"{}")
            assert answer.status_code == 405, (method, path, answer.text)
    assert trail.get("acme-audit", path=f"{TOOL_CALLS}/{target}").status_code == 200


def test_method_refusal_names_the_methods_allowed(trail: Trail) -> None:
    """RFC 9110 §15.5.6: a 405 from the audit API carries an Allow header naming GET and HEAD."""
    answer = httpx.delete(trail.url + TOOL_CALLS, headers=bearer(trail.keys["acme-audit"]))
    assert answer.status_code == 405
    assert {m.strip() for m in answer.headers.get("allow", "").split(",")} >= {"GET", "HEAD"}


def test_head_answers_headers_only_for_the_page_and_one_call(trail: Trail) -> None:
    """HEAD of the JSON page and of one call is 200 with no body, with GET's type and cache headers."""
    for path in (TOOL_CALLS, f"{TOOL_CALLS}/{trail.acme_ids[0]}"):
        answer = httpx.head(trail.url + path, headers=bearer(trail.keys["acme-audit"]))
        assert answer.status_code == 200
        assert answer.content == b""
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["cache-control"] == "no-store"


def test_json_answers_are_not_cached_and_not_sniffed(trail: Trail) -> None:
    """The JSON page and one call, which carry client-chosen text (tool names, user agents), are served as
    application/json with Cache-Control: no-store and X-Content-Type-Options: nosniff, as the exports are."""
    answers = [
        trail.get("acme-audit"),
        trail.get("acme-audit", path=f"{TOOL_CALLS}/{trail.acme_ids[0]}"),
    ]
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["content-type"].split(";")[0] == "application/json"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers.get("x-content-type-options") == "nosniff", answer.request.url


@pytest.mark.threat("T-DNS-REBIND")
def test_the_trail_is_never_readable_cross_origin(trail: Trail) -> None:
    """No answer of the audit API allows another origin to read it: no Access-Control-Allow-Origin on a page,
    an export, a refusal, or a preflight, from the guard's own origin or a foreign one (which is refused)."""
    key = bearer(trail.keys["acme-audit"])
    answers = [
        httpx.get(trail.url + TOOL_CALLS, headers={**key, "Origin": trail.origin}),
        httpx.get(trail.url + TOOL_CALLS, headers={**key, "Origin": trail.origin, "Accept": "text/csv"}),
        httpx.get(trail.url + TOOL_CALLS + "?tenant=globex", headers={**key, "Origin": trail.origin}),
        httpx.get(trail.url + TOOL_CALLS, headers={**key, "Origin": "https://evil.example"}),
        httpx.get(trail.url + TOOL_CALLS, headers={"Origin": "https://evil.example"}),
        httpx.options(
            trail.url + TOOL_CALLS,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        ),
        httpx.options(
            trail.url + TOOL_CALLS,
            headers={**key, "Origin": trail.origin, "Access-Control-Request-Headers": "authorization"},
        ),
    ]
    assert [a.status_code for a in answers][:5] == [200, 200, 403, 403, 403]
    for answer in answers:
        assert "access-control-allow-origin" not in answer.headers, answer.request.url
        assert "access-control-allow-credentials" not in answer.headers


@pytest.mark.threat("T-AUDIT-LEAK", "T-KEY-LEAK")
@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson", "text/csv"])
def test_no_answer_holds_a_key_secret(trail: Trail, accept: str) -> None:
    """Every key has been used and every read recorded, yet no page or export holds any key's secret, nor the
    Authorization header as sent; only key ids appear."""
    everything = trail.get("operator", "?limit=1000", Accept=accept)
    assert everything.status_code == 200
    text = everything.text
    for key in trail.keys.values():
        key_id, _ = parse_key(key)
        assert key not in text
        assert key[len("mk_") + len(key_id) + 1 :] not in text
    assert "Bearer" not in text


def recorded(
    trail: Trail, agent: str, label: str = "operator", query: str = "?limit=1000", count: int = 1
) -> list[dict[str, Any]]:
    """The entries ``label`` sees of requests that sent ``agent`` as their user agent, once ``count`` are there (they
    are written once answered)."""
    found: list[dict[str, Any]] = []
    for _ in range(100):
        found = [c for c in trail.calls(label, query) if c.get("user_agent") == agent]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    return found


def rows_of(answer: httpx.Response) -> list[dict[str, Any]]:
    """The calls of a JSON page, an NDJSON export or a CSV export (an empty cell read as null)."""
    assert answer.status_code == 200, answer.text
    kind = answer.headers["content-type"].split(";")[0]
    if kind == "application/x-ndjson":
        return [json.loads(line) for line in answer.text.splitlines()]
    if kind == "text/csv":
        return [{k: v or None for k, v in row.items()} for row in csv.DictReader(io.StringIO(answer.text))]
    found: list[dict[str, Any]] = answer.json()["calls"]
    return found


@pytest.mark.threat("T-AUDIT-GAP")
def test_reading_the_trail_is_recorded_allowed_or_refused(trail: Trail) -> None:
    """A reviewer's page, export and single-call read, a refused tenant= read, and a read by a key without
    mcp:audit are each in the reader's tenant's trail, with the path, the status and the refusal's reason."""
    agent = "reader/" + uuid.uuid4().hex
    trail.get("acme-audit", **{"User-Agent": agent})
    trail.get("acme-audit", **{"User-Agent": agent, "Accept": "text/csv"})
    trail.get("acme-audit", path=f"{TOOL_CALLS}/{trail.acme_ids[0]}", **{"User-Agent": agent})
    trail.get("acme-audit", "?tenant=globex", **{"User-Agent": agent})
    trail.get("acme-read", **{"User-Agent": agent})
    for _ in range(100):
        entries = recorded(trail, agent, "acme-audit")
        if len(entries) == 5:
            break
        time.sleep(0.02)
    summary = sorted((c["path"], c["status"], c["decision"], c["reason"], c["subject"]) for c in entries)
    assert summary == sorted(
        [
            (TOOL_CALLS, 200, "allowed", None, "key:acme-audit"),
            (TOOL_CALLS, 200, "allowed", None, "key:acme-audit"),
            (f"{TOOL_CALLS}/{trail.acme_ids[0]}", 200, "allowed", None, "key:acme-audit"),
            (TOOL_CALLS, 403, "denied", "tenant", "key:acme-audit"),
            (TOOL_CALLS, 403, "denied", "scope", "key:acme-read"),
        ]
    )
    assert all(c["tenant"] == "acme" and c["http_method"] == "GET" and c["outcome"] == "local" for c in entries)


@pytest.mark.threat("T-AUDIT-CROSS-TENANT", "T-AUDIT-GAP")
def test_an_operators_read_of_a_tenant_is_in_that_tenants_own_trail(trail: Trail) -> None:
    """The operator reading globex's trail (a page, a CSV export, one call) is recorded once each, under the
    operator's tenant and with read_tenant globex: globex's reviewer finds each entry in its own trail, in every
    format, naming the operator's subject and key; acme's reviewer finds none."""
    agent = "operator-read/" + uuid.uuid4().hex
    sent = {"User-Agent": agent}
    assert trail.get("operator", "?tenant=globex", **sent).status_code == 200
    assert trail.get("operator", "?tenant=globex", **sent, Accept="text/csv").status_code == 200
    one_call = f"{TOOL_CALLS}/{trail.globex_ids[0]}"
    assert trail.get("operator", "?tenant=globex", path=one_call, **sent).status_code == 200
    expected = sorted(
        ("ops", "globex", "key:operator", trail.key_id("operator"), path, 200, "allowed", "local")
        for path in (TOOL_CALLS, TOOL_CALLS, one_call)
    )
    for label, query in (("globex-audit", "?limit=1000"), ("operator", "?tenant=ops&limit=1000")):
        entries = recorded(trail, agent, label, query, count=3)
        fields = ("tenant", "read_tenant", "subject", "credential_id", "path", "status", "decision", "outcome")
        summary = [tuple(c[name] for name in fields) for c in entries]
        assert sorted(summary) == expected, label
    for accept in ("application/x-ndjson", "text/csv"):
        exported = rows_of(trail.get("globex-audit", "?limit=1000", Accept=accept))
        reads = [c for c in exported if c["user_agent"] == agent]
        assert [(c["tenant"], c["read_tenant"], c["subject"]) for c in reads] == [("ops", "globex", "key:operator")] * 3
    assert not [c for c in trail.calls("acme-audit", "?limit=1000") if c.get("user_agent") == agent]


@pytest.mark.threat("T-AUDIT-CROSS-TENANT", "T-AUDIT-GAP")
def test_an_operators_read_of_every_tenant_is_recorded_as_such_and_shown_to_no_tenant(trail: Trail) -> None:
    """The operator reading every tenant's trail (no tenant=) is recorded under its own tenant with read_tenant *;
    neither acme's nor globex's reviewer sees it, as its size and timing describe every tenant's trail."""
    agent = "operator-all/" + uuid.uuid4().hex
    assert trail.get("operator", "?limit=5", **{"User-Agent": agent}).status_code == 200
    assert trail.get("operator", **{"User-Agent": agent, "Accept": "application/x-ndjson"}).status_code == 200
    entries = recorded(trail, agent, query="?tenant=ops&limit=1000", count=2)
    assert [(c["tenant"], c["read_tenant"], c["subject"], c["credential_id"], c["status"]) for c in entries] == [
        ("ops", "*", "key:operator", trail.key_id("operator"), 200)
    ] * 2
    assert [c["read_tenant"] for c in recorded(trail, agent, count=2)] == ["*", "*"]
    for label in ("acme-audit", "globex-audit"):
        seen = trail.calls(label, "?limit=1000")
        assert not [c for c in seen if c.get("user_agent") == agent], label
        assert "*" not in trails(seen)


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson", "text/csv"])
def test_a_tenants_trail_holds_nothing_of_another_after_the_operator_read_both(trail: Trail, accept: str) -> None:
    """After the operator read globex's trail, every tenant's, and acme's, and looked up one of globex's calls
    under tenant=acme, acme's reviewer gets, in every format, only acme's calls and the reads of acme's trail: no
    call of globex, no read of globex's or every tenant's trail, and not the lookup whose path names globex's call
    (a lookup that finds nothing read nothing, and names no tenant)."""
    agent = "operator-both/" + uuid.uuid4().hex
    sent = {"User-Agent": agent}
    assert trail.get("operator", "?tenant=globex", **sent).status_code == 200
    assert trail.get("operator", **sent).status_code == 200
    lookup = f"{TOOL_CALLS}/{trail.globex_ids[0]}"
    assert trail.get("operator", "?tenant=acme", path=lookup, **sent).status_code == 404
    assert trail.get("operator", "?tenant=acme", **sent).status_code == 200
    made = recorded(trail, agent, count=4)
    assert sorted((c["read_tenant"] or "", c["path"], c["status"]) for c in made) == [
        ("", lookup, 404),
        ("*", TOOL_CALLS, 200),
        ("acme", TOOL_CALLS, 200),
        ("globex", TOOL_CALLS, 200),
    ]
    rows = rows_of(trail.get("acme-audit", "?limit=1000", Accept=accept))
    assert rows
    assert trails(rows) == {"acme"}
    assert {c["read_tenant"] for c in rows} <= {None, "acme"}
    assert not {c["id"] for c in rows} & set(trail.globex_ids)
    assert [(c["tenant"], c["read_tenant"], c["path"]) for c in rows if c["user_agent"] == agent] == [
        ("ops", "acme", TOOL_CALLS)
    ]


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_a_reviewers_tenant_parameter_is_refused_recorded_and_shown_only_to_its_own_tenant(trail: Trail) -> None:
    """acme's reviewer naming globex (on the page, an export and one call) is refused with 403 each time; each
    refusal is in acme's trail as a tenant refusal naming no tenant read, and none is in globex's trail."""
    agent = "reviewer-tenant/" + uuid.uuid4().hex
    sent = {"User-Agent": agent}
    assert trail.get("acme-audit", "?tenant=globex", **sent).status_code == 403
    assert trail.get("acme-audit", "?tenant=globex", **sent, Accept="text/csv").status_code == 403
    one_call = f"{TOOL_CALLS}/{trail.globex_ids[0]}"
    assert trail.get("acme-audit", "?tenant=globex", path=one_call, **sent).status_code == 403
    entries = recorded(trail, agent, "acme-audit", count=3)
    assert sorted(
        (c["tenant"], c["read_tenant"], c["status"], c["decision"], c["reason"], c["path"]) for c in entries
    ) == sorted(("acme", None, 403, "denied", "tenant", path) for path in (TOOL_CALLS, TOOL_CALLS, one_call))
    assert not [c for c in trail.calls("globex-audit", "?limit=1000") if c.get("user_agent") == agent]


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize(
    "name", ["", "*", "%2A", "globex%20", "%20globex", "glo%2Fbex", "glo bex", "a" * 129, "%00", "globex%0A", "%C3%A9"]
)
def test_the_operators_tenant_must_be_a_tenant_name(trail: Trail, name: str) -> None:
    """The operator naming what no tenant can be called (empty, the every-tenant marker *, spaces, a slash, 129
    characters, NUL, a line break, non-ASCII) is refused with 400, recorded as such, and names no tenant read."""
    agent = "operator-bad-tenant/" + uuid.uuid4().hex
    answer = trail.get("operator", f"?tenant={name}", **{"User-Agent": agent})
    assert answer.status_code == 400
    assert "tenant" in answer.json()["error_description"]
    entries = recorded(trail, agent, query="?tenant=ops&limit=1000")
    assert [(c["status"], c["reason"], c["read_tenant"]) for c in entries] == [(400, "invalid", None)]


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_operator_tenant_selection_is_exact(trail: Trail) -> None:
    """Even for the operator: tenant= twice or empty is 400, another case or an unknown tenant holds none of
    globex's calls, and one call is found only under its own tenant."""
    assert trail.get("operator", "?tenant=globex&tenant=globex").status_code == 400
    assert trail.get("operator", "?tenant=globex&tenant=acme").status_code == 400
    assert trail.get("operator", "?tenant=").status_code == 400
    assert trails(trail.calls("operator", "?tenant=GLOBEX")) <= {"GLOBEX"}
    assert trails(trail.calls("operator", "?tenant=no-such-tenant")) <= {"no-such-tenant"}
    call_id = trail.globex_ids[0]
    assert trail.get("operator", "?tenant=acme", path=f"{TOOL_CALLS}/{call_id}").status_code == 404
    assert trail.get("operator", "?tenant=globex", path=f"{TOOL_CALLS}/{call_id}").json()["tenant"] == "globex"


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
def test_single_call_form_refuses_tenant_parameter_from_a_reviewer(trail: Trail) -> None:
    """tenant= on the single-call form is refused as on the list, so it cannot widen a call-id lookup."""
    call_id = trail.globex_ids[0]
    assert trail.get("acme-audit", "?tenant=globex", path=f"{TOOL_CALLS}/{call_id}").status_code == 403


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("claim", ["jti", "gid"])
def test_token_naming_the_operator_keys_id_is_not_the_operator(claim: str) -> None:
    """The operator is the API key listed by id; a bearer token from the trusted issuer whose token or grant id
    happens to spell that key id (which is the key's visible prefix and travels to the app in
    X-MCPGuard-Credential) is a different credential and may not read another tenant's trail."""
    store = open_store("memory://")
    keys = make_keys(store, {"globex": ("globex", ["mcp:admin"]), "operator": ("ops", ["mcp:audit"])})
    operator_id = parse_key(keys["operator"])[0]
    signing = Ed25519PrivateKey.generate()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    verifier = JWTVerifier(issuer="https://idp.example", audience=f"{origin}/mcp", key=signing.public_key())
    config = GuardConfig(public_url=origin, operator_credentials=(operator_id,))
    audit = SQLiteAuditStore(":memory:")
    guard = MCPGuard(
        RecordingApp(), config, keys=cheap_keyring(store), tokens=verifier, tool_lister=list_tools, audit=audit
    )
    with serve(guard, port) as url:
        assert tool_call(url, keys["globex"]).status_code == 200
        now = int(time.time())
        claims = {
            "iss": "https://idp.example",
            "aud": f"{origin}/mcp",
            "sub": "someone",
            "tenant": "acme",
            "scope": "mcp:audit",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        } | {claim: operator_id}
        token = jwt.encode(claims, signing, algorithm="EdDSA")
        assert httpx.get(url + TOOL_CALLS, headers=bearer(token)).status_code == 200
        answer = httpx.get(url + TOOL_CALLS + "?tenant=globex", headers=bearer(token))
        assert answer.status_code == 403, answer.text[:200]


# --- the same probes over each SQL store -----------------------------------------------------------------------


@contextmanager
def audit_stores(kind: str, tmp_path: Path) -> Iterator[tuple[AuditStore, AuditStore]]:
    """The guard's store of ``kind`` and a second one on the same trail, for the test's own event loop."""
    if kind == "sqlite":
        path = str(tmp_path / "audit.db")
        yield SQLiteAuditStore(path), SQLiteAuditStore(path)
        return
    with postgres_schema() as schema:
        url = pg_url(schema=schema)
        yield PostgresAuditStore(url, operation_timeout=5), PostgresAuditStore(url, operation_timeout=5)


async def _calls_of(reader: AuditStore, tenant: str) -> list[dict[str, Any]]:
    try:
        return (await reader.query(AuditQuery(tenant=tenant, limit=100))).calls
    finally:
        await reader.close()


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_each_store_keeps_filters_exact_and_the_tenant_fixed(kind: str, tmp_path: Path) -> None:
    """Over SQLite and PostgreSQL alike: tool names holding pattern characters, a quote and NUL each match only
    themselves, within the tenant; a globex call id, a cursor at one and the widest time range show acme's
    calls only."""
    store = open_store("memory://")
    specs = {
        "acme": ("acme", ["mcp:admin"]),
        "acme-audit": ("acme", ["mcp:audit"]),
        "globex": ("globex", ["mcp:admin"]),
    }
    keys = make_keys(store, specs)
    names = ["read_tool", "r%d_tool", "x'y", "nul\x00tool"]
    port = free_port()
    with audit_stores(kind, tmp_path) as (audit, reader):
        config = GuardConfig(public_url=f"http://127.0.0.1:{port}")
        guard = MCPGuard(RecordingApp(), config, keys=cheap_keyring(store), tool_lister=list_tools, audit=audit)
        with serve(guard, port) as url:
            for name in names:
                assert tool_call(url, keys["globex"], name).status_code == 200
                assert tool_call(url, keys["acme"], name).status_code == 200
            audit_key = bearer(keys["acme-audit"])

            def calls(query: str) -> list[dict[str, Any]]:
                answer = httpx.get(url + TOOL_CALLS + query, headers=audit_key)
                assert answer.status_code == 200, (query, answer.text)
                found: list[dict[str, Any]] = answer.json()["calls"]
                return found

            for query in ("?tool=read_tool", "?tool=r%25d_tool", "?tool=x'y", "?tool=nul%00tool"):
                found = calls(query)
                assert [c["tenant"] for c in found] == ["acme"], query
            for query in ("?tool=r_d_tool", "?tool=r%25", "?tool=%25", "?tool=x''y", "?tool=nul", "?tool=read_tool%00"):
                assert calls(query) == [], query
            everything = calls("?limit=1000&since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z")
            assert len(everything) >= len(names)
            assert {c["tenant"] for c in everything} == {"acme"}
            foreign = [c["id"] for c in asyncio.run(_calls_of(reader, "globex"))]
            assert len(foreign) == len(names)
            for call_id in foreign:
                assert httpx.get(url + f"{TOOL_CALLS}/{call_id}", headers=audit_key).status_code == 404
                assert {c["tenant"] for c in calls(f"?limit=1000&cursor={cursor_for(call_id)}")} <= {"acme"}
            assert httpx.get(url + f"{TOOL_CALLS}/nul%00tool", headers=audit_key).status_code == 404


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_each_store_shows_an_operators_read_to_the_tenant_read_alone(kind: str, tmp_path: Path) -> None:
    """Over SQLite and PostgreSQL alike: the operator's read of globex is in globex's trail (by the API and by the
    store) with read_tenant globex and the operator's subject and key; its read of every tenant is recorded with *
    and is in neither tenant's trail; acme's trail holds acme's calls alone."""
    store = open_store("memory://")
    specs = {
        "acme": ("acme", ["mcp:admin"]),
        "acme-audit": ("acme", ["mcp:audit"]),
        "globex": ("globex", ["mcp:admin"]),
        "globex-audit": ("globex", ["mcp:audit"]),
        "operator": ("ops", ["mcp:audit"]),
    }
    keys = make_keys(store, specs)
    operator_id = parse_key(keys["operator"])[0]
    port = free_port()
    with audit_stores(kind, tmp_path) as (audit, reader):
        config = GuardConfig(public_url=f"http://127.0.0.1:{port}", operator_credentials=(operator_id,))
        guard = MCPGuard(RecordingApp(), config, keys=cheap_keyring(store), tool_lister=list_tools, audit=audit)
        with serve(guard, port) as url:

            def calls(label: str, query: str = "?limit=1000") -> list[dict[str, Any]]:
                answer = httpx.get(url + TOOL_CALLS + query, headers=bearer(keys[label]))
                assert answer.status_code == 200, (label, query, answer.text)
                found: list[dict[str, Any]] = answer.json()["calls"]
                return found

            assert tool_call(url, keys["acme"]).status_code == 200
            assert tool_call(url, keys["globex"]).status_code == 200
            globex_call = calls("operator", "?tenant=globex")[0]["id"]
            calls("operator")
            reads: list[dict[str, Any]] = []
            for _ in range(100):
                reads = [c for c in calls("operator", "?tenant=ops") if c["path"] == TOOL_CALLS]
                if len(reads) == 2:
                    break
                time.sleep(0.02)
            by_scope = {c["read_tenant"]: c for c in reads}
            assert sorted(by_scope) == ["*", "globex"]
            for read in by_scope.values():
                assert (read["tenant"], read["subject"], read["credential_id"]) == ("ops", "key:operator", operator_id)
            globex_trail = calls("globex-audit")
            assert {c["id"] for c in globex_trail} >= {globex_call, by_scope["globex"]["id"]}
            assert by_scope["*"]["id"] not in {c["id"] for c in globex_trail}
            assert trails(globex_trail) == {"globex"}
            acme_trail = calls("acme-audit")
            assert acme_trail
            assert trails(acme_trail) == {"acme"}
            assert not {c["id"] for c in acme_trail} & {globex_call, *(c["id"] for c in reads)}
            stored = asyncio.run(_calls_of(reader, "globex"))
            assert by_scope["globex"]["id"] in {c["id"] for c in stored}
            assert trails(stored) == {"globex"}


# --- token revocation (RFC 7009) -------------------------------------------------------------------------------


def run(body: Any) -> Any:
    """Run ``body(http)`` with a fresh HTTP client."""

    async def main() -> Any:
        async with httpx.AsyncClient(timeout=20) as http:
            return await body(http)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """The notes server behind the guard with the built-in authorization server (memory store)."""
    with deploy("memory", tmp_path_factory.mktemp("revocation"), failed_auth_limit="100000/minute") as running:
        yield running


async def revoke(http: httpx.AsyncClient, deployment: Deployment, **form: str) -> httpx.Response:
    return await http.post(f"{deployment.url}/oauth/revoke", data=form)


async def new_code(http: httpx.AsyncClient, deployment: Deployment, client_id: str) -> tuple[str, str]:
    """An authorization code for ``client_id`` and its PKCE verifier."""
    pkce = Pkce.new()
    return await code_for(http, deployment, client_id, pkce), pkce.verifier


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN", "T-REFRESH-REPLAY")
def test_revoking_the_newest_refresh_token_ends_every_token_of_its_chain(oauth: Deployment) -> None:
    """Three rotations deep, revoking the live refresh token (with a hint that lies: access_token) ends the
    access token of every rotation and every refresh token of the chain, at the very next request."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, oauth)
        chain = [first]
        for _ in range(2):
            answer = await refresh(http, oauth, client_id, chain[-1]["refresh_token"])
            assert answer.status_code == 200
            chain.append(answer.json())
        for tokens in chain:
            assert (await tools_list(http, oauth, tokens["access_token"])).status_code == 200
        answer = await revoke(
            http, oauth, token=chain[-1]["refresh_token"], client_id=client_id, token_type_hint="access_token"
        )
        assert answer.status_code == 200
        for tokens in chain:
            assert (await tools_list(http, oauth, tokens["access_token"])).status_code == 401
        for tokens in chain:
            assert (await refresh(http, oauth, client_id, tokens["refresh_token"])).status_code == 400

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revoking_an_access_token_with_a_lying_or_unknown_hint_still_ends_the_grant(oauth: Deployment) -> None:
    """token_type_hint is only a hint (RFC 7009 §2.1): refresh_token or a made-up type on an access token
    still ends its grant, refresh token included."""

    async def body(http: httpx.AsyncClient) -> None:
        for hint in ("refresh_token", "id_token"):
            client_id, tokens = await tokens_for(http, oauth)
            answer = await revoke(http, oauth, token=tokens["access_token"], client_id=client_id, token_type_hint=hint)
            assert answer.status_code == 200
            assert (await tools_list(http, oauth, tokens["access_token"])).status_code == 401
            assert (await refresh(http, oauth, client_id, tokens["refresh_token"])).status_code == 400

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN", "T-REFRESH-REPLAY")
def test_revoking_a_rotated_refresh_token_ends_the_grant(oauth: Deployment) -> None:
    """The owner revoking a refresh token that was already rotated ends the whole grant, as presenting it at
    /token would: the live refresh token and the newest access token stop too."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, oauth)
        second = (await refresh(http, oauth, client_id, first["refresh_token"])).json()
        assert (await revoke(http, oauth, token=first["refresh_token"], client_id=client_id)).status_code == 200
        assert (await tools_list(http, oauth, second["access_token"])).status_code == 401
        assert (await refresh(http, oauth, client_id, second["refresh_token"])).status_code == 400

    run(body)


@pytest.mark.threat("T-REFRESH-REPLAY")
def test_another_client_cannot_revoke_through_a_rotated_refresh_token(oauth: Deployment) -> None:
    """A second client holding the victim's old, rotated refresh token cannot end the victim's grant with it:
    the answer is 200, and the victim's live tokens keep working."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, oauth)
        second = (await refresh(http, oauth, client_id, first["refresh_token"])).json()
        thief = (await register(http, oauth))["client_id"]
        answers = [
            await revoke(http, oauth, token=token, client_id=thief)
            for token in (first["refresh_token"], second["refresh_token"], second["access_token"], "mcr_unknown")
        ]
        assert (await tools_list(http, oauth, second["access_token"])).status_code == 200
        assert (await refresh(http, oauth, client_id, second["refresh_token"])).status_code == 200
        # The answer is the same whether the token is someone else's or nobody's: revocation is no oracle.
        assert {(a.status_code, a.content, _stable(a.headers)) for a in answers} == {
            (200, b"", _stable(answers[0].headers))
        }

    run(body)


def _stable(headers: httpx.Headers) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in headers.items() if k not in ("date",)))


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN", "T-REFRESH-REPLAY")
def test_a_refresh_racing_the_revocation_leaves_no_live_token(tmp_path: Path) -> None:
    """Refreshes sent at the same moment as the revocation of their grant (SQLite store): whichever lands first,
    nothing the refreshes returned works afterwards, and the grant stays ended."""
    with deploy("sqlite", tmp_path, failed_auth_limit="10000/minute") as deployment:

        async def body(http: httpx.AsyncClient) -> None:
            for _ in range(3):
                client_id, tokens = await tokens_for(http, deployment)
                racing = await asyncio.gather(
                    refresh(http, deployment, client_id, tokens["refresh_token"]),
                    revoke(http, deployment, token=tokens["refresh_token"], client_id=client_id),
                    refresh(http, deployment, client_id, tokens["refresh_token"]),
                )
                assert racing[1].status_code == 200
                issued = [r.json() for r in (racing[0], racing[2]) if r.status_code == 200]
                for got in [tokens, *issued]:
                    assert (await tools_list(http, deployment, got["access_token"])).status_code == 401
                    assert (await refresh(http, deployment, client_id, got["refresh_token"])).status_code == 400

        run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_failed_client_authentication_revokes_nothing(oauth: Deployment) -> None:
    """A confidential client's token survives revocation attempts with a wrong secret (Basic and form), Basic
    credentials disagreeing with the body's client_id, malformed Basic, no secret at all and no client; a public
    client's token survives an attempt that adds a secret or names no client. Each is invalid_client."""

    async def body(http: httpx.AsyncClient) -> None:
        confidential = await register(http, oauth, token_endpoint_auth_method="client_secret_basic")
        cid, secret = confidential["client_id"], confidential["client_secret"]
        pkce_code = await new_code(http, oauth, cid)
        issued = await http.post(
            f"{oauth.url}/token",
            data={
                "grant_type": "authorization_code",
                "code": pkce_code[0],
                "redirect_uri": REDIRECT,
                "code_verifier": pkce_code[1],
            },
            auth=(cid, secret),
        )
        assert issued.status_code == 200, issued.text
        tokens = issued.json()
        other = await register(http, oauth, token_endpoint_auth_method="client_secret_basic")
        other_secret = other["client_secret"]
        no_colon = {"Authorization": "Basic " + base64.b64encode(cid.encode()).decode()}
        url = f"{oauth.url}/oauth/revoke"
        for token in (tokens["access_token"], tokens["refresh_token"]):
            attempts = [
                http.post(url, data={"token": token}, auth=(cid, "mcs_wrong")),
                http.post(url, data={"token": token, "client_id": cid, "client_secret": "mcs_wrong"}),
                http.post(url, data={"token": token, "client_id": cid}, auth=(other["client_id"], other_secret)),
                http.post(url, data={"token": token, "client_id": cid}),
                http.post(url, data={"token": token}),
                http.post(url, data={"token": token, "client_id": ""}),
                http.post(url, data={"token": token}, headers={"Authorization": "Basic not*base64"}),
                http.post(url, data={"token": token}, headers=no_colon),
                http.post(url, data={"token": token}, auth=(cid, "")),
                http.post(url, data={"token": token, "client_id": "mc_unknown"}),
            ]
            for attempt in attempts:
                answer = await attempt
                assert answer.status_code in (400, 401), answer.text
                assert answer.json()["error"] == "invalid_client"
        assert (await tools_list(http, oauth, tokens["access_token"])).status_code == 200
        public_id, public = await tokens_for(http, oauth)
        for form in ({"client_id": public_id, "client_secret": "anything"}, {}):
            answer = await revoke(http, oauth, token=public["access_token"], **form)
            assert answer.json()["error"] == "invalid_client"
        assert (await tools_list(http, oauth, public["access_token"])).status_code == 200
        refreshed = await http.post(
            f"{oauth.url}/token",
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            auth=(cid, secret),
        )
        assert refreshed.status_code == 200

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revocation_reads_only_a_posted_form(oauth: Deployment) -> None:
    """A token in the query string, a GET, a JSON body, a repeated token parameter or a body that is not a form
    revokes nothing."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, oauth)
        token = tokens["access_token"]
        url = f"{oauth.url}/oauth/revoke"
        query = {"token": token, "client_id": client_id}
        form = {"content-type": "application/x-www-form-urlencoded"}
        plain = {"content-type": "text/plain"}
        answers = [
            await http.post(url, params=query, data={}),
            await http.post(url, params=query, data={"client_id": client_id}),
            await http.get(url, params=query),
            await http.post(url, json=query),
            await http.post(url, content=f"token=x&token={token}&client_id={client_id}", headers=form),
            await http.post(url, content=f"token={token}&client_id={client_id}", headers=plain),
        ]
        assert all(a.status_code in (400, 401, 405) for a in answers), [a.status_code for a in answers]
        assert (await tools_list(http, oauth, token)).status_code == 200

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revoking_one_grant_leaves_the_same_clients_other_grant(oauth: Deployment) -> None:
    """Two approvals of one client are two grants: revoking one's refresh token ends it alone."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, oauth))["client_id"]
        grants = []
        for _ in range(2):
            code, verifier = await new_code(http, oauth, client_id)
            grants.append((await exchange(http, oauth, client_id, code, verifier)).json())
        assert (await revoke(http, oauth, token=grants[0]["refresh_token"], client_id=client_id)).status_code == 200
        assert (await tools_list(http, oauth, grants[0]["access_token"])).status_code == 401
        assert (await tools_list(http, oauth, grants[1]["access_token"])).status_code == 200
        assert (await refresh(http, oauth, client_id, grants[1]["refresh_token"])).status_code == 200

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revoked_token_is_refused_inside_the_session_it_opened(oauth: Deployment) -> None:
    """A session opened with an access token is no shelter: once the grant is revoked, the next request in
    that session is 401, and so is opening its stream."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, oauth)
        headers = {**LEGACY_HEADERS, "authorization": f"Bearer {tokens['access_token']}"}
        opened = await http.post(oauth.resource, json=LEGACY_INITIALIZE, headers=headers)
        assert opened.status_code == 200
        session = {**headers, "mcp-session-id": opened.headers["mcp-session-id"]}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(oauth.resource, json=initialized, headers=session)).status_code == 202
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        assert (await http.post(oauth.resource, json=listing, headers=session)).status_code == 200
        assert (await revoke(http, oauth, token=tokens["access_token"], client_id=client_id)).status_code == 200
        assert (await http.post(oauth.resource, json=listing, headers=session)).status_code == 401
        stream = await http.get(oauth.resource, headers={**session, "accept": "text/event-stream"}, timeout=5)
        assert stream.status_code == 401

    run(body)


@contextmanager
def oauth_guard(
    app: ASGIApp,
    tmp_path: Path,
    *,
    state: str = "memory://",
    port: int | None = None,
    issuer: str | None = None,
    add_users: bool = True,
) -> Iterator[Deployment]:
    """``app`` behind the guard with the built-in authorization server over the store ``state``, signing with
    the keys in ``tmp_path``; ``issuer`` (an origin) when this is a replica of a guard published there."""
    store = open_store(state)
    users = LocalUsers(store, hasher=CHEAP)
    if add_users:
        asyncio.run(users.add(email="ada@acme.test", password=PASSWORD, tenants=["acme"], scopes=["mcp:read"]))
    port = port or free_port()
    own = f"127.0.0.1:{port}"
    origin = issuer or f"http://{own}"
    oauth = BuiltInAuthorizationServer(
        OAuthSettings(issuer=origin, resource=f"{origin}/mcp"),
        store=store,
        keys=SigningKeys.load_or_create(tmp_path / "keys"),
        authenticator=users,
    )
    config = GuardConfig(public_url=origin, allowed_hosts=(own,))
    guard = MCPGuard(
        app, config, keys=cheap_keyring(store), oauth=oauth, tool_lister=list_tools, failed_auth_limit="10000/minute"
    )
    with serve(guard, port) as url:
        yield Deployment(url, store, oauth)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revocation_at_one_replica_is_refused_at_the_next_request_of_another(tmp_path: Path) -> None:
    """Two replicas share one state file and one signing key set; a token already used (and its verification
    cached) at the second is revoked at the first, and the second refuses its very next request."""
    state = f"sqlite:///{tmp_path / 'state.db'}"
    first_port = free_port()
    with (
        oauth_guard(RecordingApp(), tmp_path, state=state, port=first_port) as first,
        oauth_guard(
            RecordingApp(), tmp_path, state=state, issuer=f"http://127.0.0.1:{first_port}", add_users=False
        ) as second,
    ):

        async def body(http: httpx.AsyncClient) -> None:
            client_id, tokens = await tokens_for(http, first)
            for _ in range(2):
                assert (await tools_list(http, second, tokens["access_token"])).status_code == 200
            assert (await revoke(http, first, token=tokens["refresh_token"], client_id=client_id)).status_code == 200
            assert (await tools_list(http, second, tokens["access_token"])).status_code == 401

        run(body)


@dataclass
class TickingApp:
    """An MCP app whose GET stream sends a notification every 50 ms for a few seconds; POSTs get an empty result."""

    ticks: int = 40

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        await read_body(receive)
        if scope["method"] != "GET":
            answer = b'{"jsonrpc":"2.0","id":1,"result":{}}'
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": answer})
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for n in range(self.ticks):
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": f"tick {n}"},
            }
            event = b"event: message\r\ndata: " + json.dumps(note).encode() + b"\r\n\r\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.threat("T-AUDIT-GAP", "T-AUDIT-LEAK", "T-GRANT-REVOKED-TOKEN")
def test_revocation_is_in_the_tenants_trail_and_no_token_is(tmp_path: Path) -> None:
    """The owner's revocation is recorded under the grant's tenant and grant id, the refused call after it as a
    denied auth refusal, and no access or refresh token is anywhere in the trail's files."""
    database = tmp_path / "audit" / "audit.db"
    database.parent.mkdir()
    audit = SQLiteAuditStore(str(database))
    with deploy("memory", tmp_path, audit=audit, failed_auth_limit="10000/minute") as deployment:

        async def body(http: httpx.AsyncClient) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            client_id, first = await tokens_for(http, deployment)
            second = (await refresh(http, deployment, client_id, first["refresh_token"])).json()
            assert (
                await revoke(http, deployment, token=second["access_token"], client_id=client_id)
            ).status_code == 200
            assert (await tools_list(http, deployment, second["access_token"])).status_code == 401
            calls: list[dict[str, Any]] = []
            for _ in range(100):
                calls = (await audit.query(AuditQuery(tenant=None, limit=1000))).calls
                revocations = [c for c in calls if c["path"] == "/oauth/revoke"]
                refusals = [c for c in calls if c["path"] == "/mcp" and c["status"] == 401]
                if revocations and refusals:
                    break
                await asyncio.sleep(0.05)
            return {"first": first, "second": second}, calls

        tokens, calls = run(body)
    asyncio.run(audit.close())
    revocation = next(c for c in calls if c["path"] == "/oauth/revoke")
    assert (revocation["tenant"], revocation["status"], revocation["decision"]) == ("acme", 200, "allowed")
    assert revocation["credential_id"].startswith("g_")
    refusal = next(c for c in calls if c["path"] == "/mcp" and c["status"] == 401)
    assert (refusal["decision"], refusal["reason"]) == ("denied", "auth")
    on_disk = b"".join(p.read_bytes() for p in database.parent.iterdir())
    for issued in tokens.values():
        for name in ("access_token", "refresh_token"):
            assert issued[name].encode() not in on_disk
            assert issued[name].split(".")[-1].encode() not in on_disk
