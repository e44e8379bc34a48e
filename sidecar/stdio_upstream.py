"""A stdio MCP server behind the guard: each 2025-11-25 Streamable HTTP session gets its own process.

This is the HTTP side of the bridge (POST, GET and DELETE on the MCP endpoint, answered as JSON or SSE);
:mod:`sidecar.stdio_sessions` keeps the processes and routes what they write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from mcpguard import (
    Disconnected,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
    asgi_exchange,
    event_bytes,
    read_body,
    send_json,
    state_of,
)
from sidecar.stdio_sessions import Channel, ChannelItem, Failure, Message, Session, StdioSessions, StdioSettings

__all__ = ["StdioSettings", "StdioUpstream"]

# The versions a bridged session can speak; a 2026-07-28 client is told to open one of these instead.
_HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
_UNSUPPORTED_PROTOCOL_VERSION = -32022
_PARSE_ERROR = -32700
_INVALID_REQUEST = -32600
_INTERNAL_ERROR = -32603
_SESSION = b"mcp-session-id"


class StdioUpstream:
    """The app behind the guard for a stdio upstream: one process per MCP session, bridged over HTTP."""

    def __init__(self, settings: StdioSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._sessions = StdioSessions(settings, clock=clock)
        self._exchange = asgi_exchange(self._serve, "/mcp")

    @property
    def session_count(self) -> int:
        """How many sessions (and so processes) are live."""
        return self._sessions.count

    @property
    def pids(self) -> tuple[int, ...]:
        """The process ids of the live sessions' servers."""
        return self._sessions.pids

    def command_available(self) -> bool:
        """Whether the command's executable exists and may be run."""
        return self._sessions.command_available()

    async def exchange(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One exchange with the MCP endpoint in process, as a trusted internal caller (an ``Exchange``)."""
        return await self._exchange(method, headers, body)

    async def close(self) -> None:
        """End every session and wait until each process group is gone."""
        await self._sessions.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)
        method = scope["method"]
        raw_session = headers.get(_SESSION)
        if method == "POST":
            await self._post(scope, headers, receive, send)
            return
        if method not in ("GET", "DELETE"):
            await _error(send, 405, None, "use POST, GET or DELETE", reason="method_not_allowed")
            return
        if raw_session is None:
            await _error(send, 400, None, "Bad Request: Missing session ID")
            return
        session = self._sessions.get(raw_session.decode("latin-1"))
        if session is None:
            await _session_not_found(send, None)
        elif method == "DELETE":
            self._sessions.end(session, Failure("the session was ended"))
            await _answer(send, 200, b"", session.id)
        elif b"text/event-stream" not in headers.get(b"accept", b"").lower():
            await _error(send, 406, None, "Not Acceptable: accept text/event-stream")
        elif session.listener is not None:
            await _error(send, 409, None, "Conflict: one GET stream per session")
        else:
            await self._listen(session, receive, send)

    async def _post(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.settings.max_message_bytes)
        except Disconnected:
            return
        except PayloadTooLarge:
            await _error(send, 413, None, "the message is larger than the limit", reason="request_too_large")
            return
        try:
            message = json.loads(body)
        except ValueError:
            await _error(send, 400, None, "Parse error: the body is not JSON", code=_PARSE_ERROR)
            return
        if not isinstance(message, dict):
            await _error(send, 400, None, "expected one JSON-RPC message")
            return
        rid = message.get("id")
        is_request = isinstance(message.get("method"), str) and "id" in message
        # Raw CR and LF can only be insignificant whitespace in valid JSON; removed, the message is one line.
        line = body.replace(b"\r", b"").replace(b"\n", b"")
        accept = headers.get(b"accept", b"").lower()
        accepts_sse = b"text/event-stream" in accept
        raw_session = headers.get(_SESSION)
        if raw_session is None:
            if is_request and message["method"] == "initialize":
                # Its answer is one message, so JSON unless the client can only read a stream.
                only_sse = accepts_sse and b"application/json" not in accept and b"*/*" not in accept
                await self._initialize(rid, line, only_sse, _tenant(scope), receive, send)
            else:
                await _no_session(send, rid, headers.get(b"mcp-protocol-version"))
            return
        session = self._sessions.get(raw_session.decode("latin-1"))
        if session is None:
            await _session_not_found(send, rid)
            return
        if message.get("method") == "initialize":
            await _error(send, 400, rid, "initialize opens a new session")
            return
        with self._sessions.in_use(session):
            if is_request:
                await self._request(session, message, line, accepts_sse, receive, send)
            elif await self._sessions.write(session, line):
                await _answer(send, 202, b"", session.id)
            else:
                raise UpstreamUnavailable("the upstream MCP server is no longer running")

    async def _initialize(
        self, rid: Any, line: bytes, sse: bool, tenant: str | None, receive: Receive, send: Send
    ) -> None:
        session = await self._sessions.start(tenant)
        if session is None:
            await _error(
                send, 503, rid, "too many open sessions", code=_INTERNAL_ERROR, reason="temporarily_unavailable"
            )
            return
        with self._sessions.in_use(session):
            async with self._sent(session, rid, None, line, Channel(streaming=False), receive) as channel:
                item = await self._next(session, rid, channel, cancellable=False)
        if not isinstance(item, Message):
            # Nobody can use a session whose opening failed or whose client left before learning its id.
            self._sessions.end(session, Failure("the session was not opened"))
            if item is None:
                return
            if item.timeout:
                raise UpstreamTimeout(item.description)
            raise UpstreamUnavailable(item.description)
        if "error" in json.loads(item.data):
            self._sessions.end(session, Failure("the server refused to initialize"))
            await _answer(send, 200, item.data, None, sse=sse)
            return
        await _answer(send, 200, item.data, session.id, sse=sse)

    async def _request(
        self, session: Session, message: dict[str, Any], line: bytes, sse: bool, receive: Receive, send: Send
    ) -> None:
        """Send one request; its response comes as JSON, or as a stream with what the server sends meanwhile."""
        rid = message["id"]
        if session.is_pending(rid):
            await _error(send, 409, rid, "a request with this id is still pending")
            return
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        async with self._sent(session, rid, token, line, Channel(streaming=sse), receive) as channel:
            if not sse:
                item = await self._next(session, rid, channel)
                if isinstance(item, Message):
                    await _answer(send, 200, item.data, session.id)
                elif isinstance(item, Failure):
                    await send_json(send, 504 if item.timeout else 502, _failure_body(rid, item))
                return
            await send({"type": "http.response.start", "status": 200, "headers": _sse_headers(session.id)})
            while isinstance(item := await self._next(session, rid, channel), Message):
                await send(
                    {
                        "type": "http.response.body",
                        "body": event_bytes("message", item.data),
                        "more_body": not item.final,
                    }
                )
                if item.final:
                    return
            if isinstance(item, Failure):
                data = json.dumps(_failure_body(rid, item), separators=(",", ":")).encode()
                await send({"type": "http.response.body", "body": event_bytes("message", data), "more_body": False})

    @contextlib.asynccontextmanager
    async def _sent(
        self, session: Session, rid: Any, token: Any, line: bytes, channel: Channel, receive: Receive
    ) -> AsyncIterator[Channel]:
        """While the request is pending, ``channel`` gets its messages, and ``None`` if the client leaves."""
        with session.awaiting(rid, token, channel):
            watcher = asyncio.create_task(_watch_disconnect(receive, channel))
            try:
                # A failed write ends the session, and so queues the failure for this request.
                await self._sessions.write(session, line)
                yield channel
            finally:
                watcher.cancel()

    async def _listen(self, session: Session, receive: Receive, send: Send) -> None:
        """The session's GET stream: server messages that belong to no pending request."""
        channel = Channel(streaming=True)
        session.listener = channel
        while session.backlog:
            channel.offer(Message(session.backlog.popleft(), final=False))
        watcher = asyncio.create_task(_watch_disconnect(receive, channel))
        try:
            with self._sessions.in_use(session):
                await send({"type": "http.response.start", "status": 200, "headers": _sse_headers(session.id)})
                while isinstance(item := await channel.queue.get(), Message):
                    await send(
                        {"type": "http.response.body", "body": event_bytes("message", item.data), "more_body": True}
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if session.listener is channel:
                session.listener = None

    async def _next(self, session: Session, rid: Any, channel: Channel, *, cancellable: bool = True) -> ChannelItem:
        try:
            item = await asyncio.wait_for(channel.queue.get(), self.settings.read_timeout)
        except TimeoutError:
            item = Failure("the upstream MCP server did not answer in time", timeout=True)
        if cancellable and (item is None or (isinstance(item, Failure) and item.timeout)):
            # Nobody waits for the answer any more: tell the server, so it can stop working on it.
            note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid}}
            await self._sessions.write(session, json.dumps(note, separators=(",", ":")).encode())
        return item

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._sessions.start_reaper()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _watch_disconnect(receive: Receive, channel: Channel) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    channel.queue.put_nowait(None)


