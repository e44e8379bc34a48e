"""The one exception tree of mcpguard; each class knows how it goes on the wire.

::

    MCPGuardError                  never raised directly
    ├── AuthenticationRequired     401, no credential was sent
    ├── InvalidToken               401 invalid_token
    ├── InsufficientScope          403 insufficient_scope (names every scope the call needs)
    ├── TenantMismatch             403 tenant_mismatch
    ├── OriginNotAllowed           403 origin_not_allowed (DNS rebinding / cross-site browser calls)
    ├── MisdirectedRequest         421 misdirected_request (a Host this guard does not serve)
    ├── InvalidRequest             400 invalid_request (malformed or ambiguous JSON-RPC)
    │   └── HeaderMismatch         400, Mcp-Method / Mcp-Name disagree with the body
    ├── SessionNotFound            404 session_not_found (unknown, or opened by another principal)
    ├── PayloadTooLarge            413 request_too_large
    ├── MethodNotAllowed           405 method_not_allowed
    ├── RateLimited                429 rate_limited (carries Retry-After and the RateLimit headers)
    ├── OAuthError                 400, the RFC 6749 code it names (invalid_grant, invalid_scope, …)
    │   └── InvalidClient          401 invalid_client (client authentication failed)
    ├── StorageUnavailable         503 temporarily_unavailable (fail closed)
    ├── UpstreamUnavailable        502 bad_gateway (the server behind the guard could not be reached)
    └── UpstreamTimeout            504 gateway_timeout (the server behind the guard did not answer in time)

A subclass carries its wire code (RFC 6749 / RFC 6750 where one exists), its HTTP status, the JSON-RPC
error code used when the refused request was JSON-RPC, and builds its own ``WWW-Authenticate`` and any
other header the refusal needs.
Descriptions are written for the client and never contain credential material.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "AuthenticationRequired",
    "HeaderMismatch",
    "InsufficientScope",
    "InvalidClient",
    "InvalidRequest",
    "InvalidToken",
    "MCPGuardError",
    "MethodNotAllowed",
    "MisdirectedRequest",
    "OAuthError",
    "OriginNotAllowed",
    "PayloadTooLarge",
    "RateLimited",
    "SessionNotFound",
    "StorageUnavailable",
    "TenantMismatch",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]

# JSON-RPC 2.0 codes, and the MCP code for a routing header that disagrees with the body.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
HEADER_MISMATCH = -32020
# Implementation-defined server errors (-32000..-32099) for refusals that are not malformed requests.
UNAUTHORIZED = -32001
FORBIDDEN = -32003
UNAVAILABLE = -32005
# Mirrors HTTP 429, as -32001/-32003 mirror 401/403.
RATE_LIMITED = -32029
# Named in 401 challenges: the scope every credential needs to use the server at all (``scopes.READ``).
BASE_SCOPE = "mcp:read"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class MCPGuardError(Exception):
    """Root of every mcpguard error; never raised directly."""

    error_code: ClassVar[str] = "server_error"
    status: ClassVar[int] = 500
    jsonrpc_code: int = -32603
    # The audit trail's reason when the wire code alone would not tell a reviewer (a replayed token).
    audit_reason: str | None = None

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description

    def challenge(self, resource_metadata: str | None) -> str | None:
        """The ``WWW-Authenticate`` value for this refusal, or ``None`` when it has none."""
        return None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers this refusal carries besides its challenge."""
        return []


class _BearerChallenge(MCPGuardError):
    include_error: ClassVar[bool] = True

    def _params(self) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if self.include_error:
            params.append(("error", self.error_code))
            params.append(("error_description", self.description))
        return params

    def challenge(self, resource_metadata: str | None) -> str | None:
        params = self._params()
        if resource_metadata is not None:
            params.append(("resource_metadata", resource_metadata))
        if not params:
            return "Bearer"
        return "Bearer " + ", ".join(f'{name}="{_quote(value)}"' for name, value in params)


class _Unauthenticated(_BearerChallenge):
    # The least scope that opens the server, so a client authorizing from the challenge asks for no more
    # (MCP scope selection prefers the challenge's scope); a call needing more answers 403 and steps up.
    def _params(self) -> list[tuple[str, str]]:
        return [*super()._params(), ("scope", BASE_SCOPE)]


class AuthenticationRequired(_Unauthenticated):
    """No credential was presented (RFC 6750 §3.1: the challenge carries no error code)."""

    error_code = "unauthorized"
    status = 401
    jsonrpc_code = UNAUTHORIZED
    include_error = False


class InvalidToken(_Unauthenticated):
    """The credential is malformed, unknown, expired, revoked or meant for another resource."""

    error_code = "invalid_token"
    status = 401
    jsonrpc_code = UNAUTHORIZED


class InsufficientScope(_BearerChallenge):
    """The credential is valid but lacks a scope the call needs."""

    error_code = "insufficient_scope"
    status = 403
    jsonrpc_code = FORBIDDEN

    def __init__(self, description: str, *, required: tuple[str, ...]) -> None:
        super().__init__(description)
        self.required = required

    def _params(self) -> list[tuple[str, str]]:
        return [*super()._params(), ("scope", " ".join(self.required))]


