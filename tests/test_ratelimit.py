"""Rate limits: tenant quotas enforced by the guard over a real socket, on memory and Redis, and the per-IP
limit on failed authentication.

``limits`` owns the clock here, so windows that must pass in a test are two seconds long and the test waits
out the Retry-After it was given once; nothing sleeps longer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import argon2
import httpx
import pytest
import redis
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.storage.redis.redispy import RedispyBridge

from mcpguard import GuardConfig, KeyRing, MCPGuardError, build_guard, open_store
from mcpguard.errors import RateLimited, StorageUnavailable
from mcpguard.ratelimit import FailedAuthLimiter, RateLimitLayer, RateLimits, client_ip, open_limiter_storage
from tests.conftest import free_port, serve
from tests.test_guard import RecordingApp, list_tools

REDIS_URL = "redis://127.0.0.1:6379/15"
CHEAP = argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)
KEYS = {"read": ("acme", ["mcp:read"]), "write": ("acme", ["mcp:write"]), "globex": ("globex", ["mcp:admin"])}
LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


def require_redis() -> None:
    """Skip without the test Redis in DB 15 (fail under CI)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs Redis at {REDIS_URL}: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each backend the rate limits run on."""
    if request.param == "redis":
        require_redis()
        return REDIS_URL
    return "memory://"


def unique(name: str) -> str:
    """``name`` made unique to this test, so runs sharing the test Redis never share a counter (nothing is flushed)."""
    return f"{name}-{secrets.token_hex(6)}"


def unique_ip() -> str:
    """A random address in the IPv6 documentation prefix, for the same reason."""
    return str(ipaddress.IPv6Address((0x20010DB8 << 96) | secrets.randbits(96)))


def dead_redis_url() -> str:
    """A Redis URL on a loopback port nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}/0"


def clear_of_window_edge(window: float, needed: float) -> None:
    """Wait until the next ``needed`` seconds fit in one clock-aligned window, where a sliding counter is exact."""
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.05)


@dataclass
class Served:
    client: httpx.Client
    app: RecordingApp
    keys: dict[str, str]

    def rpc(self, label: str, method: str, params: dict[str, Any] | None = None, rid: int = 7) -> httpx.Response:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            message["params"] = params
        headers = {"Authorization": f"Bearer {self.keys[label]}", "content-type": "application/json"}
        return self.client.post("/mcp", content=json.dumps(message).encode(), headers=headers)

    def call(self, label: str, tool: str = "read_tool", rid: int = 7) -> httpx.Response:
        return self.rpc(label, "tools/call", {"name": tool, "arguments": {}}, rid)


@contextmanager
def guarded(rate_limits: RateLimits, store_url: str) -> Iterator[Served]:
    """The guard with ``rate_limits`` on ``store_url`` around a recording app, served on a real socket."""
    store = open_store("memory://")

    async def make() -> dict[str, str]:
        ring = KeyRing(store=store, hasher=CHEAP)
        tenants = {tenant: unique(tenant) for tenant, _ in KEYS.values()}
        return {
            label: (await ring.create(tenant=tenants[tenant], scopes=scopes, name=label))[0]
            for label, (tenant, scopes) in KEYS.items()
        }

    keys = asyncio.run(make())
    app = RecordingApp()
    port = free_port()
    storage = open_limiter_storage(store_url)
    guard = build_guard(
        app,
        GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        keys=KeyRing(store=store, hasher=CHEAP),
        tool_lister=list_tools,
        rate_limit=lambda inner: RateLimitLayer(inner, rate_limits, storage=storage),
    )
    with serve(guard, port) as url, httpx.Client(base_url=url) as client:
        yield Served(client, app, keys)


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    limit, remaining, reset = (int(response.headers[name]) for name in LIMIT_HEADERS)
    return limit, remaining, reset


