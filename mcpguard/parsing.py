"""Buffer an MCP POST body (within the cap) and parse it before anything is decided."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.config import GuardConfig
from mcpguard.errors import InvalidRequest, MethodNotAllowed, PayloadTooLarge
from mcpguard.jsonrpc import parse_message
from mcpguard.request_state import RequestState, request_headers, state_of

__all__ = ["Disconnected", "ParseLayer", "read_body"]

# POST carries JSON-RPC; GET opens the server's stream; DELETE ends a session.
_MCP_METHODS = frozenset({"POST", "GET", "DELETE"})


class Disconnected(Exception):
    """The client went away before its request body was complete: there is no one left to answer."""


def _content_length(scope: Scope) -> int | None:
    values = set(request_headers(scope).get(b"content-length", ()))
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest("conflicting Content-Length headers")
    raw = values.pop()
    if not raw.isdigit():
        raise InvalidRequest("malformed Content-Length header")
    return int(raw)


def _declares_body(scope: Scope) -> bool:
    headers = request_headers(scope)
    return b"transfer-encoding" in headers or any(value != b"0" for value in headers.get(b"content-length", ()))


async def read_body(scope: Scope, receive: Receive, cap: int) -> bytes:
    """The whole request body; ``PayloadTooLarge`` past ``cap`` bytes (declared or streamed), ``Disconnected``
    if the client leaves first."""
    declared = _content_length(scope)
    if declared is not None and declared > cap:
        raise PayloadTooLarge(f"request body larger than {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"request body larger than {cap} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(state: RequestState, receive: Receive) -> Receive:
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            # Read when the app asks, so a later layer's rewrite (tenant pinning) is what it gets.
            return {"type": "http.request", "body": state.body or b"", "more_body": False}
        return await receive()

    return replay


class ParseLayer:
    """Refuses what cannot be decided on safely; the app receives the body byte for byte."""

    name = "parse"

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self._cap = config.max_body_bytes
        self._depth = config.max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        if not state.is_mcp:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        if method not in _MCP_METHODS:
            raise MethodNotAllowed(f"{method} is not served on the MCP endpoint", allowed=sorted(_MCP_METHODS))
        if method != "POST":
            if _declares_body(scope):
                # Decided by method alone (no message), so a body here would reach the app unread by the guard.
                raise InvalidRequest(f"a {method} to the MCP endpoint carries no body")
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self._cap)
        except Disconnected:
            return
        state.message = parse_message(body, request_headers(scope), max_depth=self._depth)
        state.body = body
        await self.app(scope, _replay(state, receive), send)
