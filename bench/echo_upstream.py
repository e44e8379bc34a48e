"""The cheap upstream for proxy benchmarks: a raw ASGI app answering MCP POSTs with small fixed results.

Run: ``python -m bench.echo_upstream --http 127.0.0.1:9001``. It answers just enough MCP at ``/mcp``
(``initialize``, ``server/discover``, ``tools/list`` naming one read-only ``echo`` tool) for a guard
to classify ``tools/call``; every other request gets the same ``echo`` result. It does almost no
work, so whatever sits in front of it is the bottleneck.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROTOCOL = "2026-07-28"
SERVER_INFO = {"name": "echo-upstream", "version": "1"}
CAPABILITIES = {"tools": {"listChanged": False}}
ECHO_TOOL = {
    "name": "echo",
    "description": "Return the text unchanged.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    "annotations": {"readOnlyHint": True},
}
META = {"io.modelcontextprotocol/serverInfo": SERVER_INFO}
RESULTS: dict[str, bytes] = {
    "server/discover": json.dumps(
        {"supportedVersions": [PROTOCOL], "capabilities": CAPABILITIES, "resultType": "complete", "_meta": META}
    ).encode(),
    "tools/list": json.dumps({"tools": [ECHO_TOOL], "resultType": "complete", "_meta": META}).encode(),
    "tools/call": json.dumps(
        {"content": [{"type": "text", "text": "hi"}], "isError": False, "resultType": "complete"}
    ).encode(),
}
JSON_HEADERS = [(b"content-type", b"application/json")]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer POST /mcp with the fixed result for its method; anything else gets 404 or 405."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] != "/mcp":
        await _respond(send, 404, b"")
        return
    if scope["method"] != "POST":
        await _respond(send, 405, b"")
        return
    request = json.loads(body)
    if "id" not in request:
        await _respond(send, 202, b"")
        return
    method = request.get("method")
    if method == "initialize":
        version = request.get("params", {}).get("protocolVersion", "2025-06-18")
        result = json.dumps({"protocolVersion": version, "capabilities": CAPABILITIES, "serverInfo": SERVER_INFO})
        payload = result.encode()
    else:
        payload = RESULTS.get(method, RESULTS["tools/call"])
    answer = b'{"jsonrpc":"2.0","id":' + json.dumps(request["id"]).encode() + b',"result":' + payload + b"}"
    await _respond(send, 200, answer)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = JSON_HEADERS if body else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    """Serve the echo upstream with uvicorn (uvloop, httptools, no access log)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http", default="127.0.0.1:9001", metavar="HOST:PORT")
    host, _, port = parser.parse_args().http.rpartition(":")
    options: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "lifespan": "off", "log_level": "warning"}
    uvicorn.run(app, host=host, port=int(port), access_log=False, **options)


if __name__ == "__main__":
    main()
