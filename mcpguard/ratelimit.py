"""Rate limits on top of the ``limits`` library: quotas on authenticated calls, and a per-IP limit on failed sign-ins.

The counting itself (sliding-window counter or moving window, one atomic store operation per hit) is
``limits``'s; this module only decides which limits a request touches and how a refusal is answered.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import quote

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string
from limits.util import WindowStats
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.audit.api import is_audit_read
from mcpguard.config import ConfigError
from mcpguard.errors import RateLimited, StorageUnavailable
from mcpguard.principal import Principal
from mcpguard.request_state import request_headers, state_of

__all__ = [
    "FailedAuthLimiter",
    "RateLimitLayer",
    "RateLimits",
    "Strategy",
    "address_group",
    "client_ip",
    "open_limiter_storage",
]

Strategy = Literal["sliding-window", "moving-window"]

_log = logging.getLogger(__name__)

_TOOLS_CALL = "tools/call"
# With wrap_exceptions every backend error arrives as StorageError; the rest cover a storage handed in unwrapped.
_STORAGE_ERRORS = (StorageError, RedisError, OSError)
_RATELIMIT_HEADERS = frozenset({b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"})
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# limits joins identifiers with "/" and Redis Cluster reads "{...}" as a hash tag: either inside a tenant or tool
# name could make two different counters share one key.
_KEY_UNSAFE = re.compile(r"[/%{}]")
_REDIS_KEY_PREFIX = "mcpguard-ratelimit"
# How often, at most, the in-process store sweeps out expired counters.
_SWEEP_SECONDS = 1.0
# limits' in-process store schedules its sweep through this (name-mangled) method.
_SCHEDULE_SWEEP = "_MemoryStorage__schedule_expiry"
_UNKNOWN_CLIENT = "unknown"
# After a store error, failed-authentication checks fail at once for this long (about one store timeout), so
# calls queued behind each other (key checks run one at a time per address) do not each wait out a stalled store.
_STORE_RETRY_SECONDS = 1.0

_Check = tuple[RateLimitItem, tuple[str, ...]]


def _parse(where: str, text: object, problems: list[str]) -> RateLimitItem | None:
    items: list[RateLimitItem] = []
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            items = parse_many(text)
    if not items:
        problems.append(f"{where}: {text!r} is not a rate limit such as '100/minute' or '5 per 2 seconds'")
    elif len(items) != 1:
        problems.append(f"{where}: {text!r} names {len(items)} limits; give exactly one")
    elif items[0].amount < 1:
        problems.append(f"{where}: {text!r} allows no call at all; refuse the call by scope instead")
    else:
        return items[0]
    return None


def _check_strategy(strategy: object, problems: list[str]) -> None:
    if strategy not in get_args(Strategy):
        problems.append(f"strategy must be one of {', '.join(get_args(Strategy))}, got {strategy!r}")


@dataclass(frozen=True, slots=True)
class _Plan:
    tenant: RateLimitItem
    credential: RateLimitItem | None
    tools: Mapping[str, RateLimitItem]
    methods: Mapping[str, RateLimitItem]
    audit: RateLimitItem | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """Which calls are counted and how many each window allows, as ``limits`` strings such as ``"100/minute"``.

    ``per_audit_read`` bounds the reads of the audit trail (``GET /api/mcp/tool-calls``: a page, an export or one
    call) each credential makes, since each can make the store read thousands of entries; ``None`` lifts it.

    ``fail_open`` lets calls through uncounted while the rate-limit store is down, trading the quota for
    availability (an outage becomes a window without limits); it affects rate limits only and is off by default.
    """

    per_tenant: str = "100/minute"
    per_credential: str | None = None
    per_tool: Mapping[str, str] = field(default_factory=dict)
    per_method: Mapping[str, str] = field(default_factory=dict)
    per_audit_read: str | None = "120/minute"
    strategy: Strategy = "sliding-window"
    fail_open: bool = False

    def __post_init__(self) -> None:
        _compile(self)


def _compile(rate_limits: RateLimits) -> _Plan:
    """The parsed limits, or ``ConfigError`` naming every entry that is not a usable limit."""
    problems: list[str] = []
    tenant = _parse("per_tenant", rate_limits.per_tenant, problems)
    credential = rate_limits.per_credential
    credential_limit = None if credential is None else _parse("per_credential", credential, problems)
    tools = {name: _parse(f"per_tool[{name!r}]", text, problems) for name, text in rate_limits.per_tool.items()}
    methods = {name: _parse(f"per_method[{name!r}]", text, problems) for name, text in rate_limits.per_method.items()}
    audit_read = rate_limits.per_audit_read
    audit = None if audit_read is None else _parse("per_audit_read", audit_read, problems)
    _check_strategy(rate_limits.strategy, problems)
    if problems or tenant is None:
        raise ConfigError(problems)
    return _Plan(
        tenant=tenant,
        credential=credential_limit,
        tools={name: item for name, item in tools.items() if item is not None},
        methods={name: item for name, item in methods.items() if item is not None},
        audit=audit,
    )


def _sweep_at_most_every(storage: MemoryStorage, seconds: float) -> None:
    """Let ``storage`` start its sweep of expired counters at most once every ``seconds``.

    limits starts a sweep of every counter at each hit once the previous sweep is over, which on a busy
    loop is after every hit: a call's cost grew with the number of live counters (every tenant's, every
    address's failed sign-ins), to over a millisecond at ten thousand, so a flood of new counters slowed
    every call. Counts stay exact, as a read drops an expired counter itself; the sweep only frees memory.
    """
    schedule = getattr(storage, _SCHEDULE_SWEEP, None)
    if schedule is None:  # pragma: no cover - a limits release that sweeps differently; tests notice it
        return
    due = 0.0

    async def schedule_now_and_then() -> None:
        nonlocal due
        now = time.monotonic()
        if now >= due:
            due = now + seconds
            await schedule()

    setattr(storage, _SCHEDULE_SWEEP, schedule_now_and_then)


def open_limiter_storage(url: str, *, timeout: float = 1.0) -> Storage:
    """The ``limits`` async storage ``url`` names: ``memory://``, or ``redis://host:port/db`` (``rediss://`` for TLS).

    Redis is reached through redis-py, and ``timeout`` bounds each connect and each command in seconds.
    """
    # Only the scheme is ever repeated back: the rest of a URL may hold a password.
    match = _URL_SCHEME.match(url)
    scheme = match[1].lower() if match else None
    if scheme == "memory":
        storage = storage_from_string("async+memory://", wrap_exceptions=True)
        if isinstance(storage, MemoryStorage):
            _sweep_at_most_every(storage, _SWEEP_SECONDS)
    elif scheme in ("redis", "rediss"):
        try:
            storage = storage_from_string(
                f"async+{scheme}{url[len(scheme) :]}",
                # limits defaults to coredis; redis-py is the one Redis client this project depends on.
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=_REDIS_KEY_PREFIX,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        except (ConfigurationError, ValueError):
            raise ValueError(
                f"the {scheme}:// rate-limit store URL is malformed (expected {scheme}://host:port/db)"
            ) from None
    else:
        named = f" {match[1]!r}" if match else ""
        raise ValueError(f"unsupported rate-limit store URL scheme{named}: expected memory:// or redis://")
    if not isinstance(storage, Storage):  # pragma: no cover - the async+ schemes always give async storage
        raise TypeError("limits returned a synchronous storage for an async URL")
    return storage


def _limiter(storage: Storage, strategy: Strategy) -> RateLimiter:
    if strategy == "moving-window":
        return MovingWindowRateLimiter(storage)
    return SlidingWindowCounterRateLimiter(storage)


def _key_part(value: str) -> str:
    return quote(value, safe="") if _KEY_UNSAFE.search(value) else value


def _reset_in(item: RateLimitItem, stats: WindowStats) -> int:
    """Whole seconds until ``item`` frees a call again, from the window ``limits`` reported."""
    # limits computes reset times against time.time(), so the same clock has to read them. For a window that
    # opened this millisecond it reports "now" (on Redis the TTL is then an exact multiple of the window and
    # the modulo it takes is 0); after a hit that is never true, and one whole window is a bound that holds.
    seconds = math.ceil(stats.reset_time - time.time())
    return seconds if seconds > 0 else item.get_expiry()


def _refusal(what: str, item: RateLimitItem, stats: WindowStats) -> RateLimited:
    retry_after = _reset_in(item, stats)
    return RateLimited(
        f"{what}: {item} exceeded; retry after {retry_after} s",
        retry_after=retry_after,
        limit=item.amount,
        remaining=0,
        reset=retry_after,
    )


class RateLimitLayer:
    """Counts authenticated calls against their limits and answers 429 once one is used up.

    Every ``tools/call`` counts against its tenant (and credential and tool when configured), methods named in
    ``per_method`` against theirs; anything else passes without touching the store.
    """

    name = "rate_limit"

    def __init__(self, app: ASGIApp, rate_limits: RateLimits | None = None, *, storage: Storage | None = None) -> None:
        self.app = app
        rate_limits = rate_limits if rate_limits is not None else RateLimits()
        self._plan = _compile(rate_limits)
        self._limiter = _limiter(
            storage if storage is not None else open_limiter_storage("memory://"), rate_limits.strategy
        )
        self._fail_open = rate_limits.fail_open

    def _checks(self, method: str, tool: str | None, principal: Principal) -> list[_Check]:
        plan = self._plan
        tenant = _key_part(principal.tenant)
        # Broadest first, so a call refused by a narrower limit has still been counted against its tenant.
        checks: list[_Check] = []
        if method == _TOOLS_CALL:
            checks.append((plan.tenant, ("tenant", tenant)))
            if plan.credential is not None:
                checks.append((plan.credential, ("credential", tenant, _key_part(principal.credential_id))))
            if tool is not None and (tool_limit := plan.tools.get(tool)) is not None:
                checks.append((tool_limit, ("tool", tenant, _key_part(tool))))
        method_limit = plan.methods.get(method)
        if method_limit is not None:
            checks.append((method_limit, ("method", tenant, _key_part(method))))
        return checks

    async def _count(self, checks: list[_Check]) -> WindowStats:
        """Hit each limit in turn (one store call each), stop at the first used up, and read the first one's window."""
        for item, identifiers in checks:
            if not await self._limiter.hit(item, *identifiers):
                raise _refusal("rate limit", item, await self._limiter.get_window_stats(item, *identifiers))
        item, identifiers = checks[0]
        return await self._limiter.get_window_stats(item, *identifiers)

    async def _counted(self, checks: list[_Check]) -> WindowStats | None:
        """``_count``, with a store outage refused (503), or let through uncounted (``None``) under ``fail_open``."""
        try:
            return await self._count(checks)
        except _STORAGE_ERRORS as exc:
            if not self._fail_open:
                raise StorageUnavailable("the rate-limit store is unavailable; try again shortly") from exc
            _log.warning(
                "rate-limit store unavailable (%s); passing the call uncounted (fail_open)", type(exc).__name__
            )
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        message, principal = state.message, state.principal
        if message is None or message.method is None or principal is None:
            audit = self._plan.audit
            if audit is not None and principal is not None and is_audit_read(scope["path"]):
                tenant, credential = _key_part(principal.tenant), _key_part(principal.credential_id)
                await self._counted([(audit, ("audit-read", tenant, credential))])
            await self.app(scope, receive, send)
            return
        method = message.method
        if method != _TOOLS_CALL and method not in self._plan.methods:
            await self.app(scope, receive, send)
            return
        checks = self._checks(method, message.name, principal)
        stats = await self._counted(checks)
        if stats is None:
            await self.app(scope, receive, send)
            return
        item = checks[0][0]
        extra = [
            (b"ratelimit-limit", str(item.amount).encode()),
            (b"ratelimit-remaining", str(stats.remaining).encode()),
            (b"ratelimit-reset", str(_reset_in(item, stats)).encode()),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The guard's count is the one the client is held to, so the app's own RateLimit headers give way.
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _RATELIMIT_HEADERS]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def client_ip(scope: Scope, trusted_proxies: frozenset[str]) -> str:
    """The calling client's address: the TCP peer, or, only when that peer is a trusted proxy, the right-most
    ``X-Forwarded-For`` address that is not a trusted proxy itself."""
    client = scope.get("client")
    peer: str = client[0] if client else _UNKNOWN_CLIENT
    if peer not in trusted_proxies:
        return peer
    hops = [
        hop.strip()
        for value in request_headers(scope).get(b"x-forwarded-for", ())
        for hop in value.decode("latin-1").split(",")
    ]
    nearest = peer
    for hop in reversed(hops):
        try:
            address = str(ipaddress.ip_address(hop))
        except ValueError:
            # Trusted proxies write addresses; anything else was supplied further out, so trust stops here.
            return nearest
        if address not in trusted_proxies:
            return address
        nearest = address
    return nearest