class TestTenantQuota:
    @pytest.mark.threat("T-RATE-EXHAUST")
    @pytest.mark.parametrize("strategy", ["sliding-window", "moving-window"])
    def test_call_over_the_quota_refused_with_retry_after(self, store_url: str, strategy: Any) -> None:
        """The 101st tool call in a minute gets 429 with a JSON-RPC error and Retry-After, and is not forwarded."""
        with guarded(RateLimits(strategy=strategy), store_url) as g:
            if strategy == "sliding-window":
                clear_of_window_edge(60, 5)
            seen: list[tuple[int, int, int]] = []
            for n in range(100):
                response = g.call("write", rid=n)
                assert response.status_code == 200
                seen.append(limit_headers(response))
            assert [remaining for _, remaining, _ in seen] == list(range(99, -1, -1))
            assert all(limit == 100 and 1 <= reset <= 60 for limit, _, reset in seen)
            forwarded = len(g.app.seen)

            refused = g.call("read", rid=101)

            assert refused.status_code == 429
            body = refused.json()
            retry_after = refused.headers["retry-after"]
            assert retry_after.isdigit()
            assert 1 <= int(retry_after) <= 60
            assert (body["jsonrpc"], body["id"], body["error"]["code"]) == ("2.0", 101, -32029)
            assert body["error"]["data"] == {"error": "rate_limited"}
            assert f"retry after {retry_after} s" in body["error"]["message"]
            assert limit_headers(refused) == (100, 0, int(retry_after))
            assert len(g.app.seen) == forwarded
            assert g.call("globex").status_code == 200

    @pytest.mark.threat("T-RATE-EXHAUST")
    def test_calls_refused_by_scope_still_count(self, store_url: str) -> None:
        """Tool calls refused for lack of scope use up the tenant's quota, so probing is limited too."""
        with guarded(RateLimits(per_tenant="3/minute", strategy="moving-window"), store_url) as g:
            assert [g.call("read", "write_tool").status_code for _ in range(3)] == [403, 403, 403]
            assert g.call("read").status_code == 429
            assert g.call("write", "write_tool").status_code == 429
            assert g.app.seen == []

    def test_non_tool_calls_do_not_count(self, store_url: str) -> None:
        """ping and tools/list neither use up the quota nor carry RateLimit headers."""
        with guarded(RateLimits(per_tenant="2/minute", strategy="moving-window"), store_url) as g:
            for method in ("ping", "tools/list") * 3:
                response = g.rpc("read", method)
                assert response.status_code == 200
                assert not set(LIMIT_HEADERS) & set(response.headers)
            assert [g.call("read").status_code for _ in range(3)] == [200, 200, 429]

    @pytest.mark.parametrize("strategy", ["sliding-window", "moving-window"])
    def test_call_passes_after_waiting_retry_after(self, store_url: str, strategy: Any) -> None:
        """Once the client has waited the Retry-After it was given, its next call passes."""
        with guarded(RateLimits(per_tenant="5 per 2 seconds", strategy=strategy), store_url) as g:
            for _ in range(12):
                refused = g.call("read")
                if refused.status_code == 429:
                    break
            assert refused.status_code == 429
            retry_after = int(refused.headers["retry-after"])
            assert 1 <= retry_after <= 2
            time.sleep(retry_after)
            assert g.call("read").status_code == 200

    @pytest.mark.threat("T-RATE-EXHAUST")
    def test_finer_limits_refuse_alone(self, store_url: str) -> None:
        """Per-credential, per-tool and per-method limits each refuse their own calls and leave the rest alone."""
        rate_limits = RateLimits(
            per_credential="4/minute",
            per_tool={"write_tool": "2/minute"},
            per_method={"resources/read": "2/minute"},
            strategy="moving-window",
        )
        with guarded(rate_limits, store_url) as g:
            assert [g.call("write", "write_tool").status_code for _ in range(3)] == [200, 200, 429]
            assert [g.call("write").status_code for _ in range(2)] == [200, 429]
            assert g.call("read").status_code == 200
            read = [g.rpc("read", "resources/read", {"uri": "file:///a"}) for _ in range(3)]
            assert [r.status_code for r in read] == [200, 200, 429]
            assert limit_headers(read[0])[:2] == (2, 1)
            assert g.rpc("read", "prompts/get", {"name": "p"}).status_code == 200


