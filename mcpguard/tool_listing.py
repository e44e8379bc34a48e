"""Ask an MCP server for its complete tool list, over any transport that can make one HTTP exchange.

In process (``asgi_exchange``) the request never leaves the process; the sidecar supplies an exchange
over its upstream connection pool. Either way the answer comes from the server, never from a client.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.types import ASGIApp, Message

from mcpguard.json_input import read_json
from mcpguard.sse import EventSplitter, event_data
from mcpguard.tool_catalog import ToolLister

Exchange = Callable[[str, dict[str, str], bytes], Awaitable[tuple[int, dict[str, str], bytes]]]
"""One HTTP exchange with the MCP endpoint: (method, headers, body) → (status, lower-cased headers, body)."""

__all__ = ["Exchange", "ListingError", "asgi_exchange", "tool_lister"]

MODERN_VERSION = "2026-07-28"
LEGACY_VERSION = "2025-11-25"
_MAX_RESPONSE = 16 * 1024 * 1024
_MAX_PAGES = 100
_CLIENT_INFO = {"name": "mcpguard", "version": "internal"}


class ListingError(Exception):
    """The app did not answer ``tools/list`` in a way we can use."""


def asgi_exchange(app: ASGIApp, path: str) -> Exchange:
    """Exchanges with ``app`` at ``path`` in process (as 127.0.0.1 unless a ``host`` header is given)."""

    async def exchange(method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        return await _asgi_call(app, path, method, {"host": "127.0.0.1"} | headers, body)

    return exchange


async def _asgi_call(
    app: ASGIApp, path: str, method: str, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1"),
        "root_path": "",
        "query_string": b"",
        "headers": raw_headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent = False
    finished = anyio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Like a real client, stay connected until the answer is complete; an early disconnect
        # makes the server abandon the request.
        await finished.wait()
        return {"type": "http.disconnect"}

    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    size = 0

    async def send(message: Message) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers.update({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > _MAX_RESPONSE:
                raise ListingError("tools/list answer too large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    return status, response_headers, b"".join(chunks)


def _responses(content_type: str, body: bytes) -> list[Any]:
    if content_type.startswith("text/event-stream"):
        splitter = EventSplitter()
        events = splitter.feed(body) + splitter.close()
        out: list[Any] = []
        for event in events:
            _, data = event_data(event)
            if data:
                out.append(read_json(data))
        return out
    return [read_json(body)] if body else []


def _result(responses: list[Any], request_id: int) -> Mapping[str, Any]:
    for item in responses:
        if isinstance(item, dict) and item.get("id") == request_id:
            result = item.get("result")
            if isinstance(result, dict):
                return result
            raise ListingError("tools/list answered with an error")
    raise ListingError("no answer to tools/list")


def tool_lister(exchange: Exchange) -> ToolLister:
    """A lister over ``exchange``: stateless 2026-07-28 first, else a short 2025-11-25 session."""

    async def rpc(method: str, params: dict[str, Any], headers: dict[str, str], rid: int) -> Any:
        payload = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        base = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        status, resp_headers, body = await exchange("POST", base | headers, json.dumps(payload).encode())
        if status != 200:
            raise ListingError(f"{method} answered HTTP {status}")
        try:
            return resp_headers, _result(_responses(resp_headers.get("content-type", ""), body), rid)
        except ValueError:
            raise ListingError(f"{method} answer is not JSON") from None

    async def paginate(headers: dict[str, str], meta: dict[str, Any] | None) -> list[Mapping[str, Any]]:
        tools: list[Mapping[str, Any]] = []
        cursor: str | None = None
        for page in range(1, _MAX_PAGES + 1):
            params: dict[str, Any] = {}
            if meta is not None:
                params["_meta"] = meta
            if cursor is not None:
                params["cursor"] = cursor
            _, result = await rpc("tools/list", params, headers, page)
            listed = result.get("tools")
            if not isinstance(listed, list):
                raise ListingError("tools/list result has no tools array")
            tools.extend(t for t in listed if isinstance(t, dict))
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                return tools
            cursor = next_cursor
        raise ListingError("tools/list pagination did not end")

    async def modern(extra: dict[str, str]) -> list[Mapping[str, Any]]:
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
            "io.modelcontextprotocol/clientInfo": _CLIENT_INFO,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        return await paginate({"mcp-protocol-version": MODERN_VERSION, "mcp-method": "tools/list"} | extra, meta)

    async def legacy(extra: dict[str, str]) -> list[Mapping[str, Any]]:
        init = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": _CLIENT_INFO}
        resp_headers, _ = await rpc("initialize", init, extra, 0)
        headers = {"mcp-protocol-version": LEGACY_VERSION} | extra
        session = resp_headers.get("mcp-session-id")
        if session:
            headers["mcp-session-id"] = session
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        await exchange("POST", headers | {"content-type": "application/json"}, note)
        try:
            return await paginate(headers, None)
        finally:
            if session:
                await exchange("DELETE", headers, b"")

    # `host` is what the triggering request presented: an in-process app may check it (DNS rebinding).
    async def lister(host: str | None) -> list[Mapping[str, Any]]:
        extra = {"host": host} if host else {}
        try:
            return await modern(extra)
        except ListingError:
            return await legacy(extra)

    return lister
