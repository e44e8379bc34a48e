"""Which scope a call needs, and whether a set of granted scopes covers it.

Plain HTTP routes are decided by HTTP method; MCP JSON-RPC by method name, and ``tools/call`` by the
tool's own annotations as the server publishes them (never as the client describes them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMIN",
    "AUDIT",
    "READ",
    "WRITE",
    "ScopePolicy",
    "scope_for_annotations",
]

READ = "mcp:read"
WRITE = "mcp:write"
ADMIN = "mcp:admin"
AUDIT = "mcp:audit"

# Each scope and everything it includes: mcp:read ⊂ mcp:write ⊂ mcp:admin; mcp:audit stands alone
# (admin includes it, so an operator-level key can review its own tenant).
_DEFAULT_IMPLIES: Mapping[str, frozenset[str]] = {
    READ: frozenset({READ}),
    WRITE: frozenset({READ, WRITE}),
    ADMIN: frozenset({READ, WRITE, ADMIN, AUDIT}),
    AUDIT: frozenset({AUDIT}),
}

_HTTP_METHOD_SCOPES: Mapping[str, str] = {
    "GET": READ,
    "HEAD": READ,
    "POST": WRITE,
    "PUT": WRITE,
    "PATCH": WRITE,
    "DELETE": ADMIN,
}

# Methods that only read or keep up the conversation. Everything not listed (and not a notification or
# a `*/list`) needs admin, so a method added to the protocol later is refused until someone decides.
# The spec's listings; another name ending in /list is a method the guard does not know.
_LIST_METHODS = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list", "tasks/list"})
_READ_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "subscriptions/listen",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    }
)


# Every method name of the protocol a client sends to a server: what telemetry names as it is (any other name is
# the client's own choice, which must not mint metric series).
MCP_METHODS = frozenset(
    {
        "tools/call",
        "tasks/get",
        "tasks/result",
        "tasks/cancel",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
        "notifications/tasks/status",
        *_LIST_METHODS,
        *_READ_METHODS,
    }
)


def scope_for_annotations(annotations: Mapping[str, Any] | None) -> str:
    """The scope a tool needs from its MCP annotations, with the spec's defaults for missing hints."""
    if annotations is None:
        return ADMIN
    # `is True` / `is False` on purpose: a hint of another JSON type counts as absent.
    if annotations.get("readOnlyHint") is True:
        return READ
    if annotations.get("destructiveHint") is False:
        return WRITE
    return ADMIN


@dataclass(frozen=True, slots=True, kw_only=True)
class ScopePolicy:
    """Scope rules: the inclusion order and the operator's per-tool overrides."""

    implies: Mapping[str, frozenset[str]] = field(default_factory=lambda: dict(_DEFAULT_IMPLIES))
    tool_overrides: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tool_overrides.values()) - set(self.implies))
        if unknown:
            raise ValueError(f"tool scope overrides name unknown scopes: {', '.join(unknown)}")

    def effective(self, granted: Iterable[str]) -> frozenset[str]:
        """Every scope the granted ones include; unknown granted scopes include only themselves."""
        out: set[str] = set()
        for scope in granted:
            out |= self.implies.get(scope, frozenset({scope}))
        return frozenset(out)

    def allows(self, granted: Iterable[str], required: str) -> bool:
        """Whether the granted scopes cover ``required``."""
        return required in self.effective(granted)

    def for_http(self, method: str) -> str:
        """The scope a plain HTTP route needs for this method (unknown methods need admin)."""
        return _HTTP_METHOD_SCOPES.get(method.upper(), ADMIN)

    def for_tool(self, name: str, annotations: Mapping[str, Any] | None) -> str:
        """The scope ``tools/call`` of ``name`` needs: the override if any, else from its annotations."""
        override = self.tool_overrides.get(name)
        if override is not None:
            return override
        return scope_for_annotations(annotations)

    def for_rpc(self, method: str, *, notification: bool = False) -> str | None:
        """The scope an MCP method needs, or ``None`` for ``tools/call`` (decided per tool).

        ``notifications/*`` need read only as notifications (no id): a request by such a name is no notification,
        and like every method not known to only read, it needs admin.
        """
        if method == "tools/call":
            return None
        if method in _READ_METHODS or method in _LIST_METHODS or (notification and method.startswith("notifications/")):
            return READ
        return ADMIN