class TestStoreFailure:
    @pytest.mark.threat("T-STORE-FAIL")
    def test_store_down_refuses_tool_calls(self) -> None:
        """With the rate-limit store unreachable a tool call gets 503, while calls that count nothing still pass."""
        with guarded(RateLimits(), dead_redis_url()) as g:
            refused = g.call("read")
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == -32005
            assert g.rpc("read", "ping").status_code == 200
            assert len(g.app.seen) == 1

    def test_fail_open_passes_uncounted(self) -> None:
        """With fail_open set, a store outage lets tool calls through without RateLimit headers."""
        with guarded(RateLimits(fail_open=True), dead_redis_url()) as g:
            response = g.call("read")
            assert response.status_code == 200
            assert not set(LIMIT_HEADERS) & set(response.headers)

    @pytest.mark.threat("T-STORE-FAIL")
    def test_redis_stopping_mid_run_refuses(self) -> None:
        """A private redis-server that dies under a running guard turns tool calls into 503s at once."""
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            probe = redis.Redis(port=port, socket_connect_timeout=1)
            deadline = time.monotonic() + 10
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    time.sleep(0.05)
            probe.close()
            with guarded(RateLimits(), f"redis://127.0.0.1:{port}/0") as g:
                assert g.call("read").status_code == 200
                server.terminate()
                server.wait(timeout=10)
                started = time.monotonic()
                assert g.call("read").status_code == 503
                assert time.monotonic() - started < 2
        finally:
            server.kill()
            server.wait(timeout=10)


class JustOpenedWindow(MemoryStorage):
    """A store whose current window holds three hits and opened this millisecond, as Redis then reports it."""

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return 0, 0.0, 3, 2.0 * expiry


class TestFailedAuthLimiter:
    @pytest.mark.threat("T-KEY-GUESS")
    def test_address_over_its_failures_refused_until_the_window_passes(self, store_url: str) -> None:
        """After N failures one address is refused (any key) until Retry-After has passed; another is not."""

        async def scenario() -> None:
            limiter = FailedAuthLimiter(open_limiter_storage(store_url), limit="3 per 2 seconds")
            guesser, bystander = unique_ip(), unique_ip()
            for _ in range(3):
                await limiter.check(guesser)
                await limiter.record_failure(guesser)
            with pytest.raises(RateLimited) as refused:
                await limiter.check(guesser)
            await limiter.check(bystander)
            retry_after = refused.value.retry_after
            assert 1 <= retry_after <= 2
            assert (refused.value.limit, refused.value.remaining) == (3, 0)
            await asyncio.sleep(retry_after)
            await limiter.check(guesser)

        asyncio.run(scenario())

    def test_window_opened_this_millisecond_waits_a_whole_window(self) -> None:
        """When limits reports a reset of "now" for a window that has just opened, Retry-After is the window."""

        async def scenario() -> None:
            with pytest.raises(RateLimited) as refused:
                await FailedAuthLimiter(JustOpenedWindow(), limit="3 per 2 seconds").check(unique_ip())
            assert refused.value.retry_after == 2

        asyncio.run(scenario())

    @pytest.mark.threat("T-KEY-GUESS")
    @pytest.mark.threat("T-KEY-GUESS")
    def test_ipv6_addresses_count_per_64(self) -> None:
        """An IPv6 client picks any address of its /64, so the /64 shares one budget; other /64s, and an IPv4-mapped
        address against its IPv4 twin, count as the addresses they are."""

        async def scenario() -> None:
            limiter = FailedAuthLimiter(limit="1/minute")
            await limiter.record_failure("2001:db8::1")
            for same_64 in ("2001:db8::1", "2001:db8::2", "2001:db8:0:0:ffff:ffff:ffff:ffff"):
                with pytest.raises(RateLimited):
                    await limiter.check(same_64)
            await limiter.check("2001:db8:0:1::1")
            await limiter.record_failure("::ffff:192.0.2.7")
            with pytest.raises(RateLimited):
                await limiter.check("192.0.2.7")
            await limiter.check("192.0.2.8")

        asyncio.run(scenario())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_store_down_refuses_authentication(self) -> None:
        """An unreachable store makes check() raise StorageUnavailable unless fail_open is set."""

        async def scenario() -> None:
            with pytest.raises(StorageUnavailable):
                await FailedAuthLimiter(open_limiter_storage(dead_redis_url())).check("203.0.113.7")
            lenient = FailedAuthLimiter(open_limiter_storage(dead_redis_url()), fail_open=True)
            await lenient.check("203.0.113.7")
            await lenient.record_failure("203.0.113.7")

        asyncio.run(scenario())


