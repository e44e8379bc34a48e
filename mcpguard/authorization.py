"""Per-request scope decision, and ``tools/list`` answers cut down to the tools the caller may call."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.errors import InsufficientScope
from mcpguard.headers import response_content_type
from mcpguard.json_input import NestedTooDeep, read_json
from mcpguard.pinning import strip_pinned_argument, strip_pinned_prompt_argument
from mcpguard.principal import Principal
from mcpguard.request_state import RequestState, header, state_of
from mcpguard.scopes import READ, ScopePolicy
from mcpguard.sse import EventSplitter, event_data, event_with_data
from mcpguard.tool_catalog import ToolCatalog

__all__ = ["ScopeLayer"]

_LIST_CHANGED = "notifications/tools/list_changed"
_MAX_LISTING = 16 * 1024 * 1024
# An SSE event the list_changed watcher holds back waiting for its end: a notification is far smaller.
_MAX_WATCHED_EVENT = 64 * 1024


def _same_id(payload: Mapping[str, Any], request_id: str | int | None) -> bool:
    """Whether ``payload`` answers ``request_id`` (the SDKs take "1" and 1 for the same request, so this does too);
    with ``None``, whether it answers any request at all."""
    answered = payload.get("id")
    if request_id is None:
        return answered is not None
    if answered == request_id and type(answered) is not bool:
        return True
    return isinstance(answered, str | int) and not isinstance(answered, bool) and str(answered) == str(request_id)


def _announces_list_changed(event: bytes) -> bool:
    """Whether this SSE event is the server's ``notifications/tools/list_changed`` (however its JSON is written)."""
    _, data = event_data(event)
    # Only an event that could spell it (literally, or through \u escapes) is parsed.
    if data is None or ("changed" not in data and "\\u" not in data):
        return False
    try:
        return _is_list_changed(read_json(data))
    except ValueError:
        return False


def _is_list_changed(payload: Any) -> bool:
    """Whether ``payload`` is the notification (no id) that the server's tools changed."""
    return isinstance(payload, dict) and payload.get("method") == _LIST_CHANGED and "id" not in payload


class ScopeLayer:
    """Re-checks scopes on every request: HTTP routes by method, MCP by JSON-RPC method and tool."""

    name = "scopes"

    def __init__(
        self, app: ASGIApp, *, policy: ScopePolicy, catalog: ToolCatalog, pinned_argument: str | None = None
    ) -> None:
        self.app = app
        self._policy = policy
        self._catalog = catalog
        self._pinned = pinned_argument
        # The answers rewritten: tools/list always; prompts/list when a pinned argument is to be hidden from it.
        self._listings = frozenset({"tools/list", "prompts/list"} if pinned_argument is not None else {"tools/list"})

    async def _required(self, scope: Scope, state: RequestState) -> str:
        if not state.is_mcp:
            return self._policy.for_http(scope["method"])
        message = state.message
        if message is None or message.method is None:
            # GET stream, DELETE of one's own session, or a reply to a server request.
            return READ
        required = self._policy.for_rpc(message.method, notification=message.id is None)
        if required is not None:
            return required
        name = message.name or ""
        override = self._policy.tool_overrides.get(name)
        if override is not None:
            state.known_tool = True
            return override
        known, annotations = await self._catalog.lookup(name, host=header(scope, b"host"))
        state.known_tool = known
        # A tool the server never listed needs admin: nothing the client says can lower that.
        return self._policy.for_tool(name, annotations) if known else self._policy.for_tool(name, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)
        principal = state.principal
        if principal is None:  # pragma: no cover - the authentication layer always runs first
            raise RuntimeError("scope check reached without a principal")
        required = await self._required(scope, state)
        state.required_scope = required
        if not self._policy.allows(principal.scopes, required):
            raise InsufficientScope(f"this call needs the {required} scope", required=(required,))
        message = state.message
        if message is not None and message.id is not None and message.method in self._listings:
            send = _ListingFilter(send, self._policy, principal, message.id, self._pinned, self._catalog).send
        elif state.is_mcp and scope["method"] == "GET":
            # The server's stream may replay earlier answers (resumption with Last-Event-ID): a tools/list answer
            # among them is filtered as if it were asked now, whichever request it answered.
            send = _ListingFilter(send, self._policy, principal, None, self._pinned, self._catalog).send
        elif state.is_mcp:
            send = self._watch_list_changed(send)
        await self.app(scope, receive, send)

    def _watch_list_changed(self, send: Send) -> Send:
        """``send``, watching an SSE answer for the server's list_changed (a JSON answer is one reply, never a
        notification, so nothing a client echoes back through a tool can make the guard list the tools again)."""
        catalog = self._catalog
        splitter: EventSplitter | None = None

        async def watched(message: Message) -> None:
            nonlocal splitter
            if message["type"] == "http.response.start":
                if response_content_type(message).startswith(b"text/event-stream"):
                    splitter = EventSplitter()
            elif splitter is not None and message["type"] == "http.response.body":
                events = splitter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    events += splitter.close()
                if any(_announces_list_changed(event) for event in events):
                    catalog.invalidate()
                if splitter.pending_size > _MAX_WATCHED_EVENT:
                    splitter = None  # an event this large is no notification: the stream is not watched further
            await send(message)

        return watched


