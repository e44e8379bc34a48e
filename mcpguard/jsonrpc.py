"""Strict parsing of one MCP JSON-RPC message, so the guard decides on exactly what the server will read.

Anything two parsers could read differently is refused rather than interpreted: duplicate keys,
batches, non-UTF-8, ``NaN``, deep nesting, and routing headers that disagree with the body.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mcp.shared.inbound import decode_header_value

from mcpguard.errors import HeaderMismatch, InvalidRequest
from mcpguard.headers import header_index
from mcpguard.json_input import is_text

__all__ = ["NAME_PARAMS", "RpcMessage", "parse_message"]

PARSE_ERROR = -32700
INVALID_PARAMS = -32602

# Methods whose target is mirrored in the `Mcp-Name` header, and the param that names it.
NAME_PARAMS: Mapping[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

_ROUTING_HEADERS = (b"mcp-method", b"mcp-name", b"mcp-protocol-version")

RequestId = str | int


@dataclass(frozen=True, slots=True)
class RpcMessage:
    """One JSON-RPC message from a client, reduced to what decisions need."""

    kind: Literal["request", "notification", "response"]
    method: str | None
    id: RequestId | None
    name: str | None
    params: Mapping[str, Any] | None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with options would build a decoder (and its scanner) for every request.
_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
# What the guard records and routes on (the method, the name, the id) must be text the trail, the telemetry and
# the upstream's headers can carry: a lone surrogate escape is valid JSON but no Unicode text.
_NOT_TEXT = "JSON-RPC {} holds a lone surrogate escape, which is not Unicode text"


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _decode(body: bytes, max_depth: int) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not valid UTF-8", jsonrpc_code=PARSE_ERROR) from None
    if text.startswith("\ufeff"):
        raise InvalidRequest("request body starts with a byte order mark", jsonrpc_code=PARSE_ERROR)
    try:
        value = _STRICT.decode(text)
    except _DuplicateKey as exc:
        raise InvalidRequest(
            f"duplicate JSON key {str(exc)[:64]!r}: ambiguous requests are refused", jsonrpc_code=PARSE_ERROR
        ) from None
    except RecursionError:
        raise InvalidRequest("JSON nesting too deep", jsonrpc_code=PARSE_ERROR) from None
    except ValueError:
        raise InvalidRequest("request body is not valid JSON", jsonrpc_code=PARSE_ERROR) from None
    # Nesting can only exceed the limit if there are more brackets than the limit: usually there are not.
    if body.count(b"{") + body.count(b"[") > max_depth and _depth_exceeds(value, max_depth):
        raise InvalidRequest(f"JSON nesting deeper than {max_depth}", jsonrpc_code=PARSE_ERROR)
    return value


def _request_id(obj: Mapping[str, Any]) -> RequestId | None:
    if "id" not in obj:
        return None
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise InvalidRequest("JSON-RPC id must be a string or an integer")
    if isinstance(rid, str) and not is_text(rid):
        raise InvalidRequest(_NOT_TEXT.format("id"))
    return rid


# A request's headers: (name, value) pairs as ASGI gives them, or the values of each lower-case name.
Headers = Iterable[tuple[bytes, bytes]] | Mapping[bytes, Sequence[bytes]]


def _routing_headers(headers: Headers) -> dict[bytes, str]:
    if not isinstance(headers, Mapping):
        headers = header_index(headers)
    found: dict[bytes, str] = {}
    for name in _ROUTING_HEADERS:
        values = headers.get(name)
        if values:
            if len(values) > 1:
                raise HeaderMismatch(f"{name.decode()} header sent more than once")
            found[name] = values[0].decode("latin-1")
    return found


def _check_routing_headers(message: RpcMessage, headers: Headers) -> None:
    routing = _routing_headers(headers)
    method_header = routing.get(b"mcp-method")
    name_header = routing.get(b"mcp-name")
    if method_header is not None and method_header != message.method:
        raise HeaderMismatch("Mcp-Method header does not match the body's method")
    if name_header is not None:
        if message.method not in NAME_PARAMS:
            raise HeaderMismatch("Mcp-Name header sent for a method that names nothing")
        if decode_header_value(name_header) != message.name:
            raise HeaderMismatch("Mcp-Name header does not match the body")


def parse_message(body: bytes, headers: Headers, *, max_depth: int = 64) -> RpcMessage:
    """Parse and check one JSON-RPC message sent to an MCP endpoint; raise ``InvalidRequest`` if unsafe."""
    value = _decode(body, max_depth)
    if isinstance(value, list):
        raise InvalidRequest("JSON-RPC batches are not accepted; send one message per request")
    if not isinstance(value, dict):
        raise InvalidRequest("JSON-RPC message must be an object")
    if value.get("jsonrpc") != "2.0":
        raise InvalidRequest('JSON-RPC message must carry "jsonrpc": "2.0"')
    rid = _request_id(value)
    params = value.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("JSON-RPC params must be an object", jsonrpc_code=INVALID_PARAMS)

    if "method" in value:
        method = value["method"]
        if not isinstance(method, str) or not method:
            raise InvalidRequest("JSON-RPC method must be a non-empty string")
        if not is_text(method):
            raise InvalidRequest(_NOT_TEXT.format("method"))
        if "result" in value or "error" in value:
            raise InvalidRequest("a JSON-RPC message cannot be both a request and a response")
        name: str | None = None
        name_param = NAME_PARAMS.get(method)
        if name_param is not None:
            target = params.get(name_param) if params is not None else None
            if not isinstance(target, str):
                raise InvalidRequest(f"{method} needs params.{name_param} as a string", jsonrpc_code=INVALID_PARAMS)
            if not is_text(target):
                raise InvalidRequest(_NOT_TEXT.format(f"params.{name_param}"), jsonrpc_code=INVALID_PARAMS)
            name = target
        kind: Literal["request", "notification"] = "request" if rid is not None else "notification"
        message = RpcMessage(kind=kind, method=method, id=rid, name=name, params=params)
    elif "result" in value or "error" in value:
        if rid is None:
            raise InvalidRequest("a JSON-RPC response needs an id")
        if "result" in value and "error" in value:
            raise InvalidRequest("a JSON-RPC response cannot carry both result and error")
        message = RpcMessage(kind="response", method=None, id=rid, name=None, params=None)
    else:
        raise InvalidRequest("JSON-RPC message has neither a method nor a result")

    _check_routing_headers(message, headers)
    return message
