"""Attacks on the shared stores behind the guard: the Redis rate-limit store and the PostgreSQL audit trail.

Everything runs through ``MCPGuard`` over real sockets, against the real Redis (DB 15) and PostgreSQL.
Outages are made with a private ``redis-server`` or a TCP forwarder the test owns in front of the shared
service, which it freezes (connections accepted, nothing answered) or cuts; the shared services themselves
are never touched. Redis counters are named uniquely for each run (a random tenant, a random client
address behind a trusted proxy), and each PostgreSQL test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import argon2
import httpx
import psycopg
import pytest
import redis
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard import GuardConfig, KeyRing, MCPGuard, open_store
from mcpguard.audit import AuditEvent, AuditQuery, AuditStore, PostgresAuditStore, new_event_id
from mcpguard.ratelimit import RateLimits
from tests.audit.test_audit_store_conformance import PG_PORT, pg_url, postgres_schema
from tests.conftest import free_port, serve, stored_key
from tests.test_credentials_limits_audit_attacks import forged
from tests.test_guard import RecordingApp, list_tools, rpc
from tests.test_keyring import CountingHasher
from tests.test_ratelimit import REDIS_URL, require_redis, unique, unique_ip

REDIS_PORT = 6379
LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
# How long one stalled rate-limit store call may hold a request: the store's one-second command timeout,
# with room for a loaded machine.
STALL_BOUND = 2.5
PASSWORD = "hunter2-9c1f5a"


# --- a forwarder the test controls, and a private redis-server ----------------------------------------------


def _reset(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with suppress(OSError):
        sock.close()


class Forwarder:
    """A TCP forwarder on 127.0.0.1 in front of a real service on ``target_port``.

    ``freeze`` keeps accepting and keeps every connection open but relays nothing either way (a hung
    server); ``thaw`` lets bytes flow again; ``cut`` closes every connection and refuses new ones (a crashed
    server); ``restore`` listens again on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._flowing.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            for sock in self._sockets:
                _reset(sock)
            self._sockets.clear()
        self._flowing.set()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    _reset(client)
                    _reset(upstream)
                    return
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _reset(source)
            _reset(sink)


@contextmanager
def forwarder(target_port: int) -> Iterator[Forwarder]:
    relay = Forwarder(target_port)
    try:
        yield relay
    finally:
        relay.cut()


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, saving nothing to disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    time.sleep(0.05)
        finally:
            probe.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- the guard under test ------------------------------------------------------------------------------------


@dataclass
class Guarded:
    """A served guard: its URL, the app behind it, one key per label, and the address its client appears from."""

    url: str
    app: RecordingApp
    keys: dict[str, str]
    hasher: CountingHasher
    address: str

    def post(
        self, body: bytes | Mapping[str, Any], key: str | None = None, *, path: str = "/mcp", **headers: str
    ) -> httpx.Response:
        sent = {"content-type": "application/json", "x-forwarded-for": self.address, **headers}
        if key is not None:
            sent["authorization"] = f"Bearer {key}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + path, content=content, headers=sent, timeout=60)

    def call(self, label: str, tool: str = "read_tool", **headers: str) -> httpx.Response:
        return self.post(rpc("tools/call", {"name": tool, "arguments": {}}), self.keys[label], **headers)

    def get(self, label: str, path: str, **headers: str) -> httpx.Response:
        sent = {"authorization": f"Bearer {self.keys[label]}", "x-forwarded-for": self.address, **headers}
        return httpx.get(self.url + path, headers=sent, timeout=60)

    def tool_calls(self) -> list[str]:
        """The tools of the tools/call requests that reached the app, in order."""
        return [json.loads(s.body)["params"]["name"] for s in self.app.seen if b'"tools/call"' in s.body]


