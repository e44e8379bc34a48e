"""``GET /api/mcp/tool-calls``: the audit trail for reviewers, scoped to the caller's own tenant.

It runs inside the guard, so the caller is authenticated, tenant-bound and rate-limited like any
other; it needs ``mcp:audit`` (``mcp:admin`` includes it). Only an operator credential (configured by
id) may name another tenant with ``tenant=``, or leave it out to see all tenants.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.audit.query import AuditQuery, parse_query
from mcpguard.audit.recorder import AuditStore
from mcpguard.errors import InsufficientScope, InvalidRequest, MethodNotAllowed, TenantMismatch
from mcpguard.request_state import state_of
from mcpguard.responses import send_json
from mcpguard.scopes import AUDIT, ScopePolicy

__all__ = ["TOOL_CALLS_PATH", "AuditAPI"]

TOOL_CALLS_PATH = "/api/mcp/tool-calls"


class AuditAPI:
    """Answers the audit query endpoints; every other request goes on to the app."""

    name = "audit_api"

    def __init__(self, app: ASGIApp, store: AuditStore, *, policy: ScopePolicy, operators: frozenset[str]) -> None:
        self.app = app
        self._store = store
        self._policy = policy
        self._operators = operators

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path != TOOL_CALLS_PATH and not path.startswith(TOOL_CALLS_PATH + "/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowed("the audit trail is read-only")
        principal = state_of(scope).principal
        if principal is None:  # pragma: no cover - the authentication layer always runs first
            raise RuntimeError("audit query without a principal")
        if not self._policy.allows(principal.scopes, AUDIT):
            raise InsufficientScope("reading the audit trail needs the mcp:audit scope", required=(AUDIT,))
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        operator = principal.credential_id in self._operators
        if "tenant" in params and not operator:
            raise TenantMismatch("only an operator credential may query another tenant")
        if operator:
            named = params.get("tenant", [])
            if len(named) > 1:
                raise InvalidRequest("tenant given more than once")
            tenant = named[0] if named else None
        else:
            tenant = principal.tenant
        call_id = path[len(TOOL_CALLS_PATH) + 1 :] or None
        if call_id is not None:
            page = await self._store.query(AuditQuery(tenant=tenant, call_id=call_id, limit=1))
            if not page.calls:
                await send_json(send, 404, {"error": "not_found", "error_description": "no such call"})
                return
            await send_json(send, 200, page.calls[0])
            return
        page = await self._store.query(parse_query(params, tenant=tenant))
        await send_json(send, 200, {"calls": page.calls, "next_cursor": page.next_cursor})
