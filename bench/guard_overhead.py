"""Per-call cost of the guard in process, against the same app without it, and of a cached key check.

Run: ``python bench/guard_overhead.py [--calls 20000]``. Every figure is printed absolute and as a
ratio to a baseline measured in the same run; targets are marked met or not met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import argon2

from mcpguard import GuardConfig, KeyRing, MCPGuard, RateLimits, open_store
from mcpguard.audit import AuditEvent, SQLiteAuditStore, new_event_id

TARGET_MEDIAN_US = 50.0
TARGET_P99_US = 150.0

TOOLS: list[Mapping[str, Any]] = [{"name": "echo", "annotations": {"readOnlyHint": True}}]
BODY = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}}
).encode()
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}'


async def list_tools(host: str | None) -> list[Mapping[str, Any]]:
    return TOOLS


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal MCP-ish app: reads the body, answers a fixed JSON-RPC result."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


def make_call(app: Any, key: str) -> Callable[[], Awaitable[None]]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-length", str(len(BODY)).encode()),
    ]
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def call() -> None:
        status = 0

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(dict(scope), receive, send)
        if status != 200:
            raise RuntimeError(f"benchmark call answered {status}")

    return call


async def timed(call: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    for _ in range(min(1000, calls)):
        await call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT MET"


async def run(calls: int) -> None:
    hasher = argon2.PasswordHasher()  # the production profile: the cache must make its cost vanish
    with tempfile.TemporaryDirectory() as tmp:
        for url in ("memory://", f"sqlite:///{Path(tmp) / 'bench.db'}"):
            ring = KeyRing(store=open_store(url), hasher=hasher)
            key, _ = await ring.create(tenant="bench", scopes=["mcp:read"])
            first = time.perf_counter_ns()
            await ring.verify(key)
            uncached_us = (time.perf_counter_ns() - first) / 1000

            async def verify(ring: KeyRing = ring, key: str = key) -> None:
                await ring.verify(key)

            cached = await timed(verify, calls)
            print(
                f"key check [{url.split(':')[0]}]: first (argon2) {uncached_us:,.0f} µs; cached median "
                f"{statistics.median(cached):.1f} µs, p99 {p99(cached):.1f} µs "
                f"= {statistics.median(cached) / uncached_us:.4f}x the argon2 check"
            )

            kind = url.split(":")[0]
            guard = MCPGuard(echo_app, GuardConfig(), keys=ring, tool_lister=list_tools, rate_limits=None)
            base = await timed(make_call(echo_app, key), calls)
            guarded = await timed(make_call(guard, key), calls)
            b50, g50 = statistics.median(base), statistics.median(guarded)
            added50, added99 = g50 - b50, p99(guarded) - p99(base)
            print(
                f"guard per tools/call [{kind}]: baseline (no guard) median {b50:.1f} µs; "
                f"guarded median {g50:.1f} µs ({g50 / b50:.1f}x baseline), p99 {p99(guarded):.1f} µs"
            )
            print(
                f"  added median {added50:.1f} µs (target <= {TARGET_MEDIAN_US:.0f}: "
                f"{verdict(added50, TARGET_MEDIAN_US)}); added p99 {added99:.1f} µs "
                f"(target <= {TARGET_P99_US:.0f}: {verdict(added99, TARGET_P99_US)})"
            )

            # The same guard with the rate limit on (memory store; a limit the run never reaches).
            limited = MCPGuard(
                echo_app,
                GuardConfig(),
                keys=ring,
                tool_lister=list_tools,
                rate_limits=RateLimits(per_tenant="1000000000/minute"),
            )
            with_limit = await timed(make_call(limited, key), calls)
            l50 = statistics.median(with_limit)
            print(
                f"  + rate limit hit [memory]: median {l50:.1f} µs, so {l50 - g50:.1f} µs per call "
                f"({l50 / g50:.2f}x the guard without it)"
            )

            # And with the audit trail: a durable start (group commit) and an end per call, SQLite WAL.
            audit = SQLiteAuditStore(str(Path(tmp) / f"audit-{kind}.db"))
            audited = MCPGuard(
                echo_app, GuardConfig(), keys=ring, tool_lister=list_tools, rate_limits=None, audit=audit
            )
            with_audit = await timed(make_call(audited, key), max(calls // 4, 1000))
            a50 = statistics.median(with_audit)
            print(
                f"  + audit write [sqlite, sequential]: median {a50:.1f} µs, so {a50 - g50:.1f} µs per call "
                f"({a50 / g50:.2f}x the guard without it)"
            )
            await audit.close()
            await ring.aclose()
    await audit_throughput(calls)


async def audit_throughput(calls: int, concurrency: int = 64) -> None:
    """Durable appends from many concurrent calls: group commit shares each commit among them."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteAuditStore(str(Path(tmp) / "throughput.db"))
        event = AuditEvent(id="", at=AuditEvent.now(), phase="start", tenant="bench", http_method="POST", path="/mcp")
        per_worker = max(calls // concurrency, 10)

        async def worker() -> None:
            for _ in range(per_worker):
                await store.append(event._replace(id=new_event_id()), durable=True)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        total = per_worker * concurrency
        single_start = time.perf_counter()
        for _ in range(200):
            await store.append(event._replace(id=new_event_id()), durable=True)
        single = (time.perf_counter() - single_start) / 200
        await store.close()
    print(
        f"audit throughput [sqlite, {concurrency} concurrent durable appends]: {total / elapsed:,.0f} records/s; "
        f"one at a time: {1 / single:,.0f} records/s ({single * 1e6:.0f} µs each), "
        f"so group commit gives {(total / elapsed) * single:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    asyncio.run(run(parser.parse_args().calls))


if __name__ == "__main__":
    main()
