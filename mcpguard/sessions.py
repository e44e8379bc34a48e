"""MCP sessions bound to the principal that opened them: another principal presenting the id gets 404."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.errors import InvalidRequest, SessionNotFound
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
    """Bindings in this process, forgotten after ``idle_ttl`` seconds unused and bounded in number."""

    def __init__(
        self, *, idle_ttl: float = 24 * 3600, max_sessions: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle_ttl = idle_ttl
        self._max = max_sessions
        self._clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def bind(self, session_id: str, owner: str) -> None:
        self._owners[session_id] = (owner, self._clock() + self._idle_ttl)
        self._owners.move_to_end(session_id)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    async def owner(self, session_id: str) -> str | None:
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        owner, expires = entry
        now = self._clock()
        if now >= expires:
            del self._owners[session_id]
            return None
        self._owners[session_id] = (owner, now + self._idle_ttl)
        self._owners.move_to_end(session_id)
        return owner

    async def unbind(self, session_id: str) -> None:
        self._owners.pop(session_id, None)


def session_digest(session_id: str) -> str:
    """How an ``Mcp-Session-Id`` is recorded (audit, spans): a digest, never the id, which would let a reader
    continue the session on an upstream that does not check its owner."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def _owner(principal: Principal) -> str:
    return f"{principal.tenant}\x00{principal.credential_id}"


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
                await bindings.bind(opened, owner)

        await self.app(scope, receive, _on_success(send, bind))


def _on_success(send: Send, action: Callable[[Message], Awaitable[None]]) -> Send:
    """Run ``action`` on a 2xx response start, before the client can see (and use) the answer."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
            await action(message)
        await send(message)

    return wrapped
