"""The audit API's OpenAPI 3.1 document, served publicly so tools (ChatGPT Actions, Swagger) import it by URL.

Like RFC 9728 metadata it holds nothing secret: the guard's public origin, the endpoints, their
parameters and answers, and how to authenticate; never a tenant, credential id or operator.
"""

from __future__ import annotations

from typing import Any, get_args

from starlette.types import Receive, Scope, Send

from mcpguard.audit.api import CALL_FIELDS, CSV, CSV_FILENAME, EXPORT_CAP, JSON, NDJSON, TOOL_CALLS_PATH
from mcpguard.audit.events import ALL_TENANTS, NAME_LIMIT, USER_AGENT_LIMIT, Decision
from mcpguard.audit.query import DEFAULT_LIMIT, FILTERS, MAX_LIMIT, TENANT_PARAMETER
from mcpguard.config import GuardConfig
from mcpguard.errors import MethodNotAllowed
from mcpguard.responses import send_json
from mcpguard.scopes import AUDIT

__all__ = ["CALL_ID_PARAMETER", "OPENAPI_PATH", "OpenAPIRoute", "openapi_document"]

OPENAPI_PATH = "/api/mcp/openapi.json"
CALL_ID_PARAMETER = "call_id"

_DECISIONS = list(get_args(Decision))
_ID = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"}


def _nullable(kind: str, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], "description": description, **extra}


# Every field a call carries (CALL_FIELDS); building the document fails if one is left undescribed.
_CALL_PROPERTIES: dict[str, dict[str, Any]] = {
    "id": {**_ID, "description": "Id of the call (26 characters; ids sort by time)."},
    "at": {"type": "string", "format": "date-time", "description": "When the call arrived, UTC."},
    "tenant": _nullable("string", "Tenant of the credential; null when no credential was verified."),
    "subject": _nullable("string", "Who called, as the credential names it (e.g. key:<name>)."),
    "credential_id": _nullable("string", "Id of the key or grant used; never the credential itself."),
    "client_id": _nullable("string", "OAuth client id, or the key id for an MCP key."),
    "session": _nullable("string", "Hash of the MCP session id, to group the calls of one session."),
    "rpc_method": _nullable("string", f"JSON-RPC method, such as tools/call (cut to {NAME_LIMIT} characters)."),
    "tool": _nullable("string", f"Tool name, for tools/call (cut to {NAME_LIMIT} characters, ending in …)."),
    "http_method": {"type": "string", "description": "HTTP method of the request."},
    "path": {"type": "string", "description": f"Request path, without the query string (cut to {NAME_LIMIT})."},
    "status": _nullable("integer", "HTTP status of the answer; null while no outcome is recorded."),
    "rpc_error": _nullable("integer", "JSON-RPC error code of the answer, when it was an error."),
    "tool_error": _nullable("boolean", "The tool result's isError flag, when the answer had one."),
    "decision": {
        "type": ["string", "null"],
        "enum": [*_DECISIONS, None],
        "description": "Whether the guard let the call through.",
    },
    "reason": _nullable("string", "Why the guard refused, such as auth, scope, rate or tenant."),
    "duration_ms": _nullable("number", "Time from arrival to the end of the answer, in milliseconds."),
    "bytes_in": _nullable("integer", "Size of the request body."),
    "bytes_out": _nullable("integer", "Size of the response body."),
    "trace_id": _nullable("string", "W3C trace id from the traceparent header."),
    "user_agent": _nullable("string", f"User-Agent header, cut to {USER_AGENT_LIMIT} characters."),
    "read_tenant": _nullable(
        "string",
        "For a read of this audit trail answered with calls: the tenant whose trail it read, or "
        f"{ALL_TENANTS} for an operator's read of every tenant. Null for any other request.",
    ),
    "outcome": {
        "type": "string",
        "enum": ["complete", "no_outcome", "local"],
        "description": "complete: forwarded and answered; no_outcome: forwarded, end not recorded; "
        "local: answered by the guard itself (refusals included).",
    },
}