def closing_store(guard: ASGIApp, store: AuditStore) -> ASGIApp:
    """``guard``, with the audit store closed in the server's own event loop when the server stops."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await store.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await guard(scope, receive, send)

    return app


def add_keys(store: Any, tenants: Mapping[str, str], hasher: argon2.PasswordHasher) -> dict[str, str]:
    """One mcp:admin key per label of ``tenants``, stored straight under that tenant name, as another issuer may."""
    return {
        label: stored_key(store, tenant=tenant, name=label, scopes=("mcp:admin",), hasher=hasher)
        for label, tenant in tenants.items()
    }


@contextmanager
def guarded(tenants: Mapping[str, str], *, address: str | None = None, **options: Any) -> Iterator[Guarded]:
    """``MCPGuard(**options)`` around a recording app on a real socket, behind a trusted proxy on 127.0.0.1 (so
    each guard's client has an address of the run's own); an audit store given is closed when the server stops."""
    hasher = CountingHasher.from_parameters(argon2.profiles.CHEAPEST)
    key_store = open_store("memory://")
    keys = add_keys(key_store, tenants, hasher)
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", trusted_proxies=("127.0.0.1",))
    app = RecordingApp()
    guard: ASGIApp = MCPGuard(
        app, config, keys=KeyRing(store=key_store, hasher=hasher), tool_lister=list_tools, **options
    )
    audit = options.get("audit")
    if audit is not None:
        guard = closing_store(guard, audit)
    with serve(guard, port, proxy_headers=False) as url:
        yield Guarded(url, app, keys, hasher, address or unique_ip())


def statuses(responses: Sequence[httpx.Response]) -> list[int]:
    return [r.status_code for r in responses]


# --- the Redis rate-limit store ------------------------------------------------------------------------------


@pytest.fixture
def shared_redis() -> str:
    """The shared test Redis (fails under CI when it is missing)."""
    require_redis()
    return REDIS_URL


class TestRedisCounterKeys:
    """Two tenants, credentials or tools whose names a careless key scheme would confuse keep their own counters."""

    @pytest.mark.threat("T-RATE-EXHAUST")
    def test_tenants_whose_names_collide_in_a_careless_key_keep_separate_quotas_on_redis(
        self, shared_redis: str
    ) -> None:
        """Separators, escapes, Redis Cluster hash tags, a copy of limits' own key suffix, case variants, unicode
        look-alikes and both normal forms of one letter are each a quota of their own on Redis, and no counter key
        carries a brace (which Redis Cluster would read as a hash tag)."""
        tag = unique("t")
        tenants = {
            "plain": f"{tag}a",
            "upper": f"{tag}a".upper(),
            "slash": f"{tag}a/b",
            "escaped": f"{tag}a%2Fb",
            "escaped-twice": f"{tag}a%252Fb",
            "braces": f"{{{tag}}}",
            "braces-slash": f"{{{tag}}}a/b",
            "colon": f"{tag}a:b",
            "key-suffix": f"{tag}a/2/1/minute",
            "backslash": f"{tag}a\\b",
            "trailing-space": f"{tag}a ",
            "fullwidth": f"{tag}\uff41",
            "cyrillic": f"{tag}\u0430",
            "nfc": f"{tag}\u00e9",
            "nfd": f"{tag}e\u0301",
            "bare": tag,
        }
        limits = RateLimits(per_tenant="2/minute", per_credential="2/minute", strategy="moving-window")
        with guarded(tenants, rate_limits=limits, rate_limit_store=shared_redis) as g:
            for label in tenants:
                assert statuses([g.call(label), g.call(label)]) == [200, 200], label
            for label in tenants:
                assert g.call(label).status_code == 429, label
            assert len(g.tool_calls()) == 2 * len(tenants)
        client = redis.Redis.from_url(shared_redis)
        try:
            written = [key.decode() for key in client.scan_iter(match=f"*{tag}*", count=1000)]
        finally:
            client.close()
        assert written
        assert not [key for key in written if "{" in key or "}" in key]

    @pytest.mark.threat("T-RATE-EXHAUST")
    def test_tenant_and_tool_names_that_split_alike_keep_separate_tool_counters_on_redis(
        self, shared_redis: str
    ) -> None:
        """Tenant ``T`` calling tool ``x/y`` and tenant ``T/x`` calling tool ``y`` (one key if the parts were joined
        with "/" unescaped) each have their own per-tool counter on Redis."""
        tag = unique("t")
        limits = RateLimits(per_tool={"x/y": "1/minute", "y": "1/minute"}, strategy="moving-window")
        with guarded({"t": tag, "tx": f"{tag}/x"}, rate_limits=limits, rate_limit_store=shared_redis) as g:
            assert g.call("t", "x/y").status_code == 200
            assert g.call("tx", "y").status_code == 200
            assert g.call("t", "y").status_code == 200
            assert statuses([g.call("t", "x/y"), g.call("tx", "y"), g.call("t", "y")]) == [429, 429, 429]
            assert g.tool_calls() == ["x/y", "y", "y"]


class TestRedisOutage:
    """Redis stalling, dying and coming back under a running guard."""

    @pytest.mark.threat("T-STORE-FAIL")
    def test_redis_that_accepts_but_never_answers_refuses_within_a_bound(self) -> None:
        """A rate-limit store that takes the connection and never answers makes a tool call 503 within about the
        store's one-second command timeout; nothing is forwarded."""
        with socket.socket() as stalled:
            stalled.bind(("127.0.0.1", 0))
            stalled.listen(64)  # the kernel completes every handshake; nobody ever reads or answers
            url = f"redis://127.0.0.1:{stalled.getsockname()[1]}/0"
            with guarded({"acme": unique("t")}, rate_limit_store=url) as g:
                began = time.monotonic()
                response = g.call("acme")
                assert response.status_code == 503
                assert time.monotonic() - began < STALL_BOUND
                assert response.json()["error"]["data"]["error"] == "temporarily_unavailable"
                assert g.app.seen == []

    @pytest.mark.threat("T-STORE-FAIL")
    def test_concurrent_calls_from_one_address_are_each_bounded_during_a_stall(self) -> None:
        """Three calls sent at once from one address (one NAT, one load balancer) to a guard whose Redis has hung are
        each answered 503 within the bound of one store call, not one store timeout after another."""
        with socket.socket() as stalled:
            stalled.bind(("127.0.0.1", 0))
            stalled.listen(64)
            url = f"redis://127.0.0.1:{stalled.getsockname()[1]}/0"
            with guarded({"acme": unique("t")}, rate_limit_store=url) as g:

                def timed(_: int) -> tuple[int, float]:
                    began = time.monotonic()
                    status = g.call("acme").status_code
                    return status, time.monotonic() - began

                with ThreadPoolExecutor(max_workers=3) as pool:
                    answered = list(pool.map(timed, range(3)))
                assert [status for status, _ in answered] == [503] * 3
                assert g.app.seen == []
                slowest = max(seconds for _, seconds in answered)
                assert slowest < STALL_BOUND, f"slowest call took {slowest:.1f} s: {answered}"

    @pytest.mark.threat("T-STORE-FAIL")
    def test_redis_hanging_mid_run_refuses_then_recovers_when_it_answers_again(self, shared_redis: str) -> None:
        """A Redis that stops answering under a running guard turns tool calls into 503s within the bound (nothing
        forwarded); once it answers again, calls pass and are counted, without restarting the guard."""
        with forwarder(REDIS_PORT) as relay:
            limits = RateLimits(per_tenant="3/minute", strategy="moving-window")
            url = f"redis://127.0.0.1:{relay.port}/15"
            with guarded({"acme": unique("t")}, rate_limits=limits, rate_limit_store=url) as g:
                assert g.call("acme").status_code == 200
                relay.freeze()
                began = time.monotonic()
                assert g.call("acme").status_code == 503
                assert time.monotonic() - began < STALL_BOUND
                assert len(g.app.seen) == 1
                relay.thaw()
                recovered = g.call("acme")
                assert recovered.status_code == 200
                assert int(recovered.headers["ratelimit-remaining"]) <= 1
                assert len(g.app.seen) == 2

    @pytest.mark.threat("T-STORE-FAIL")
    def test_restarted_redis_is_used_again_without_restarting_the_guard(self) -> None:
        """A private redis-server killed and started again on its port (its scripts gone): calls are 503 while it
        is down, then pass and are counted against a limit again."""
        with private_redis() as server:
            limits = RateLimits(per_tenant="2/minute", strategy="moving-window")
            with guarded({"acme": unique("t")}, rate_limits=limits, rate_limit_store=server.url) as g:
                assert g.call("acme").status_code == 200
                server.stop()
                assert g.call("acme").status_code == 503
                server.start()
                assert statuses([g.call("acme"), g.call("acme"), g.call("acme")]) == [200, 200, 429]
                assert len(g.app.seen) == 3

    @pytest.mark.threat("T-STORE-FAIL", "T-RATE-EXHAUST")
    def test_fail_open_passes_calls_uncounted_only_while_the_store_is_down(self, shared_redis: str) -> None:
        """With fail_open, calls made while Redis is cut pass without RateLimit headers; once it is back the quota is
        counted again from where it was, so the outage is a window without limits and nothing more."""
        with forwarder(REDIS_PORT) as relay:
            limits = RateLimits(per_tenant="2/minute", strategy="moving-window", fail_open=True)
            url = f"redis://127.0.0.1:{relay.port}/15"
            with guarded({"acme": unique("t")}, rate_limits=limits, rate_limit_store=url) as g:
                first = g.call("acme")
                assert (first.status_code, first.headers["ratelimit-remaining"]) == (200, "1")
                relay.cut()
                during = [g.call("acme") for _ in range(3)]
                assert statuses(during) == [200, 200, 200]
                assert all(not set(LIMIT_HEADERS) & set(r.headers) for r in during)
                relay.restore()
                assert statuses([g.call("acme"), g.call("acme")]) == [200, 429]
                assert len(g.app.seen) == 5

    @pytest.mark.threat("T-STORE-FAIL", "T-KEY-GUESS")
    def test_fail_open_quotas_do_not_open_key_guessing_during_an_outage(self) -> None:
        """fail_open is for quotas only: with the store down, wrong secrets are refused before any argon2 runs
        (the failed-authentication limit still fails closed), while a key verified before the outage keeps working."""
        with private_redis() as server:
            limits = RateLimits(fail_open=True)
            with guarded({"acme": unique("t")}, rate_limits=limits, rate_limit_store=server.url) as g:
                assert g.call("acme").status_code == 200
                verified = g.hasher.verifies
                server.stop()
                wrong = forged(g.keys["acme"])
                guesses = [g.post(rpc("tools/call", {"name": "read_tool"}), wrong) for _ in range(5)]
                assert statuses(guesses) == [503] * 5
                assert g.hasher.verifies == verified
                assert g.call("acme").status_code == 200
                assert len(g.app.seen) == 2

    @pytest.mark.threat("T-STORE-FAIL")
    def test_store_password_never_reaches_an_answer_or_the_log(self, caplog: pytest.LogCaptureFixture) -> None:
        """With an unreachable Redis and an unreachable PostgreSQL, both named with a password, neither the 503s
        nor anything logged repeat it."""
        caplog.set_level(logging.DEBUG)
        redis_url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
        audit = PostgresAuditStore(pg_url(free_port(), password=PASSWORD), connect_timeout=1)
        for fail_open in (False, True):
            limits = RateLimits(fail_open=fail_open)
            with guarded({"acme": unique("t")}, rate_limits=limits, rate_limit_store=redis_url, audit=audit) as g:
                answers = [g.call("acme"), g.post(rpc("ping")), g.get("acme", "/api/mcp/tool-calls")]
                assert {r.status_code for r in answers} <= {401, 503}
                assert all(PASSWORD not in r.text and PASSWORD not in str(r.headers) for r in answers)
                assert g.app.seen == []
            audit = PostgresAuditStore(pg_url(free_port(), password=PASSWORD), connect_timeout=1)
        assert PASSWORD not in caplog.text
        logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
        assert PASSWORD not in logged


