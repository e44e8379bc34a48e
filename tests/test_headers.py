"""The request's header index: built once by the guard's outermost layer, read by every layer after it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig
from mcpguard.guard import EntryLayer
from mcpguard.headers import header_index
from mcpguard.request_state import SCOPE_KEY, RequestState, request_headers, state_of


def test_index_lower_cases_names_and_keeps_every_value_in_order() -> None:
    headers = [(b"Accept", b"a"), (b"host", b"h"), (b"ACCEPT", b"b"), (b"accept", b"c")]
    assert header_index(headers) == {b"accept": [b"a", b"b", b"c"], b"host": [b"h"]}


def entered(headers: list[tuple[bytes, bytes]]) -> Scope:
    """The scope the first layer inside the guard's entry sees for a request with ``headers``."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"the entry answered by itself: {message}")

    entry = EntryLayer(app, GuardConfig(), wrapped=app)
    scope = {"type": "http", "method": "POST", "path": "/mcp", "headers": headers, "query_string": b""}
    asyncio.run(entry(scope, receive, send))
    (inner,) = seen
    return inner


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize("spelling", [b"x-mcpguard-tenant", b"X-MCPGuard-Tenant", b"X-MCPGUARD-TENANT"])
def test_identity_headers_from_outside_are_in_neither_the_headers_nor_the_index(spelling: bytes) -> None:
    """However it is spelt, a client's identity header is gone before any layer can read it either way."""
    scope = entered([(b"host", b"h"), (spelling, b"globex"), (b"accept", b"a")])
    assert scope["headers"] == [(b"host", b"h"), (b"accept", b"a")]
    assert state_of(scope).headers == {b"host": [b"h"], b"accept": [b"a"]}
    assert request_headers(scope) is state_of(scope).headers


@pytest.mark.threat("T-HEADER-UNDERSCORE")
@pytest.mark.parametrize(
    "spelling", [b"x_mcpguard_tenant", b"X_MCPGuard-Tenant", b"mcp_session_id", b"Mcp_Method", b"x_forwarded_for"]
)
def test_underscored_header_names_are_dropped_before_any_layer_reads_them(spelling: bytes) -> None:
    """A name that a CGI-style server would read as a guarded header ("_" folded into "-") is gone, from the
    headers and from the index, while the headers around it stay as sent."""
    scope = entered([(b"host", b"h"), (spelling, b"globex"), (b"Accept", b"a"), (b"mcp-method", b"ping")])
    assert scope["headers"] == [(b"host", b"h"), (b"Accept", b"a"), (b"mcp-method", b"ping")]
    assert state_of(scope).headers == {b"host": [b"h"], b"accept": [b"a"], b"mcp-method": [b"ping"]}


def test_a_header_list_is_indexed_on_first_read_when_no_entry_did_it() -> None:
    """A layer run on its own (no entry before it) still reads the request's headers, by lower-case name."""
    scope: Scope = {"headers": [(b"Host", b"h")], SCOPE_KEY: RequestState()}
    assert request_headers(scope) == {b"host": [b"h"]}
    assert state_of(scope).headers == {b"host": [b"h"]}