def _sse_headers(session_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache, no-transform"),
        (_SESSION, session_id.encode()),
    ]


async def _answer(send: Send, status: int, message: bytes, session_id: str | None, *, sse: bool = False) -> None:
    """A complete answer: one message (as JSON, or as a one-event stream) or, for ``b""``, no body."""
    body = event_bytes("message", message) if sse and message else message
    headers = [(b"content-length", str(len(body)).encode())]
    if message:
        headers.append((b"content-type", b"text/event-stream" if sse else b"application/json"))
    if session_id is not None:
        headers.append((_SESSION, session_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _failure_body(rid: Any, failure: Failure) -> dict[str, Any]:
    reason = "gateway_timeout" if failure.timeout else "bad_gateway"
    error = {"code": _INTERNAL_ERROR, "message": failure.description, "data": {"error": reason}}
    return {"jsonrpc": "2.0", "id": rid, "error": error}


async def _error(
    send: Send, status: int, rid: Any, message: str, *, code: int = _INVALID_REQUEST, reason: str = "invalid_request"
) -> None:
    error = {"code": code, "message": message, "data": {"error": reason}}
    await send_json(send, status, {"jsonrpc": "2.0", "id": rid, "error": error})


async def _session_not_found(send: Send, rid: Any) -> None:
    await _error(send, 404, rid, "Session not found", reason="session_not_found")


async def _no_session(send: Send, rid: Any, version: bytes | None) -> None:
    """A request outside any session: only the handshake era is served, so say how to open one."""
    requested = version.decode("latin-1") if version is not None else None
    if requested is None or requested in _HANDSHAKE_VERSIONS:
        await _error(send, 400, rid, "Bad Request: Missing session ID")
        return
    # This code with handshake versions in `supported` is what makes a client fall back to initialize.
    error = {
        "code": _UNSUPPORTED_PROTOCOL_VERSION,
        "message": "Unsupported protocol version: open a 2025-11-25 session with initialize",
        "data": {"supported": list(_HANDSHAKE_VERSIONS), "requested": requested},
    }
    await send_json(send, 400, {"jsonrpc": "2.0", "id": rid, "error": error})


def _tenant(scope: Scope) -> str | None:
    """The tenant a session is opened for: the guard's principal's, or none (the guard's own tools/list)."""
    try:
        principal = state_of(scope).principal
    except KeyError:  # an exchange of the guard's own, run without the guard around it
        return None
    return principal.tenant if principal is not None else None
