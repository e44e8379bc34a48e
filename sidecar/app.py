"""The sidecar application: health endpoints, then the full guard, then the upstream (HTTP proxy or stdio)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard import (
    AssertionSigner,
    AuditStore,
    BuiltInAuthorizationServer,
    FailedAuthLimiter,
    GuardConfig,
    KeyRing,
    MCPGuardError,
    RateLimits,
    Store,
    Telemetry,
    TokenVerifier,
    ToolCatalog,
    build_guard,
    open_limiter_storage,
    rate_limit_factory,
    send_json,
    state_of,
    tool_lister,
    with_authorization_server,
)
from sidecar.proxy import ProxySettings, UpstreamProxy
from sidecar.stdio_upstream import StdioSettings, StdioUpstream

__all__ = ["Closer", "MCPEndpointOnly", "SidecarApp", "build_sidecar", "build_stdio_sidecar"]

_READY_PROBE_TIMEOUT = 2.0

# Something to release when the server stops, such as a client metadata fetcher's connections.
Closer = Callable[[], Awaitable[None]]


class SidecarApp:
    """Answers ``/healthz`` and ``/readyz`` itself and sends everything else through the guard.

    At shutdown it runs ``on_shutdown`` in order, then closes the audit store.
    """

    def __init__(
        self,
        guard: ASGIApp,
        proxy: UpstreamProxy | StdioUpstream,
        store: Store,
        audit: AuditStore | None = None,
        *,
        on_shutdown: Sequence[Closer] = (),
    ) -> None:
        self.guard = guard
        self.proxy = proxy
        self.store = store
        self.audit = audit
        self.on_shutdown = tuple(on_shutdown)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and (self.audit is not None or self.on_shutdown):
            await self.guard(scope, receive, self._close_before_exit(send))
            return
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            if scope["path"] == "/healthz":
                await send_json(send, 200, {"status": "ok"})
                return
            if scope["path"] == "/readyz":
                problems = await self._readiness()
                await send_json(
                    send, 503 if problems else 200, {"status": "unready" if problems else "ready", "problems": problems}
                )
                return
        await self.guard(scope, receive, send)

    def _close_before_exit(self, send: Send) -> Send:
        audit, closers = self.audit, self.on_shutdown

        async def closing_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                for close in closers:
                    await close()
                # Entries still queued (ends of the last calls) are committed before the process may exit.
                if audit is not None:
                    await audit.close()
            await send(message)

        return closing_send

    async def _readiness(self) -> list[str]:
        problems: list[str] = []
        try:
            await self.store.get_key("readiness-probe")
        except MCPGuardError:
            problems.append("state store unavailable")
        if self.audit is not None:
            try:
                async with asyncio.timeout(_READY_PROBE_TIMEOUT):
                    await self.audit.ping()
            except (MCPGuardError, TimeoutError):
                problems.append("audit store unavailable")
        if isinstance(self.proxy, StdioUpstream):
            if not self.proxy.command_available():
                problems.append("upstream command not found or not executable")
            return problems
        try:
            async with asyncio.timeout(_READY_PROBE_TIMEOUT):
                reachable = await self.proxy.reachable()
        except TimeoutError:
            reachable = False
        if not reachable:
            problems.append("upstream unreachable")
        return problems


class MCPEndpointOnly:
    """In front of the upstream: only what the guard decided on as MCP traffic reaches it; anything else is 404.

    Forwarded, another path would be decided by its HTTP method alone, yet the upstream may still serve MCP
    there: at its own MCP path under another name, on a legacy HTTP+SSE ``/messages`` endpoint, or at a spelling
    it decodes differently (``/mcp%3F``, ``/%256Dcp``).
    """

    def __init__(self, upstream: ASGIApp) -> None:
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not state_of(scope).is_mcp:
            await send_json(send, 404, {"error": "not_found", "error_description": "no such endpoint"})
            return
        await self.upstream(scope, receive, send)


def _assemble(
    upstream: UpstreamProxy | StdioUpstream,
    *,
    config: GuardConfig,
    store: Store,
    keys: KeyRing,
    tokens: TokenVerifier | None,
    oauth: BuiltInAuthorizationServer | None,
    annotations_ttl: float,
    assertions: AssertionSigner | None,
    rate_limits: RateLimits | None,
    rate_limit_store: str,
    audit: AuditStore | None,
    audit_retention: timedelta | None,
    telemetry: Telemetry | None,
    on_shutdown: Sequence[Closer],
) -> SidecarApp:
    catalog = ToolCatalog(tool_lister(upstream.exchange), ttl=annotations_ttl)
    storage = open_limiter_storage(rate_limit_store)
    failed_auth = FailedAuthLimiter(storage)
    # Sign-in failures count against the same per-address limit as bad credentials on the MCP endpoint.
    config, tokens, authorization_server = with_authorization_server(
        config, oauth, tokens=tokens, failed_auth=failed_auth
    )
    guard = build_guard(
        MCPEndpointOnly(upstream),
        config,
        keys=keys,
        tokens=tokens,
        catalog=catalog,
        assertions=assertions,
        failed_auth=failed_auth,
        rate_limit=rate_limit_factory(rate_limits, storage) if rate_limits is not None else None,
        audit=audit,
        audit_retention=audit_retention,
        telemetry=telemetry,
        authorization_server=authorization_server,
    )
    return SidecarApp(guard, upstream, store, audit, on_shutdown=on_shutdown)


def build_sidecar(
    *,
    config: GuardConfig,
    proxy: ProxySettings,
    store: Store,
    keys: KeyRing,
    tokens: TokenVerifier | None = None,
    oauth: BuiltInAuthorizationServer | None = None,
    annotations_ttl: float = 300.0,
    assertions: AssertionSigner | None = None,
    rate_limits: RateLimits | None = RateLimits(),  # noqa: B008 - frozen, so one shared default is safe
    rate_limit_store: str = "memory://",
    audit: AuditStore | None = None,
    audit_retention: timedelta | None = timedelta(days=90),
    telemetry: Telemetry | None = None,
    on_shutdown: Sequence[Closer] = (),
) -> SidecarApp:
    """The guard in front of a proxy to ``proxy.upstream``; annotations come from the upstream itself.

    With ``oauth``, the sidecar also serves that authorization server's endpoints and accepts its access tokens.
    """
    return _assemble(
        UpstreamProxy(proxy),
        config=config,
        store=store,
        keys=keys,
        tokens=tokens,
        oauth=oauth,
        annotations_ttl=annotations_ttl,
        assertions=assertions,
        rate_limits=rate_limits,
        rate_limit_store=rate_limit_store,
        audit=audit,
        audit_retention=audit_retention,
        telemetry=telemetry,
        on_shutdown=on_shutdown,
    )


def build_stdio_sidecar(
    *,
    config: GuardConfig,
    stdio: StdioSettings,
    store: Store,
    keys: KeyRing,
    tokens: TokenVerifier | None = None,
    oauth: BuiltInAuthorizationServer | None = None,
    annotations_ttl: float = 300.0,
    rate_limits: RateLimits | None = RateLimits(),  # noqa: B008 - frozen, so one shared default is safe
    rate_limit_store: str = "memory://",
    audit: AuditStore | None = None,
    audit_retention: timedelta | None = timedelta(days=90),
    telemetry: Telemetry | None = None,
    on_shutdown: Sequence[Closer] = (),
) -> SidecarApp:
    """The guard in front of ``stdio.argv``, run once per MCP session; annotations come from the server itself.

    With ``oauth``, the sidecar also serves that authorization server's endpoints and accepts its access tokens.
    """
    return _assemble(
        StdioUpstream(stdio),
        config=config,
        store=store,
        keys=keys,
        tokens=tokens,
        oauth=oauth,
        annotations_ttl=annotations_ttl,
        assertions=None,
        rate_limits=rate_limits,
        rate_limit_store=rate_limit_store,
        audit=audit,
        audit_retention=audit_retention,
        telemetry=telemetry,
        on_shutdown=on_shutdown,
    )