async def calls_made(work: Awaitable[None]) -> int:
    """How many Python and C function calls awaiting ``work`` makes, in its task and in any task it lets run."""
    made = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal made
        if event in ("call", "c_call"):
            made += 1

    sys.setprofile(count)
    try:
        await work
    finally:
        sys.setprofile(None)
    return made


class TestManyCounters:
    """An in-process store with many live counters: each call costs what it did with few."""

    @pytest.mark.threat("T-RATE-COUNTER-FLOOD")
    def test_a_flood_of_counters_does_not_slow_every_later_call(self) -> None:
        """Failed sign-ins from 5,000 addresses leave 10,000 live counters; later calls do no more work."""

        async def later_calls(limiter: FailedAuthLimiter) -> None:
            for _ in range(200):
                await limiter.check("203.0.113.7")
                await limiter.record_failure("203.0.113.7")
                await asyncio.sleep(0)  # as a server's loop turns between calls, letting any sweep run

        async def work_after(flood: int) -> int:
            limiter = FailedAuthLimiter(open_limiter_storage("memory://"), limit="1000/minute")
            for n in range(flood):
                await limiter.record_failure(str(ipaddress.ip_address(0x20010DB8 << 96 | n)))
            await asyncio.sleep(0)
            return await calls_made(later_calls(limiter))

        async def scenario() -> None:
            few, many = await work_after(10), await work_after(5000)
            # One sweep of the 10,000 counters is about 10,000 calls; one after every call, two million.
            assert many - few < 25_000, (few, many)

        asyncio.run(scenario())

    def test_expired_counters_are_still_swept_out(self) -> None:
        """Counters that expired are removed by a later sweep, so memory does not grow with old counters."""

        async def scenario() -> None:
            storage = open_limiter_storage("memory://")
            assert isinstance(storage, MemoryStorage)
            for n in range(100):
                await storage.incr(f"old-{n}", 0.2)
            assert len(storage.expirations) == 100
            await asyncio.sleep(1.2)  # past expiry, and past the sweep interval
            await storage.incr("new", 60)
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert set(storage.expirations) == {"new"}

        asyncio.run(scenario())


def http_scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 50000) if peer else None, "headers": headers}


class TestClientIp:
    @pytest.mark.threat("T-KEY-GUESS")
    def test_untrusted_peer_cannot_spoof_forwarded_for(self) -> None:
        """An X-Forwarded-For from a peer that is not a trusted proxy is ignored."""
        assert client_ip(http_scope("203.0.113.7", "198.51.100.2"), frozenset({"127.0.0.1"})) == "203.0.113.7"

    @pytest.mark.threat("T-KEY-GUESS")
    def test_trusted_proxy_names_the_right_most_untrusted_hop(self) -> None:
        """Behind trusted proxies the client is the right-most address they did not write themselves."""
        trusted = frozenset({"127.0.0.1", "10.0.0.2"})
        scope = http_scope("127.0.0.1", "1.1.1.1, 203.0.113.7", "10.0.0.2")
        assert client_ip(scope, trusted) == "203.0.113.7"

    def test_without_forwarded_for_the_peer_is_the_client(self) -> None:
        """A trusted proxy that sends no X-Forwarded-For, or an all-trusted chain, leaves the nearest hop."""
        trusted = frozenset({"127.0.0.1", "10.0.0.2"})
        assert client_ip(http_scope("127.0.0.1"), trusted) == "127.0.0.1"
        assert client_ip(http_scope("127.0.0.1", "10.0.0.2"), trusted) == "10.0.0.2"

    @pytest.mark.threat("T-KEY-GUESS")
    def test_garbage_hop_stops_trust_at_the_proxy_that_reported_it(self) -> None:
        """A hop that is not an address is not used as a key: the trusted proxy that passed it on is."""
        trusted = frozenset({"127.0.0.1", "10.0.0.2"})
        assert client_ip(http_scope("127.0.0.1", "203.0.113.7, evil, 10.0.0.2"), trusted) == "10.0.0.2"
        assert client_ip(http_scope("127.0.0.1", "2001:0db8::1"), trusted) == "2001:db8::1"

    def test_missing_peer_is_one_shared_bucket(self) -> None:
        """A connection without a peer address (a Unix socket) is counted under one name."""
        assert client_ip(http_scope(None), frozenset()) == "unknown"