class _ListingFilter:
    """Rewrites the answer to one ``tools/list`` (or, with a pinned argument, ``prompts/list``) request, or, with no
    request id, every such answer a server stream replays, JSON or SSE, keeping every other byte."""

    def __init__(
        self,
        send: Send,
        policy: ScopePolicy,
        principal: Principal,
        request_id: str | int | None,
        pinned: str | None,
        catalog: ToolCatalog,
    ) -> None:
        self._send = send
        self._catalog = catalog
        self._ambiguous: frozenset[str] = frozenset()
        self._pinned = pinned
        self._policy = policy
        self._principal = principal
        self._id = request_id
        self._mode = "pass"
        self._start: Message | None = None
        self._buffer: list[bytes] = []
        self._size = 0
        self._splitter = EventSplitter()

    def _allowed(self, tool: Any) -> bool:
        if not isinstance(tool, Mapping):
            return False
        annotations = tool.get("annotations")
        name = str(tool.get("name", ""))
        # A name listed twice is called as the stricter of its entries: shown only to who may call that.
        if name in self._ambiguous or not isinstance(annotations, Mapping):
            annotations = None
        return self._policy.allows(self._principal.scopes, self._policy.for_tool(name, annotations))

    def _filter(self, payload: Any) -> Any:
        if isinstance(payload, dict) and _same_id(payload, self._id) and isinstance(payload.get("result"), dict):
            result = payload["result"]
            tools = result.get("tools")
            if isinstance(tools, list):
                names = [str(tool.get("name", "")) for tool in tools if isinstance(tool, Mapping)]
                self._ambiguous = frozenset(name for name in names if names.count(name) > 1)
                result["tools"] = [tool for tool in tools if self._allowed(tool)]
                if self._pinned is not None:
                    for tool in result["tools"]:
                        strip_pinned_argument(tool, self._pinned)
            prompts = result.get("prompts")
            if self._pinned is not None and isinstance(prompts, list):
                for prompt in prompts:
                    strip_pinned_prompt_argument(prompt, self._pinned)
        return payload

    def _unreadable(self) -> bytes:
        error = {"code": -32603, "message": "the server's listing could not be read"}
        return json.dumps({"jsonrpc": "2.0", "id": self._id, "error": error}, separators=(",", ":")).encode()

    def _rewrite_event(self, event: bytes) -> bytes:
        # Whatever the event type, an answer to this request is filtered: a client may read any type.
        _, data = event_data(event)
        if data is None:
            return event
        try:
            payload = read_json(data)
        except NestedTooDeep:
            # JSON too deep to read may be the answer, and what we cannot read we cannot filter: even an event
            # that would have been a notification is replaced by the error, as failing closed must.
            return event_with_data(event, self._unreadable())
        except ValueError:
            return event
        if _is_list_changed(payload):
            self._catalog.invalidate()
        if not (isinstance(payload, dict) and _same_id(payload, self._id)):
            return event
        return event_with_data(event, json.dumps(self._filter(payload), separators=(",", ":")).encode())

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = response_content_type(message)
            # Any success status: clients read a 201 or 202 answer as they read a 200.
            success = 200 <= message["status"] < 300
            if success and content_type.startswith(b"application/json"):
                self._mode, self._start = "json", message
                return
            if success and content_type.startswith(b"text/event-stream"):
                self._mode = "sse"
            await self._send(message)
            return
        if message["type"] != "http.response.body" or self._mode == "pass":
            await self._send(message)
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self._mode == "sse":
            events = self._splitter.feed(body)
            if self._splitter.pending_size > _MAX_LISTING:
                raise RuntimeError("tools/list event too large to filter")
            if not more:
                # The last bytes are filtered too: what we could not frame must not pass unread.
                events += self._splitter.close()
            out = b"".join(self._rewrite_event(event) for event in events)
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self._size += len(body)
        if self._size > _MAX_LISTING:
            raise RuntimeError("tools/list answer too large to filter")
        self._buffer.append(body)
        if more:
            return
        await self._flush_json()

    async def _flush_json(self) -> None:
        start = self._start or {"type": "http.response.start", "status": 200, "headers": []}
        try:
            body = json.dumps(self._filter(read_json(b"".join(self._buffer))), separators=(",", ":")).encode()
        except ValueError:
            # What we cannot read we cannot filter, so it is not passed on.
            body = self._unreadable()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})