class TestRedisFailedAuthentication:
    """The per-address limit on failed authentication, counted in Redis."""

    @pytest.mark.threat("T-KEY-GUESS")
    def test_replicas_sharing_redis_share_one_failed_authentication_budget(self, shared_redis: str) -> None:
        """Guesses spread over two guards on one Redis are counted together: after the limit both refuse the address
        with 429 before any argon2 runs, while another address is still heard."""
        address = unique_ip()
        tenant = unique("t")
        options = {"rate_limit_store": shared_redis, "failed_auth_limit": "3/minute"}
        with (
            guarded({"a": tenant}, address=address, **options) as one,
            guarded({"b": tenant}, address=address, **options) as two,
        ):
            wrong = forged(one.keys["a"])
            answers = [g.post(rpc("ping"), wrong) for g in (one, two, one)]
            assert statuses(answers) == [401, 401, 401]
            before = one.hasher.verifies + two.hasher.verifies
            assert statuses([one.post(rpc("ping"), wrong), two.post(rpc("ping"), wrong)]) == [429, 429]
            assert one.hasher.verifies + two.hasher.verifies == before
            assert two.post(rpc("ping"), wrong, **{"x-forwarded-for": unique_ip()}).status_code == 401

    @pytest.mark.threat("T-KEY-GUESS", "T-PASSWORD-GUESS")
    def test_guesses_from_one_ipv6_64_share_a_failed_authentication_budget(self, shared_redis: str) -> None:
        """An IPv6 client holds a whole /64 (2^64 addresses): guesses from addresses in one /64 are counted as one
        client, so moving to the next address in the prefix does not buy fresh guesses; another /64 is not affected."""
        prefix = (0x20010DB8 << 96) | (secrets.randbits(32) << 64)
        in_prefix = [str(ipaddress.IPv6Address(prefix | n)) for n in range(1, 6)]
        with guarded({"a": unique("t")}, rate_limit_store=shared_redis, failed_auth_limit="3/minute") as g:
            wrong = forged(g.keys["a"])
            answers = [g.post(rpc("ping"), wrong, **{"x-forwarded-for": a}) for a in in_prefix[:3]]
            assert statuses(answers) == [401, 401, 401]
            later = [g.post(rpc("ping"), wrong, **{"x-forwarded-for": a}) for a in in_prefix[3:]]
            assert statuses(later) == [429, 429], "a new address in the same /64 got fresh guesses"
            assert g.post(rpc("ping"), wrong, **{"x-forwarded-for": unique_ip()}).status_code == 401