def address_group(ip: str) -> str:
    """Whose failed authentications ``ip``'s count with: its own for IPv4, its /64 for IPv6.

    An IPv6 client is routinely given a whole /64 and can pick any address in it, so counting per address
    would give it 2**64 fresh budgets; an IPv4-mapped address counts as the IPv4 address it is.
    """
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class FailedAuthLimiter:
    """Counts failed authentications per client address (per /64 for IPv6: ``address_group``), so an address over its
    limit is refused before any credential is verified (and costs no argon2).

    While the store fails, checks fail closed (503) at once for about a second after each error, rather than each
    waiting out the store's timeout."""

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        limit: str = "20/minute",
        strategy: Strategy = "sliding-window",
        fail_open: bool = False,
    ) -> None:
        problems: list[str] = []
        item = _parse("failed-authentication limit", limit, problems)
        _check_strategy(strategy, problems)
        if problems or item is None:
            raise ConfigError(problems)
        self._item = item
        self._limiter = _limiter(storage if storage is not None else open_limiter_storage("memory://"), strategy)
        self._fail_open = fail_open
        self._down_until = 0.0

    def _key(self, ip: str) -> tuple[str, str]:
        if not self._fail_open and time.monotonic() < self._down_until:
            raise StorageUnavailable("the rate-limit store is unavailable; try again shortly")
        return "failed-auth", _key_part(address_group(ip))

    def _storage_failed(self, exc: Exception) -> None:
        if not self._fail_open:
            self._down_until = time.monotonic() + _STORE_RETRY_SECONDS
            raise StorageUnavailable("the rate-limit store is unavailable; try again shortly") from exc
        _log.warning(
            "rate-limit store unavailable (%s); failed authentication not limited (fail_open)", type(exc).__name__
        )

    async def check(self, ip: str) -> None:
        """Raise ``RateLimited`` if ``ip`` has used up its failed authentications (one store read)."""
        key = self._key(ip)
        try:
            stats = await self._limiter.get_window_stats(self._item, *key)
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return
        if stats.remaining < 1:
            raise _refusal("too many failed authentications from this address", self._item, stats)

    async def attempt(self, ip: str) -> None:
        """Count an attempt from ``ip`` before it is checked, refusing it (``RateLimited``) past the limit.

        One atomic store call, so concurrent attempts cannot all slip past a read of the counter; for
        checks a person makes rarely (signing in), where counting successes too costs nothing.
        """
        key = self._key(ip)
        try:
            if await self._limiter.hit(self._item, *key):
                return
            stats = await self._limiter.get_window_stats(self._item, *key)
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return
        raise _refusal("too many sign-in attempts from this address", self._item, stats)

    async def record_failure(self, ip: str) -> None:
        """Count one failed authentication from ``ip`` (one store call)."""
        key = self._key(ip)
        try:
            await self._limiter.hit(self._item, *key)
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)
