"""``GET /api/mcp/tool-calls``: the audit trail for reviewers, scoped to the caller's own tenant.

It runs inside the guard, so the caller is authenticated and tenant-bound like any other, and each
credential's reads are counted (``RateLimits.per_audit_read``, 120 a minute by default); it needs
``mcp:audit`` (``mcp:admin`` includes it). Only an operator key (configured by id) may name another tenant
with ``tenant=`` (a tenant name, else 400), or leave it out to see all tenants.

Each read answered with calls is recorded with ``read_tenant``: the tenant whose trail it read (the
reader's own, or the one an operator named), or ``ALL_TENANTS`` for an operator's read of every tenant.
An operator's read of one tenant is thus in that tenant's own trail; a read of every tenant is in no one
tenant's, as its size and timing describe every tenant's trail. A refused read, or a lookup of a call that
is not there, read nothing and names no tenant.

``Accept`` chooses the answer: one JSON page (the default), or an export of every matching call,
streamed page by page (``limit`` is the page size), as NDJSON (``application/x-ndjson``) or CSV
(``text/csv``). An export stops after ``EXPORT_CAP`` calls; when calls remain, its last line says so
and carries the cursor to go on from (``{"next_cursor": …}`` in NDJSON, a ``# …`` row in CSV).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.audit.events import ALL_TENANTS, AuditEvent
from mcpguard.audit.query import TENANT_PARAMETER, AuditQuery, parse_query
from mcpguard.audit.recorder import AuditStore
from mcpguard.errors import InsufficientScope, InvalidRequest, MethodNotAllowed, TenantMismatch
from mcpguard.principal import TENANT_RULE, CredentialKind, is_tenant_name
from mcpguard.request_state import request_headers, state_of
from mcpguard.responses import send_json
from mcpguard.scopes import AUDIT, ScopePolicy

__all__ = [
    "CALL_FIELDS",
    "CSV",
    "CSV_FILENAME",
    "EXPORT_CAP",
    "JSON",
    "NDJSON",
    "TOOL_CALLS_PATH",
    "is_audit_read",
    "AuditAPI",
    "csv_cell",
    "media_type_for",
]

TOOL_CALLS_PATH = "/api/mcp/tool-calls"
_ONE_CALL_PREFIX = TOOL_CALLS_PATH + "/"
JSON = "application/json"
NDJSON = "application/x-ndjson"
CSV = "text/csv"
CSV_FILENAME = "mcp-tool-calls.csv"
# An export ends after this many calls, so one request cannot make the guard read the store forever.
EXPORT_CAP = 100_000
# The fields of a call as the stores read it back: its start's fields (the entry bookkeeping aside),
# overlaid with its outcome, and whether that outcome was recorded. Also the CSV header row.
CALL_FIELDS = (*(name for name in AuditEvent._fields if name not in ("phase", "start_id")), "outcome")

# Offered media types, preferred in this order when the client likes several equally.
_OFFERS = (JSON, NDJSON, CSV)
_EXPORT_HEADERS = ((b"cache-control", b"no-store"), (b"vary", b"Accept"), (b"x-content-type-options", b"nosniff"))
# A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _quality(value: str) -> float:
    try:
        q = float(value)
    except ValueError:
        return 1.0
    # Leniency: a q-value outside 0..1 (or NaN) is ignored rather than refused.
    return q if 0.0 <= q <= 1.0 else 1.0


def media_type_for(accept: str) -> str:
    """The media type to answer ``accept`` with: the one the client rates highest, JSON when in doubt.

    A range that names a type exactly beats a wildcard at the same q-value, so ``text/csv, */*``
    gives CSV; ``*/*``, an empty header or only unknown types give JSON, never 406.
    """
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                q = _quality(value.strip())
        ranges.append((media.lower(), q))
    chosen, best = JSON, (0.0, -1, 0)
    for rank, offer in enumerate(_OFFERS):
        wildcard = offer.split("/", 1)[0] + "/*"
        match: tuple[float, int] | None = None
        for media, q in ranges:
            specificity = {offer: 2, wildcard: 1, "*/*": 0}.get(media)
            if specificity is not None and (match is None or specificity > match[1]):
                match = (q, specificity)
        if match is not None and match[0] > 0 and (match[0], match[1], -rank) > best:
            chosen, best = offer, (match[0], match[1], -rank)
    return chosen


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell; text a spreadsheet would run as a formula gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        # Numbers are written by the guard itself; a negative one is a number, not a formula.
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_rows(rows: Sequence[Sequence[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue().encode()


def _csv_page(calls: Sequence[dict[str, Any]]) -> bytes:
    return _csv_rows([[csv_cell(call.get(name)) for name in CALL_FIELDS] for call in calls])


def _csv_continuation(cursor: str) -> bytes:
    return _csv_rows([[f"# export cut short; continue with cursor={cursor}", *("" for _ in CALL_FIELDS[1:])]])


def _ndjson_page(calls: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(call, separators=(",", ":")).encode() + b"\n" for call in calls)


def _ndjson_continuation(cursor: str) -> bytes:
    return json.dumps({"next_cursor": cursor}, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Export:
    """How one export format is written: its headers, what precedes the calls, a page, and a cut-short note."""

    headers: tuple[tuple[bytes, bytes], ...]
    preamble: bytes
    page: Callable[[Sequence[dict[str, Any]]], bytes]
    continuation: Callable[[str], bytes]


_EXPORTS = {
    NDJSON: _Export(
        headers=((b"content-type", b"application/x-ndjson"),),
        preamble=b"",
        page=_ndjson_page,
        continuation=_ndjson_continuation,
    ),
    CSV: _Export(
        headers=(
            (b"content-type", b"text/csv; charset=utf-8; header=present"),
            (b"content-disposition", f'attachment; filename="{CSV_FILENAME}"'.encode()),
        ),
        preamble=_csv_rows([CALL_FIELDS]),
        page=_csv_page,
        continuation=_csv_continuation,
    ),
}


async def _until_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    # The server drops writes to a closed connection silently; without this an export nobody reads
    # would go on reading the store up to the cap.
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def is_audit_read(path: str) -> bool:
    """Whether ``path`` is one of the audit query endpoints (the list of calls, or one call)."""
    return path == TOOL_CALLS_PATH or path.startswith(_ONE_CALL_PREFIX)


class AuditAPI:
    """Answers the audit query endpoints; every other request goes on to the app."""

    name = "audit_api"

    def __init__(
        self,
        app: ASGIApp,
        store: AuditStore,
        *,
        policy: ScopePolicy,
        operators: frozenset[str],
        export_cap: int = EXPORT_CAP,
    ) -> None:
        self.app = app
        self._store = store
        self._policy = policy
        self._operators = operators
        self._export_cap = export_cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if not is_audit_read(path):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowed("the audit trail is read-only", allowed=("GET", "HEAD"))
        state = state_of(scope)
        principal = state.principal
        if principal is None:  # pragma: no cover - the authentication layer always runs first
            raise RuntimeError("audit query without a principal")
        if not self._policy.allows(principal.scopes, AUDIT):
            raise InsufficientScope("reading the audit trail needs the mcp:audit scope", required=(AUDIT,))
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        # A key id is this guard's own and unique; a token naming the same id is not that key.
        operator = principal.kind is CredentialKind.KEY and principal.credential_id in self._operators
        if TENANT_PARAMETER in params and not operator:
            raise TenantMismatch("only an operator credential may query another tenant")
        if operator:
            named = params.get(TENANT_PARAMETER, [])
            if len(named) > 1:
                raise InvalidRequest("tenant given more than once")
            # Checked before it can reach the trail: the name read is recorded, and shown to that tenant.
            if named and not is_tenant_name(named[0]):
                raise InvalidRequest(f"tenant is not a tenant name: {TENANT_RULE}")
            tenant = named[0] if named else None
        else:
            tenant = principal.tenant
        read_tenant = ALL_TENANTS if tenant is None else tenant
        call_id = path[len(TOOL_CALLS_PATH) + 1 :] or None
        if call_id is not None:
            page = await self._store.query(AuditQuery(tenant=tenant, call_id=call_id, limit=1))
            if not page.calls:
                # The path names an id the reader typed, which may be another tenant's: not for this trail.
                await send_json(send, 404, {"error": "not_found", "error_description": "no such call"})
                return
            state.read_tenant = read_tenant
            await send_json(send, 200, page.calls[0])
            return
        query = parse_query(params, tenant=tenant)
        accept = b",".join(request_headers(scope).get(b"accept", ()))
        media_type = media_type_for(accept.decode("latin-1"))
        if media_type == JSON:
            page = await self._store.query(query)
            state.read_tenant = read_tenant
            body = {"calls": page.calls, "next_cursor": page.next_cursor}
            await send_json(send, 200, body, extra_headers=[(b"vary", b"Accept")])
            return
        await self._export(scope, receive, send, query, _EXPORTS[media_type], read_tenant)

    async def _export(
        self, scope: Scope, receive: Receive, send: Send, query: AuditQuery, export: _Export, read_tenant: str
    ) -> None:
        # The first page is read before anything is sent, so a store failure is still a clean 503.
        page = await self._store.query(replace(query, limit=min(query.limit, self._export_cap)))
        state_of(scope).read_tenant = read_tenant
        headers = [*export.headers, *_EXPORT_HEADERS]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        gone = asyncio.Event()
        watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive, gone))
        try:
            body, sent = export.preamble, 0
            while True:
                sent += len(page.calls)
                body += export.page(page.calls)
                cursor = page.next_cursor
                if cursor is not None and sent >= self._export_cap:
                    # Cut short: the reader is told where to go on, rather than left thinking it has everything.
                    body += export.continuation(cursor)
                    cursor = None
                await send({"type": "http.response.body", "body": body, "more_body": cursor is not None})
                if cursor is None or gone.is_set():
                    return
                # The cursor continues after the page's last call (ids sort by time, newest first).
                limit = min(query.limit, self._export_cap - sent)
                page = await self._store.query(replace(query, limit=limit, before_id=page.calls[-1]["id"]))
                body = b""
        finally:
            watcher.cancel()
