"""MCP sessions bound to the principal that opened them: another principal presenting the id gets 404."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.errors import InvalidRequest, SessionNotFound, UpstreamUnavailable
from mcpguard.principal import Principal
from mcpguard.request_state import request_headers, state_of

__all__ = ["MemorySessionBindings", "SessionBindings", "SessionLayer", "session_digest"]

_SESSION_HEADER = b"mcp-session-id"


class SessionBindings(Protocol):
    """Who opened which session; each method is one store operation."""

    async def bind(self, session_id: str, owner: str) -> None:
        """Record ``owner`` as the principal of a new session."""

    async def owner(self, session_id: str) -> str | None:
        """The owner of a live session, or ``None`` if it is unknown or expired."""

    async def unbind(self, session_id: str) -> None:
        """Forget the session (it was ended)."""


class MemorySessionBindings:
    """Bindings in this process, forgotten after ``idle_ttl`` seconds unused and bounded in number: in all, and per
    owner to a tenth of that, so one principal opening sessions by the thousand pushes out only its own."""

    def __init__(
        self, *, idle_ttl: float = 24 * 3600, max_sessions: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle_ttl = idle_ttl
        self._max = max_sessions
        self._max_per_owner = max(1, max_sessions // 10)
        self._clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # Each owner's sessions, oldest first.
        self._by_owner: dict[str, OrderedDict[str, None]] = {}

    def _forget(self, session_id: str) -> None:
        entry = self._owners.pop(session_id, None)
        if entry is None:
            return
        sessions = self._by_owner.get(entry[0])
        if sessions is not None:
            sessions.pop(session_id, None)
            if not sessions:
                del self._by_owner[entry[0]]

    async def bind(self, session_id: str, owner: str) -> None:
        self._forget(session_id)
        self._owners[session_id] = (owner, self._clock() + self._idle_ttl)
        sessions = self._by_owner.setdefault(owner, OrderedDict())
        sessions[session_id] = None
        while len(sessions) > self._max_per_owner:
            self._forget(next(iter(sessions)))
        while len(self._owners) > self._max:
            self._forget(next(iter(self._owners)))

    async def owner(self, session_id: str) -> str | None:
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        owner, expires = entry
        now = self._clock()
        if now >= expires:
            self._forget(session_id)
            return None
        self._owners[session_id] = (owner, now + self._idle_ttl)
        self._owners.move_to_end(session_id)
        self._by_owner[owner].move_to_end(session_id)
        return owner

    async def unbind(self, session_id: str) -> None:
        self._forget(session_id)


def session_digest(session_id: str) -> str:
    """How an ``Mcp-Session-Id`` is recorded (audit, spans): a digest, never the id, which would let a reader
    continue the session on an upstream that does not check its owner."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def _owner(principal: Principal) -> str:
    # The credential's kind too: a token's id (its grant or jti) is the issuer's to choose, and may equal a key's.
    return f"{principal.tenant}\x00{principal.kind.value}\x00{principal.credential_id}"


def _session_id(values: Sequence[bytes]) -> str | None:
    if len(values) > 1:
        raise InvalidRequest("Mcp-Session-Id sent more than once")
    return values[0].decode("latin-1") if values else None


class SessionLayer:
    """Binds each session the app opens to its principal, and refuses it to anyone else."""

    name = "sessions"

    def __init__(self, app: ASGIApp, *, bindings: SessionBindings) -> None:
        self.app = app
        self._bindings = bindings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        principal = state.principal
        if not state.is_mcp or principal is None:
            await self.app(scope, receive, send)
            return
        owner = _owner(principal)
        bindings = self._bindings
        session_id = _session_id(request_headers(scope).get(_SESSION_HEADER, ()))
        if session_id is not None:
            # Unknown ids are refused too: the app may still hold a session we can no longer attribute.
            if await bindings.owner(session_id) != owner:
                raise SessionNotFound("session not found")
            if scope["method"] == "DELETE":

                async def unbind(_: Message) -> None:
                    await bindings.unbind(session_id)

                send = _on_success(send, unbind)
            await self.app(scope, receive, send)
            return

        async def bind(message: Message) -> None:
            headers = message.get("headers", ())
            opened = _session_id([value for name, value in headers if name.lower() == _SESSION_HEADER])
            if opened is not None:
                bound = await bindings.owner(opened)
                if bound is not None and bound != owner:
                    # The server handed out an id that is someone else's session: rebinding it would give that
                    # session to this caller, so the answer (and the id) never reaches them.
                    raise UpstreamUnavailable("the upstream MCP server reissued a session id already in use")
                await bindings.bind(opened, owner)

        await self.app(scope, receive, _on_success(send, bind))


def _on_success(send: Send, action: Callable[[Message], Awaitable[None]]) -> Send:
    """Run ``action`` on a 2xx response start, before the client can see (and use) the answer."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
            await action(message)
        await send(message)

    return wrapped
