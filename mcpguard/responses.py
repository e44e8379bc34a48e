"""How a refusal is written: a JSON-RPC error for MCP traffic, an RFC 6749-style JSON body otherwise."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

from mcpguard.errors import MCPGuardError
from mcpguard.request_state import RequestState

__all__ = ["send_error", "send_json"]


async def send_json(
    send: Send, status: int, payload: Any, *, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a complete JSON response."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        # Bodies can carry client-chosen text (tool names, user agents): never to be sniffed as something else.
        (b"x-content-type-options", b"nosniff"),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: MCPGuardError, state: RequestState, resource_metadata: str | None) -> None:
    """Answer ``error`` in the shape the client speaks, with its challenge when it has one."""
    headers: list[tuple[bytes, bytes]] = []
    challenge = error.challenge(resource_metadata)
    if challenge is not None:
        headers.append((b"www-authenticate", challenge.encode("latin-1", "replace")))
    headers.extend(error.headers())
    if state.cross_origin:
        headers.append((b"access-control-allow-origin", b"*"))
    payload: dict[str, Any]
    if state.is_mcp:
        rid = state.message.id if state.message is not None else None
        payload = {
            "jsonrpc": "2.0",
            "id": rid,
            "error": {"code": error.jsonrpc_code, "message": error.description, "data": {"error": error.error_code}},
        }
    else:
        payload = {"error": error.error_code, "error_description": error.description}
    await send_json(send, error.status, payload, extra_headers=headers)