class TestConfiguration:
    def test_defaults(self) -> None:
        """By default 100 tool calls a minute per tenant, sliding-window counter, failing closed."""
        limits = RateLimits()
        assert (limits.per_tenant, limits.strategy, limits.fail_open) == ("100/minute", "sliding-window", False)

    def test_every_bad_entry_is_reported(self) -> None:
        """Unparseable, multiple and zero limits and an unknown strategy are reported together as a ValueError."""
        with pytest.raises(ValueError, match="invalid mcpguard configuration") as caught:
            RateLimits(
                per_tenant="lots",
                per_credential="1/second; 5/minute",
                per_tool={"t": "0/minute", "ok": "1/hour"},
                per_method={"resources/read": "x"},
                strategy="fixed-window",  # type: ignore[arg-type]
            )
        text = str(caught.value)
        for fragment in ("per_tenant", "per_credential", "per_tool['t']", "per_method['resources/read']", "strategy"):
            assert fragment in text
        assert "per_tool['ok']" not in text
        with pytest.raises(ValueError, match="failed-authentication"):
            FailedAuthLimiter(limit="often")

    def test_store_urls(self) -> None:
        """memory:// and redis:// open limits' async storages, Redis through redis-py."""
        assert isinstance(open_limiter_storage("memory://"), MemoryStorage)
        storage = open_limiter_storage(REDIS_URL)
        assert isinstance(storage, RedisStorage)
        assert isinstance(storage.bridge, RedispyBridge)

    def test_bad_store_url_never_echoes_a_password(self) -> None:
        """An unsupported or malformed store URL is refused naming only its scheme."""
        for url in ("postgresql://u:hunter2@db/x", "redis://:hunter2@cache", "hunter2"):
            with pytest.raises(ValueError, match="rate-limit store URL") as caught:
                open_limiter_storage(url)
            assert "hunter2" not in str(caught.value)


class TestRateLimitedError:
    def test_wire_shape(self) -> None:
        """429 rate_limited with JSON-RPC code -32029, Retry-After and the RateLimit headers."""
        error = RateLimited("slow down", retry_after=7, limit=100, remaining=0, reset=7)
        assert (error.status, error.error_code, error.jsonrpc_code, error.challenge(None)) == (
            429,
            "rate_limited",
            -32029,
            None,
        )
        assert isinstance(error, MCPGuardError)
        assert error.headers() == [
            (b"retry-after", b"7"),
            (b"ratelimit-limit", b"100"),
            (b"ratelimit-remaining", b"0"),
            (b"ratelimit-reset", b"7"),
        ]

    def test_retry_after_is_at_least_one_second(self) -> None:
        """A Retry-After of zero would invite an immediate retry storm, so it cannot be built."""
        with pytest.raises(ValueError, match="at least 1"):
            RateLimited("x", retry_after=0, limit=1, remaining=0, reset=0)

    def test_other_errors_add_no_headers(self) -> None:
        """Refusals other than rate limits carry no extra headers."""
        assert StorageUnavailable("x").headers() == []
