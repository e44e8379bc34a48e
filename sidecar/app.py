"""The sidecar application: health endpoints, then the full guard, then the forwarding proxy."""

from __future__ import annotations

import aiohttp
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard import (
    AssertionSigner,
    GuardConfig,
    KeyRing,
    MCPGuardError,
    Store,
    TokenVerifier,
    ToolCatalog,
    build_guard,
    send_json,
    tool_lister,
)
from sidecar.proxy import ProxySettings, UpstreamProxy

__all__ = ["SidecarApp", "build_sidecar"]

_READY_PROBE_TIMEOUT = 2.0


class SidecarApp:
    """Answers ``/healthz`` and ``/readyz`` itself and sends everything else through the guard."""

    def __init__(self, guard: ASGIApp, proxy: UpstreamProxy, store: Store) -> None:
        self.guard = guard
        self.proxy = proxy
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def _readiness(self) -> list[str]:
        problems: list[str] = []
        try:
            await self.store.get_key("readiness-probe")
        except MCPGuardError:
            problems.append("state store unavailable")
        try:
            timeout = aiohttp.ClientTimeout(total=_READY_PROBE_TIMEOUT)
            async with self.proxy.session.head(self.proxy.settings.upstream, timeout=timeout):
                pass  # any HTTP answer means the upstream is up and reachable
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            problems.append("upstream unreachable")
        return problems


def build_sidecar(
    *,
    config: GuardConfig,
    proxy: ProxySettings,
    store: Store,
    keys: KeyRing,
    tokens: TokenVerifier | None = None,
    annotations_ttl: float = 300.0,
    assertions: AssertionSigner | None = None,
) -> SidecarApp:
    """The guard in front of a proxy to ``proxy.upstream``; annotations come from the upstream itself."""
    upstream = UpstreamProxy(proxy)
    catalog = ToolCatalog(tool_lister(upstream.exchange), ttl=annotations_ttl)
    guard = build_guard(upstream, config, keys=keys, tokens=tokens, catalog=catalog, assertions=assertions)
    return SidecarApp(guard, upstream, store)