class TenantMismatch(MCPGuardError):
    """The request names a tenant other than the one its credential is bound to."""

    error_code = "tenant_mismatch"
    status = 403
    jsonrpc_code = FORBIDDEN


class OriginNotAllowed(MCPGuardError):
    """A browser sent the request from an origin that is not allowed to call this server."""

    error_code = "origin_not_allowed"
    status = 403
    jsonrpc_code = FORBIDDEN


class MisdirectedRequest(MCPGuardError):
    """The ``Host`` is not one this guard serves (as after a DNS-rebinding attack)."""

    error_code = "misdirected_request"
    status = 421
    jsonrpc_code = INVALID_REQUEST


class InvalidRequest(MCPGuardError):
    """The request cannot be decided on safely: malformed, ambiguous, or not JSON-RPC as MCP sends it."""

    error_code = "invalid_request"
    status = 400
    jsonrpc_code = INVALID_REQUEST

    def __init__(self, description: str, *, jsonrpc_code: int | None = None) -> None:
        super().__init__(description)
        if jsonrpc_code is not None:
            self.jsonrpc_code = jsonrpc_code


class HeaderMismatch(InvalidRequest):
    """An ``Mcp-Method`` or ``Mcp-Name`` header disagrees with the body it travels with."""

    jsonrpc_code = HEADER_MISMATCH


class SessionNotFound(MCPGuardError):
    """The ``Mcp-Session-Id`` is unknown here or belongs to another principal; the client starts anew."""

    error_code = "session_not_found"
    status = 404
    jsonrpc_code = INVALID_REQUEST


class PayloadTooLarge(MCPGuardError):
    """The request body is larger than the configured cap."""

    error_code = "request_too_large"
    status = 413
    jsonrpc_code = INVALID_REQUEST


class MethodNotAllowed(MCPGuardError):
    """The HTTP method is not one the endpoint serves; ``allowed`` are those it does (the ``Allow`` header)."""

    error_code = "method_not_allowed"
    status = 405
    jsonrpc_code = INVALID_REQUEST

    def __init__(self, description: str, *, allowed: Sequence[str]) -> None:
        super().__init__(description)
        self.allowed = tuple(allowed)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``Allow``, which a 405 must carry (RFC 9110 §15.5.6)."""
        return [(b"allow", ", ".join(self.allowed).encode())]


class RateLimited(MCPGuardError):
    """A rate limit is used up; ``retry_after`` (whole seconds, at least 1) says when to try again."""

    error_code = "rate_limited"
    status = 429
    jsonrpc_code = RATE_LIMITED

    def __init__(self, description: str, *, retry_after: int, limit: int, remaining: int, reset: int) -> None:
        if retry_after < 1:
            raise ValueError(f"retry_after must be at least 1 second, got {retry_after}")
        super().__init__(description)
        self.retry_after = retry_after
        self.limit = limit
        self.remaining = remaining
        self.reset = reset

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``Retry-After`` and the ``RateLimit-*`` headers of the limit that refused the call."""
        return [
            (b"retry-after", str(self.retry_after).encode()),
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset).encode()),
        ]


class OAuthError(MCPGuardError):
    """An authorization-server endpoint refuses the request with the RFC 6749 / RFC 7591 code it names."""

    status = 400

    def __init__(self, error_code: str, description: str, *, audit_reason: str | None = None) -> None:
        super().__init__(description)
        self.error_code = error_code  # type: ignore[misc]  # per instance: the endpoint's own error vocabulary
        self.audit_reason = audit_reason


class InvalidClient(OAuthError):
    """The client could not be authenticated (RFC 6749 §5.2): unknown, or a wrong secret; 401 with a Basic
    challenge when it tried HTTP Basic, else 400."""

    def __init__(self, description: str, *, basic: bool = False) -> None:
        super().__init__("invalid_client", description)
        self._basic = basic
        self.status = 401 if basic else 400  # type: ignore[misc]  # per instance: depends on how it authenticated

    def challenge(self, resource_metadata: str | None) -> str | None:
        # RFC 6749 §5.2: a client that tried HTTP Basic is answered with a Basic challenge.
        return 'Basic realm="mcpguard"' if self._basic else None


class StorageUnavailable(MCPGuardError):
    """A store could not answer; the guard refuses rather than guess."""

    error_code = "temporarily_unavailable"
    status = 503
    jsonrpc_code = UNAVAILABLE


class UpstreamUnavailable(MCPGuardError):
    """The server behind the guard refused, reset or broke the connection, or answered unusably."""

    error_code = "bad_gateway"
    status = 502
    jsonrpc_code = -32603


class UpstreamTimeout(MCPGuardError):
    """The server behind the guard did not answer within the configured time."""

    error_code = "gateway_timeout"
    status = 504
    jsonrpc_code = -32603
