"""Bind the request to the credential's tenant: a path naming another tenant is refused, and the app
learns the identity only from the guard (scope, ContextVar, and trusted headers)."""

from __future__ import annotations

from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.assertions import ASSERTION_HEADER, AssertionSigner
from mcpguard.errors import TenantMismatch
from mcpguard.principal import Principal, bound_principal
from mcpguard.request_state import state_of

__all__ = ["IDENTITY_HEADER_PREFIX", "TenantLayer"]

IDENTITY_HEADER_PREFIX = b"x-mcpguard-"


class TenantLayer:
    """Checks the path tenant against the principal and hands the principal to the app."""

    name = "tenant"

    def __init__(self, app: ASGIApp, *, assertions: AssertionSigner | None = None) -> None:
        self.app = app
        self._assertions = assertions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        principal = state.principal
        if principal is None:  # pragma: no cover - the authentication layer always runs first
            raise RuntimeError("tenant binding reached without a principal")
        if state.path_tenant is not None and state.path_tenant != principal.tenant:
            raise TenantMismatch("this credential is not valid for the tenant named in the URL")
        # Inbound copies were stripped by the outermost layer; these are the only ones the app sees.
        identity = _identity_headers(principal)
        if self._assertions is not None:
            identity = (*identity, (ASSERTION_HEADER, self._assertions.sign(principal)))
        scope["headers"] = [*scope["headers"], *identity]
        with bound_principal(principal):
            await self.app(scope, receive, send)


@lru_cache(maxsize=4096)
def _identity_headers(principal: Principal) -> tuple[tuple[bytes, bytes], ...]:
    # A principal is immutable and recurs on every request of its credential, and so do its headers.
    return (
        (b"x-mcpguard-tenant", principal.tenant.encode()),
        (b"x-mcpguard-subject", principal.subject.encode()),
        (b"x-mcpguard-scopes", " ".join(sorted(principal.scopes)).encode()),
        (b"x-mcpguard-credential", principal.credential_id.encode()),
    )