_TIME = {"type": "string", "format": "date-time"}
# Every query parameter the list accepts (FILTERS and the tenant); building fails if one is left out.
_PARAMETERS: dict[str, tuple[dict[str, Any], str, Any]] = {
    "tool": ({"type": "string"}, "Only calls of this tool.", "search_docs"),
    "method": ({"type": "string"}, "Only calls of this JSON-RPC method.", "tools/call"),
    "status": ({"type": "integer", "minimum": 100, "maximum": 599}, "Only calls answered with this HTTP status.", 403),
    "decision": ({"type": "string", "enum": _DECISIONS}, "Only calls the guard allowed, or only refusals.", "denied"),
    "subject": ({"type": "string"}, "Only calls by this subject.", "key:ci"),
    "credential": ({"type": "string"}, "Only calls made with this credential id (key id or grant id).", "AbCdEf123456"),
    "since": (
        _TIME,
        "Only calls at or after this time (ISO 8601; UTC when no offset is given).",
        "2026-01-01T00:00:00Z",
    ),
    "until": (_TIME, "Only calls before this time (ISO 8601; UTC when no offset is given).", "2026-02-01T00:00:00Z"),
    "limit": (
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        "Calls per page. An export (NDJSON or CSV) reads the store in pages of this size.",
        50,
    ),
    "cursor": ({"type": "string"}, "next_cursor from the previous page, to read the page after it.", None),
    TENANT_PARAMETER: (
        {"type": "string"},
        "Operator credentials only: the tenant to read (a tenant name, else 400), or leave out to read every "
        "tenant. The read is recorded with read_tenant, and is in the trail of the tenant it names. "
        "Any other credential reads its own tenant and is refused (403) if it sends this.",
        "acme",
    ),
}

_ERRORS = {
    "400": ("BadRequest", "A filter is malformed, unknown or repeated; error_description names every problem."),
    "401": ("Unauthorized", "No credential, or one that is invalid, expired or revoked."),
    "403": ("Forbidden", "The credential lacks mcp:audit, or is not an operator's and sent tenant."),
    "404": ("NotFound", "No call with this id in the tenant the credential may read."),
    "429": ("TooManyRequests", "A rate limit is used up; retry after Retry-After seconds."),
    "503": ("Unavailable", "The audit store could not answer; nothing is guessed, try again later."),
}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _parameter(name: str) -> dict[str, Any]:
    schema, description, example = _PARAMETERS[name]
    parameter: dict[str, Any] = {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }
    if example is not None:
        parameter["example"] = example
    return parameter


def _error_responses() -> dict[str, Any]:
    error = {JSON: {"schema": _ref("schemas", "Error")}}
    integer = {"schema": {"type": "integer"}}
    responses: dict[str, Any] = {}
    for name, description in _ERRORS.values():
        responses[name] = {"description": description, "content": error}
    challenge = {"description": "Bearer challenge naming the resource metadata.", "schema": {"type": "string"}}
    responses["Unauthorized"]["headers"] = {"WWW-Authenticate": challenge}
    responses["Forbidden"]["headers"] = {
        "WWW-Authenticate": {**challenge, "description": "Bearer challenge naming the scope needed (mcp:audit)."}
    }
    responses["TooManyRequests"]["headers"] = {
        "Retry-After": {**integer, "description": "Seconds to wait (at least 1)."},
        "RateLimit-Limit": {**integer, "description": "Requests allowed in the window."},
        "RateLimit-Remaining": {**integer, "description": "Requests left in the window."},
        "RateLimit-Reset": {**integer, "description": "Seconds until the window resets."},
    }
    return responses


def _responses(*codes: str) -> dict[str, Any]:
    return {code: _ref("responses", _ERRORS[code][0]) for code in codes}


def _list_operation() -> dict[str, Any]:
    export = (
        f"an export streams every matching call, newest first, page by page, up to {EXPORT_CAP}; when calls "
        "remain, the last line is a continuation that carries the cursor to go on from"
    )
    return {
        "operationId": "listToolCalls",
        "summary": "List the audited MCP calls of your tenant",
        "description": (
            "Calls recorded by the guard, newest first: who called which method or tool, the status and "
            "the guard's decision; never arguments or results. Includes operator reads of your trail. "
            "Needs mcp:audit. Page with limit and cursor; "
            "Accept application/x-ndjson or text/csv exports every match."
        ),
        "parameters": [_ref("parameters", name) for name in (*FILTERS, TENANT_PARAMETER)],
        "responses": {
            "200": {
                "description": "One page of calls (JSON), or an export of every match (NDJSON or CSV).",
                "headers": {
                    "Content-Disposition": {
                        "description": f'CSV only: attachment; filename="{CSV_FILENAME}".',
                        "schema": {"type": "string"},
                    }
                },
                "content": {
                    JSON: {"schema": _ref("schemas", "CallPage")},
                    NDJSON: {
                        "schema": {
                            "type": "string",
                            "description": f'One Call object per line; {export} ({{"next_cursor": ...}}).',
                        }
                    },
                    CSV: {
                        "schema": {
                            "type": "string",
                            "description": (
                                f"RFC 4180 CSV with the header row {','.join(CALL_FIELDS)}; {export} "
                                "(a row whose first cell starts with #). Cells that would start a spreadsheet "
                                "formula are prefixed with an apostrophe."
                            ),
                        }
                    },
                },
            },
            **_responses("400", "401", "403", "429", "503"),
        },
    }