# --- the PostgreSQL audit trail ------------------------------------------------------------------------------


def trail(
    schema: str, sql: str = "SELECT phase, tool, rpc_method, path, status, user_agent FROM audit_events"
) -> list[Any]:
    """Rows of the audit table in ``schema``, read straight from PostgreSQL."""
    with psycopg.connect(pg_url(schema=schema)) as conn:
        return conn.execute(sql).fetchall()


def starts_of(schema: str, tool: str | None = None) -> list[Any]:
    """The start entries in ``schema``'s trail (of ``tool``, when given)."""
    return [row for row in trail(schema) if row[0] == "start" and (tool is None or row[1] == tool)]


def event(
    tenant: str | None = "acme", *, phase: str = "start", at: datetime | None = None, **fields: Any
) -> AuditEvent:
    """An audit entry at ``at`` (now by default), its id sorting by that time."""
    at = at if at is not None else datetime.now(UTC)
    fields = {"rpc_method": "tools/call", "tool": "read_tool", **fields} if phase == "start" else fields
    return AuditEvent(
        id=new_event_id(at.timestamp()), at=at, phase=phase, tenant=tenant, http_method="POST", path="/mcp", **fields
    )  # type: ignore[arg-type]


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema of this test's own in the test database (fails under CI without PostgreSQL)."""
    with postgres_schema() as name:
        yield name


