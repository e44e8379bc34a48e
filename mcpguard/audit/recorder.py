"""Recording every request through the guard: a durable start before a call is forwarded, then its end.

``AuditLayer`` sits just inside the entry, so it sees every outcome (401/403/429 included, and the
refusal's reason); ``AuditGate`` sits just before the app, so a start is written only for a call that
really is forwarded, and is committed before it leaves. Neither ever reads a body into the trail: the
answer is only scanned for the JSON-RPC error code and the tool's ``isError`` flag.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.audit.events import USER_AGENT_LIMIT, AuditEvent, bounded, new_event_id, reason_for
from mcpguard.audit.query import AuditPage, AuditQuery
from mcpguard.outcome import Outcome, decision_for, observe
from mcpguard.request_state import RequestState, first_values, state_of
from mcpguard.sessions import session_digest

__all__ = ["AuditGate", "AuditLayer", "AuditStore"]

logger = logging.getLogger("mcpguard.audit")

_PRUNE_EVERY = 3600.0
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_SESSION, _USER_AGENT, _TRACE = b"mcp-session-id", b"user-agent", b"traceparent"
_CLIENT_HEADERS = frozenset({_SESSION, _USER_AGENT, _TRACE})


class AuditStore(Protocol):
    """Where the trail is kept; appends are the only writes (retention aside)."""

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        """Queue ``event``; with ``durable``, return once it would survive the process being killed."""

    async def query(self, q: AuditQuery) -> AuditPage:
        """Calls matching ``q``, newest first."""

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: delete entries older than ``cutoff``; how many."""

    async def ping(self) -> None:
        """Readiness: return if the store can take entries now, else raise ``StorageUnavailable``; cheap."""

    async def close(self) -> None:
        """Flush and release."""


class AuditLayer:
    """Writes one entry per request the guard answers itself, and the end of each call it forwards."""

    name = "audit"

    def __init__(
        self,
        app: ASGIApp,
        store: AuditStore,
        *,
        retention: timedelta | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self._store = store
        self._retention = retention
        self._clock = clock
        self._pruned_at: float | None = None
        self._pruning: asyncio.Task[None] | None = None

    def _prune_if_due(self) -> None:
        # Retention runs beside the traffic, at most once an hour, so no timer or lifespan hook is needed.
        now = self._clock()
        if self._retention is None or (self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY):
            return
        if self._pruning is not None and not self._pruning.done():
            return
        self._pruned_at = now
        try:
            cutoff = datetime.fromtimestamp(now, UTC) - self._retention
        except OverflowError:  # a retention reaching back before year 1: no entry is old enough to delete
            return
        self._pruning = asyncio.get_running_loop().create_task(self._prune(cutoff))

    async def _prune(self, cutoff: datetime) -> None:
        try:
            deleted = await self._store.delete_before(cutoff)
        except Exception:  # retention is retried on the next pass; the traffic must not notice
            logger.exception("audit retention failed")
            self._pruned_at = None
            return
        if deleted:
            logger.info("audit retention deleted %d entries older than %s", deleted, cutoff.isoformat())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._prune_if_due()
        state = state_of(scope)
        began = time.perf_counter()
        received = 0
        outcome, observing_send = observe(scope, send)
        store = self._store
        client = _client_facts(scope)

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        attempted: str | None = None

        async def start_call() -> None:
            nonlocal attempted
            event_id = attempted = new_event_id(self._clock())
            event = self._event(scope, state, client, "start", event_id, bytes_in=len(state.body or b""))
            await store.append(event, durable=True)
            state.audit_start_id = event_id

        state.audit_start = start_call
        try:
            await self.app(scope, counting_receive, observing_send)
        finally:
            # start_call holds the state that holds it: unlinked, a finished call is freed at once, not left to the
            # cycle collector (whose passes over every call's leftovers cost the sidecar several per cent).
            state.audit_start = None
            # Written even when the app raised or the client left: a trail must not have gaps.
            elapsed = (time.perf_counter() - began) * 1000
            phase = "end" if state.audit_start_id is not None else "local"
            event = self._event(
                scope,
                state,
                client,
                phase,
                new_event_id(self._clock()),
                # A start whose commit failed may still land (a database that stopped answering, then answered):
                # the call's local entry names it, and it reads back as this refusal, not as a call forwarded.
                start_id=state.audit_start_id if state.audit_start_id is not None else attempted,
                outcome=outcome,
                duration_ms=round(elapsed, 3),
                bytes_in=received,
            )
            try:
                await store.append(event, durable=False)
            except Exception:  # the answer is already on its way; losing it silently is not an option
                logger.exception("could not record the end of a call in the audit trail")

    def _event(
        self,
        scope: Scope,
        state: RequestState,
        client: _ClientFacts,
        phase: str,
        event_id: str,
        *,
        start_id: str | None = None,
        outcome: Outcome | None = None,
        duration_ms: float | None = None,
        bytes_in: int | None = None,
    ) -> AuditEvent:
        principal, message = state.principal, state.message
        refused = state.refusal
        status = outcome.status if outcome is not None else None
        decision = decision_for(refused) if phase != "start" else None
        return AuditEvent(
            id=event_id,
            at=datetime.fromtimestamp(self._clock(), UTC),
            phase=phase,  # type: ignore[arg-type]  # one of the three phases, chosen above
            start_id=start_id,
            tenant=principal.tenant if principal is not None else None,
            subject=principal.subject if principal is not None else None,
            credential_id=principal.credential_id if principal is not None else None,
            client_id=principal.client_id if principal is not None else None,
            session=client.session,
            rpc_method=bounded(message.method) if message is not None else None,
            tool=bounded(message.name) if message is not None and message.method == "tools/call" else None,
            http_method=scope["method"],
            path=bounded(scope["path"]),
            status=status,
            rpc_error=outcome.rpc_error if outcome is not None else None,
            tool_error=outcome.tool_error if outcome is not None else None,
            decision=decision,
            reason=reason_for(refused, state.refusal_reason) if refused is not None else None,
            duration_ms=duration_ms,
            bytes_in=bytes_in,
            bytes_out=outcome.bytes_out if outcome is not None else None,
            trace_id=client.trace_id,
            user_agent=client.user_agent,
            read_tenant=state.read_tenant,
        )


class _ClientFacts(NamedTuple):
    """What the client's headers tell the trail, read once for both of a call's entries."""

    session: str | None
    user_agent: str | None
    trace_id: str | None


def _client_facts(scope: Scope) -> _ClientFacts:
    found = first_values(scope, _CLIENT_HEADERS)
    session, user_agent, traceparent = (found.get(name) for name in (_SESSION, _USER_AGENT, _TRACE))
    trace = _TRACEPARENT.fullmatch(traceparent) if traceparent else None
    return _ClientFacts(
        session=session_digest(session) if session else None,
        user_agent=user_agent[:USER_AGENT_LIMIT] if user_agent else None,
        trace_id=trace.group(1) if trace else None,
    )


class AuditGate:
    """Just before the app: commit the call's start, then let it through (a failed write refuses the call)."""

    name = "audit_start"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Callable[[], Awaitable[None]] | None = state_of(scope).audit_start
        if start is not None:
            await start()
        await self.app(scope, receive, send)
