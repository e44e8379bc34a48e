"""How a request ended, observed once as the answer streams past and shared by the audit and telemetry layers.

The answer is only scanned for the status, its size, the JSON-RPC error code and a tool's ``isError``
flag; nothing of it is kept. The first layer to ask wraps ``send``; any layer inside it shares that
outcome instead of scanning the same bytes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from starlette.types import Message, Scope, Send

from mcpguard.headers import response_content_type
from mcpguard.json_input import read_json
from mcpguard.request_state import state_of
from mcpguard.sse import EventSplitter, event_data

__all__ = ["Outcome", "decision_for", "observe"]

_SCAN_LIMIT = 1024 * 1024
_UPSTREAM_FAILURES = frozenset({"bad_gateway", "gateway_timeout"})


@dataclass(slots=True)
class Outcome:
    """What the answer said, scanned as it streams past (never kept)."""

    rpc_id: Any
    status: int | None = None
    bytes_out: int = 0
    rpc_error: int | None = None
    tool_error: bool | None = None
    sse: bool = False
    found: bool = False
    scanned: int = 0
    buffer: bytearray | None = None
    splitter: EventSplitter | None = None

    def start(self, message: Message) -> None:
        self.status = message["status"]
        content_type = response_content_type(message)
        if self.rpc_id is None:
            return
        if content_type.startswith(b"text/event-stream"):
            self.sse, self.splitter = True, EventSplitter()
        elif content_type.startswith(b"application/json"):
            self.buffer = bytearray()

    def body(self, chunk: bytes, more: bool) -> None:
        self.bytes_out += len(chunk)
        if self.found or self.scanned > _SCAN_LIMIT:
            return
        self.scanned += len(chunk)
        if self.splitter is not None:
            for event in self.splitter.feed(chunk):
                _, data = event_data(event)
                if data is not None:
                    self._read(data)
        elif self.buffer is not None:
            self.buffer += chunk
            if not more:
                self._read(bytes(self.buffer))
                self.buffer = None

    def _read(self, data: str | bytes) -> None:
        try:
            # Bytes are taken as json.loads takes them: a byte order mark, UTF-16 or UTF-32 included.
            payload = read_json(data)
        except ValueError:  # not JSON, or nested past what Python can parse
            return
        if not isinstance(payload, dict) or payload.get("id") != self.rpc_id:
            return
        self.found = True
        error = payload.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        # Only a code a 64-bit column can hold: an upstream's oversized number must not break the trail.
        if isinstance(code, int) and not isinstance(code, bool) and -(2**63) <= code < 2**63:
            self.rpc_error = code
        result = payload.get("result")
        if isinstance(result, dict) and isinstance(result.get("isError"), bool):
            self.tool_error = result["isError"]


def observe(scope: Scope, send: Send) -> tuple[Outcome, Send]:
    """This request's outcome and the ``send`` to pass on: a wrapper that fills it, or ``send`` itself if an
    outer layer already does."""
    state = state_of(scope)
    if state.outcome is not None:
        return state.outcome, send
    outcome = state.outcome = Outcome(rpc_id=None)

    async def observing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.rpc_id = state.message.id if state.message is not None else None
            outcome.start(message)
        elif message["type"] == "http.response.body":
            outcome.body(message.get("body", b""), message.get("more_body", False))
        await send(message)

    return outcome, observing_send


def decision_for(refusal: str | None) -> Literal["allowed", "denied"]:
    """The guard's decision given the wire code it refused with, if any."""
    # An upstream failure is an allowed call that went wrong, not a refusal.
    return "denied" if refusal is not None and refusal not in _UPSTREAM_FAILURES else "allowed"