class TestPostgresClientValues:
    """What a client can put in a recorded field cannot break the trail, lose an entry, or slip a call past it."""

    @pytest.mark.threat("T-AUDIT-GAP", "T-STORE-FAIL")
    @pytest.mark.parametrize("where", ["method-unauthenticated", "tool-name"])
    def test_unpaired_surrogate_from_a_client_cannot_stop_the_audit_trail(self, schema: str, where: str) -> None:
        """A JSON \\ud800 escape (valid JSON, not encodable as UTF-8) in a method sent without any credential, or in
        a tool name, is refused (400) and never forwarded; the attempt is in the trail,
        and every later call is still recorded and forwarded: one request must not switch the audit trail off."""
        store = PostgresAuditStore(pg_url(schema=schema))
        with guarded({"admin": "acme"}, audit=store) as g:
            assert g.call("admin").status_code == 200
            if where == "method-unauthenticated":
                odd = g.post(b'{"jsonrpc":"2.0","id":1,"method":"tools/\\ud800"}')
            else:
                odd = g.post(
                    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x\\ud800"}}', g.keys["admin"]
                )
            # Valid JSON, but no text: refused before anything is decided on it, and never forwarded.
            assert odd.status_code == 400
            assert g.tool_calls() == ["read_tool"]
            later = [g.call("admin") for _ in range(3)]
            assert statuses(later) == [200, 200, 200], "the audit trail stopped after one request"
            assert len(starts_of(schema, "read_tool")) == 4
            recorded = [row for row in trail(schema) if row[4] == 400]
            assert recorded, "the odd request left no trace in the trail"

    @pytest.mark.threat("T-AUDIT-GAP", "T-AUDIT-LEAK")
    def test_nul_and_huge_values_through_the_guard_are_recorded_bounded_and_findable(self, schema: str) -> None:
        """A tool name with a NUL, a path with a NUL and thousands of characters, and a huge user agent: each call is
        forwarded only after its start is committed, kept cut to 256 characters with NUL visibly replaced, and a
        reviewer's filter holding the NUL finds it."""
        store = PostgresAuditStore(pg_url(schema=schema))
        with guarded({"admin": "acme"}, audit=store) as g:
            agent = "agent/" + "u" * 5000
            assert g.call("admin", "read\x00tool", **{"user-agent": agent}).status_code == 200
            long_path = "/files/%00" + "p" * 5000
            assert g.post(rpc("ping"), g.keys["admin"], path=long_path).status_code == 200
            assert g.call("admin", "t" * 20_000 + "\x00tail").status_code == 200
            assert len(g.app.seen) == 3
            starts = starts_of(schema)
            assert len(starts) == 3
            tools = {row[1] for row in starts if row[1]}
            assert "read\ufffdtool" in tools
            assert all(len(t) <= 256 and "tail" not in t for t in tools)
            assert any(row[3].startswith("/files/\ufffdppp") and len(row[3]) <= 256 for row in starts)
            assert all(row[5] is None or len(row[5]) <= 256 for row in trail(schema))
            found = g.get("admin", "/api/mcp/tool-calls?tool=read%00tool")
            assert found.status_code == 200
            assert [c["tool"] for c in found.json()["calls"]] == ["read\ufffdtool"]

    @pytest.mark.threat("T-AUDIT-CROSS-TENANT")
    def test_tenant_names_and_filters_with_sql_and_like_metacharacters_match_only_themselves(self, schema: str) -> None:
        """Tenants named with LIKE wildcards, quotes, backslashes, case and normal-form variants and a trailing space
        each see only their own calls; a filter of wildcards or quotes matches nothing it does not spell exactly."""
        tenants = [
            "%",
            "_",
            "a%",
            "a_c",
            "abc",
            "a'b",
            "a''b",
            "a\\b",
            "a\\",
            "Acme",
            "acme",
            "acme ",
            "\u00e9",
            "e\u0301",
        ]

        async def body() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                written = {tenant: event(tenant, subject=f"s-{n}") for n, tenant in enumerate(tenants)}
                for entry in written.values():
                    await store.append(entry, durable=True)
                for tenant, entry in written.items():
                    page = await store.query(AuditQuery(tenant=tenant))
                    assert [c["id"] for c in page.calls] == [entry.id], repr(tenant)
                for value in ("%", "_", "'", "' OR '1'='1", "\\", "%read%", "read_too_"):
                    for field in ("tool", "subject", "credential", "method"):
                        page = await store.query(AuditQuery(tenant=None, **{field: value}))
                        assert page.calls == [], (field, value)
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.threat("T-AUDIT-GAP")
    def test_an_oversized_tenant_entry_fails_alone_and_does_not_take_its_commit_with_it(self, schema: str) -> None:
        """An entry PostgreSQL cannot index (a tenant of 9,000 characters, as a token claim may carry) is refused by
        itself: the other calls committed with it land, like any other entry the server refuses."""
        good = [event() for _ in range(20)]
        bad = event(secrets.token_hex(4500))

        async def body() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                outcomes = await asyncio.gather(
                    *(store.append(e, durable=True) for e in [*good[:10], bad, *good[10:]]), return_exceptions=True
                )
                failed = [type(o).__name__ for o in outcomes if o is not None]
                assert failed == ["StorageUnavailable"], failed
                page = await store.query(AuditQuery(tenant="acme", limit=100))
                assert sorted(c["id"] for c in page.calls) == sorted(e.id for e in good)
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.threat("T-AUDIT-GAP")
    def test_entries_holding_lone_surrogates_are_kept_replaced_with_the_rest_of_their_commit(self, schema: str) -> None:
        """Values no UTF-8 can hold (a lone surrogate, from a token claim or a caller of the store) are kept visibly
        replaced, the entries committed with them land too, and the writer goes on taking entries."""
        good = [event() for _ in range(5)]
        odd = event(tool="tool\ud800", subject="sub\udfff")

        async def body() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                await asyncio.gather(*(store.append(e, durable=True) for e in [*good[:2], odd, *good[2:]]))
                await store.append(event(), durable=True)
                page = await store.query(AuditQuery(tenant="acme", limit=100))
                assert len(page.calls) == 7
                kept = next(c for c in page.calls if c["id"] == odd.id)
                assert (kept["tool"], kept["subject"]) == ("tool\ufffd", "sub\ufffd")
            finally:
                await store.close()

        asyncio.run(body())


