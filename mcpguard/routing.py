"""Which requests are MCP traffic, and for per-tenant URLs, which tenant the path names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mcpguard.config import GuardConfig
from mcpguard.errors import InvalidRequest

__all__ = ["MCPRoute", "Router"]

_SLASHES = re.compile(r"/{2,}")
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True, slots=True)
class MCPRoute:
    """An MCP endpoint hit: the tenant its path names (``None`` on the plain endpoint)."""

    path_tenant: str | None


class Router:
    """Classifies paths the way a lenient server might route them, so no spelling escapes MCP rules."""

    def __init__(self, config: GuardConfig) -> None:
        self._mcp_path = config.mcp_path
        self._tenant: re.Pattern[str] | None = None
        if config.tenant_path is not None:
            before, _, after = config.tenant_path.partition("{tenant}")
            self._tenant = re.compile(re.escape(before) + r"(?P<tenant>[^/]+)" + re.escape(after))

    def route(self, path: str) -> MCPRoute | None:
        """The MCP route for (decoded) ``path``, or ``None`` for a plain HTTP route.

        Dot segments are refused outright: a server behind us may resolve them where we did not.
        """
        if _DOT_SEGMENT.search(path):
            raise InvalidRequest("path contains dot segments")
        normalized = _SLASHES.sub("/", path)
        if len(normalized) > 1:
            normalized = normalized.rstrip("/")
        if normalized == self._mcp_path:
            return MCPRoute(path_tenant=None)
        if self._tenant is not None:
            match = self._tenant.fullmatch(normalized)
            if match is not None:
                return MCPRoute(path_tenant=match.group("tenant"))
        return None