def _get_operation() -> dict[str, Any]:
    return {
        "operationId": "getToolCall",
        "summary": "Get one audited MCP call by id",
        "description": "One call recorded by the guard, joined with its outcome. Needs mcp:audit; a call of "
        "another tenant is not found.",
        "parameters": [
            {
                "name": CALL_ID_PARAMETER,
                "in": "path",
                "required": True,
                "description": "Id of the call, as listToolCalls returns it.",
                "schema": _ID,
                "example": "01JD0000000000000000000000",
            },
            _ref("parameters", TENANT_PARAMETER),
        ],
        "responses": {
            "200": {"description": "The call.", "content": {JSON: {"schema": _ref("schemas", "Call")}}},
            **_responses("400", "401", "403", "404", "429", "503"),
        },
    }


def openapi_document(config: GuardConfig) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the audit API as ``config``'s public origin serves it."""
    schemes: dict[str, Any] = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": f"An MCP key (mk_...) or an OAuth access token granting {AUDIT} (mcp:admin includes it).",
        }
    }
    security: list[dict[str, list[str]]] = [{"bearerAuth": [AUDIT]}]
    if config.api_key_header is not None:
        schemes["apiKeyHeader"] = {
            "type": "apiKey",
            "in": "header",
            "name": config.api_key_header,
            "description": f"An MCP key granting {AUDIT}, sent in this header instead of Authorization.",
        }
        security.append({"apiKeyHeader": [AUDIT]})
    title = f"{config.resource_name} audit trail" if config.resource_name else "MCP audit trail"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": "1.0.0",
            "description": (
                "Read the audit trail an mcpguard guard keeps of the MCP calls it sees: who called which tool, "
                f"when, and what the guard decided. Bodies are never recorded. Every request needs {AUDIT}; "
                "a credential reads only its own tenant's calls, and the operator's reads of its trail."
            ),
        },
        "servers": [{"url": config.origin}],
        "security": security,
        "paths": {
            TOOL_CALLS_PATH: {"get": _list_operation()},
            f"{TOOL_CALLS_PATH}/{{{CALL_ID_PARAMETER}}}": {"get": _get_operation()},
        },
        "components": {
            "securitySchemes": schemes,
            "parameters": {name: _parameter(name) for name in (*FILTERS, TENANT_PARAMETER)},
            "schemas": {
                "Call": {
                    "type": "object",
                    "description": "One call: its start joined with its outcome. Never arguments or results.",
                    "required": list(CALL_FIELDS),
                    "properties": {name: _CALL_PROPERTIES[name] for name in CALL_FIELDS},
                },
                "CallPage": {
                    "type": "object",
                    "required": ["calls", "next_cursor"],
                    "properties": {
                        "calls": {"type": "array", "items": _ref("schemas", "Call"), "description": "Newest first."},
                        "next_cursor": {
                            "type": ["string", "null"],
                            "description": "Pass as cursor to read the next page; null on the last page.",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "error_description"],
                    "properties": {
                        "error": {"type": "string", "description": "Error code, such as invalid_request."},
                        "error_description": {"type": "string", "description": "What was wrong, for people."},
                    },
                },
            },
            "responses": _error_responses(),
        },
    }


class OpenAPIRoute:
    """Pure ASGI endpoint answering GET and HEAD with the document, built once from the frozen config."""

    def __init__(self, config: GuardConfig) -> None:
        self._document = openapi_document(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowed("the OpenAPI document is read-only", allowed=("GET", "HEAD"))
        # Public and free of secrets, so any site may read it (as with the RFC 9728 metadata).
        await send_json(send, 200, self._document, extra_headers=[(b"access-control-allow-origin", b"*")])