class TestPostgresOutage:
    """PostgreSQL cut, hung and back under a running guard: no call is forwarded without its committed start."""

    @pytest.mark.threat("T-AUDIT-GAP", "T-STORE-FAIL")
    def test_cut_database_refuses_calls_unforwarded_then_recovers(self, schema: str) -> None:
        """With the database cut, tool calls (and other forwarded requests) get 503 and reach nothing; when it is
        back the guard records and forwards again by itself, and every forwarded call has its start in the trail."""
        with forwarder(PG_PORT) as relay:
            store = PostgresAuditStore(pg_url(relay.port, schema), operation_timeout=2.0, connect_timeout=2)
            with guarded({"admin": "acme"}, audit=store) as g:
                assert g.call("admin").status_code == 200
                relay.cut()
                refused = [g.call("admin", "write_tool"), g.post(rpc("ping"), g.keys["admin"])]
                assert statuses(refused) == [503, 503]
                assert refused[0].json()["error"]["data"]["error"] == "temporarily_unavailable"
                assert len(g.app.seen) == 1
                relay.restore()
                assert statuses([g.call("admin"), g.call("admin", "drop_tool")]) == [200, 200]
                assert g.tool_calls() == ["read_tool", "read_tool", "drop_tool"]
                assert sorted(row[1] for row in starts_of(schema)) == ["drop_tool", "read_tool", "read_tool"]

    @pytest.mark.threat("T-AUDIT-GAP", "T-STORE-FAIL")
    def test_hung_database_refuses_within_a_bound_and_leaves_no_phantom_forwarded_call(self, schema: str) -> None:
        """A database that stops answering turns a call into 503 within the operation timeout (the connection is
        dropped there, not cancelled in a server that no longer answers), nothing forwarded; once it answers
        again, the refusal is on record and no refused call reads back as a completed one."""
        with forwarder(PG_PORT) as relay:
            store = PostgresAuditStore(pg_url(relay.port, schema), operation_timeout=0.5, connect_timeout=2)
            with guarded({"admin": "acme"}, audit=store) as g:
                assert g.call("admin").status_code == 200
                relay.freeze()
                began = time.monotonic()
                assert g.call("admin", "write_tool").status_code == 503
                took = time.monotonic() - began
                assert g.tool_calls() == ["read_tool"]
                relay.thaw()
                assert g.call("admin", "drop_tool").status_code == 200
                assert g.tool_calls() == ["read_tool", "drop_tool"]
                calls = g.get("admin", "/api/mcp/tool-calls").json()["calls"]
                seen = [(c["tool"], c["outcome"]) for c in calls]
                assert sorted(t for t, outcome in seen if outcome == "complete") == ["drop_tool", "read_tool"], seen
                # A start whose commit timed out may still land once the server answers again; the refusal names it,
                # so the call reads back once, as the refusal it was.
                assert [outcome for t, outcome in seen if t == "write_tool"] == ["local"], seen
                assert took < 3, f"a hung database held the call {took:.1f} s with a 0.5 s operation timeout"


