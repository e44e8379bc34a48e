"""What the guard learns about one request, kept in ``scope["mcpguard"]`` and never on a middleware."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import Scope

from mcpguard.headers import HeaderIndex, header_index
from mcpguard.jsonrpc import RpcMessage
from mcpguard.principal import Principal

if TYPE_CHECKING:
    from mcpguard.outcome import Outcome

__all__ = ["RequestState", "first_values", "header", "request_headers", "state_of"]

SCOPE_KEY = "mcpguard"


@dataclass(slots=True)
class RequestState:
    """Per-request facts, filled in by each layer in stack order."""

    is_mcp: bool = False
    path_tenant: str | None = None
    resource: str | None = None
    message: RpcMessage | None = None
    # The MCP POST body the app will receive: the client's bytes unless a layer had to rewrite them.
    body: bytes | None = None
    principal: Principal | None = None
    required_scope: str | None = None
    # Whether the tool of a tools/call is one the server listed or the operator named (not the client's invention).
    known_tool: bool = False
    response_started: bool = False
    # The wire code of the refusal the guard answered with, if it refused.
    refusal: str | None = None
    # The audit reason the refusal named itself, when its wire code is not specific enough.
    refusal_reason: str | None = None
    # Answers (refusals included) may be read by scripts of any origin: the public OAuth endpoints.
    cross_origin: bool = False
    # Set by the audit layer: commits the call's start; the gate awaits it just before the app.
    audit_start: Callable[[], Awaitable[None]] | None = None
    audit_start_id: str | None = None
    # Set by the audit API when it answers with calls: the tenant whose trail was read (or every tenant's).
    read_tenant: str | None = None
    # How the answer went, filled by the first layer that watches it (audit or telemetry) for both.
    outcome: Outcome | None = None
    # The client's headers by name, indexed once for every layer that reads one (see ``request_headers``).
    headers: HeaderIndex | None = None


def state_of(scope: Scope) -> RequestState:
    """The guard's state for this request (created by the outermost layer)."""
    state: RequestState = scope[SCOPE_KEY]
    return state


def request_headers(scope: Scope) -> HeaderIndex:
    """The client's request headers by lower-case name: what the guard decides on.

    The outermost layer indexes them once, after dropping identity headers a client must not send, so each
    layer's look-up is one dictionary read rather than a pass over every header. Headers a layer adds for
    the app (the trusted identity headers) are not the client's and are not in it.
    """
    state: RequestState | None = scope.get(SCOPE_KEY)
    index = state.headers if state is not None else None
    if index is None:
        index = header_index(scope["headers"])
        if state is not None:
            state.headers = index
    return index


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the (lower-case) request header ``name``, or ``None``."""
    values = request_headers(scope).get(name)
    return values[0].decode("latin-1") if values else None


def first_values(scope: Scope, names: frozenset[bytes]) -> dict[bytes, str]:
    """The first value of each of the (lower-case) request headers ``names`` that the request has."""
    index = request_headers(scope)
    return {name: values[0].decode("latin-1") for name in names if (values := index.get(name))}