class TestPostgresRetentionAndCursors:
    """Retention deletes only what is old; a reviewer's cursor is a position, never a way into another tenant."""

    @pytest.mark.threat("T-AUDIT-GAP")
    def test_retention_through_the_guard_deletes_only_entries_older_than_the_window(self, schema: str) -> None:
        """With 90 days' retention, the guard's first request deletes entries of 91 days ago in every tenant, and
        keeps those of 89 days ago and everything recent."""
        now = datetime.now(UTC)
        old = [event(t, at=now - timedelta(days=91)) for t in ("acme", "globex", None)]
        kept = [event(t, at=now - timedelta(days=89)) for t in ("acme", "globex", None)]

        async def seed() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                for entry in [*old, *kept]:
                    await store.append(entry, durable=True)
            finally:
                await store.close()

        asyncio.run(seed())
        store = PostgresAuditStore(pg_url(schema=schema))
        with guarded({"admin": "acme"}, audit=store, audit_retention=timedelta(days=90)) as g:
            assert g.call("admin").status_code == 200
            deadline = time.monotonic() + 10
            while True:
                ids = {row[0] for row in trail(schema, "SELECT id FROM audit_events")}
                if not ids & {e.id for e in old} or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert not ids & {e.id for e in old}
        assert {e.id for e in kept} <= ids
        assert len(ids) == len(kept) + 2  # and the call just made: its start and its end

    @pytest.mark.threat("T-AUDIT-CROSS-TENANT")
    def test_tampered_cursors_and_call_ids_stay_within_the_reviewers_tenant(self, schema: str) -> None:
        """On PostgreSQL a reviewer's cursor from another tenant, one forged before or after every call, one naming
        another tenant's call, or one in lower case (which a locale's collation would sort elsewhere) moves only
        within its own tenant's calls or is refused, and another tenant's call id is not found."""

        def cursor(text: str) -> str:
            return base64.urlsafe_b64encode(f"v1:{text}".encode()).decode().rstrip("=")

        store = PostgresAuditStore(pg_url(schema=schema))
        with guarded({"acme": "acme", "globex": "globex"}, audit=store) as g:
            for label in ("acme", "globex", "acme", "globex", "globex"):
                assert g.call(label).status_code == 200
            theirs = g.get("globex", "/api/mcp/tool-calls?limit=1").json()
            foreign = theirs["next_cursor"]
            their_id = theirs["calls"][0]["id"]
            assert foreign
            globex_ids = {c["id"] for c in g.get("globex", "/api/mcp/tool-calls?limit=1000").json()["calls"]}
            for forged_cursor in (foreign, cursor(their_id), cursor("Z" * 26), cursor("0" * 26)):
                answer = g.get("acme", f"/api/mcp/tool-calls?limit=1000&cursor={forged_cursor}")
                assert answer.status_code == 200
                seen = answer.json()["calls"]
                assert all(c["tenant"] == "acme" for c in seen)
                assert not {c["id"] for c in seen} & globex_ids
            assert g.get("acme", f"/api/mcp/tool-calls?cursor={cursor(their_id.lower())}").status_code == 400
            assert g.get("acme", f"/api/mcp/tool-calls/{their_id}").status_code == 404
            assert g.get("globex", f"/api/mcp/tool-calls/{their_id}").status_code == 200
