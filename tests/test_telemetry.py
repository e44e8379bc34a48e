"""Telemetry over a real socket: MCP-named spans in the client's trace, the operation metrics, and no secrets."""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import Message, Receive, Scope, Send

from mcpguard import (
    AuditEvent,
    AuditQuery,
    ConfigError,
    GuardConfig,
    MCPGuard,
    Telemetry,
    build_guard,
    configure_telemetry,
    open_store,
    stack_names,
)
from mcpguard.audit.query import AuditPage
from mcpguard.telemetry import trace_sampler
from tests.conftest import cheap_keyring, free_port, make_keys, read_body, serve
from tests.test_guard import RecordingApp, list_tools

CANARY = "canary-5e1d7b3a9c2f4068"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


def rpc(method: str, rid: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-RPC request whose string id names the span it should produce."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        message["params"] = params
    return message


@dataclass
class ListAuditStore:
    """An audit store that keeps its events in a list, so a test can read what the audit layer saw."""

    events: list[AuditEvent] = field(default_factory=list)

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        self.events.append(event)

    async def query(self, q: AuditQuery) -> AuditPage:
        return AuditPage(calls=[], next_cursor=None)

    async def delete_before(self, cutoff: datetime) -> int:
        return 0

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class OutcomeApp:
    """The recording app, but 'failing' answers isError, 'missing/method' an error, a ping with a code an error
    of that code, and /boom raises."""

    inner: RecordingApp = field(default_factory=RecordingApp)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        if scope["path"] == "/boom":
            raise RuntimeError(f"broke while holding {CANARY}")
        body = await read_body(receive)
        request = json.loads(body) if body else {}
        if request.get("method") == "missing/method":
            answer: dict[str, Any] = {"error": {"code": -32601, "message": "no such method"}}
        elif request.get("method") == "ping" and "code" in request.get("params", {}):
            answer = {"error": {"code": request["params"]["code"], "message": "the server's own error"}}
        elif request.get("params", {}).get("name") == "failing":
            answer = {"result": {"content": [], "isError": True}}
        else:

            async def replay() -> Message:
                return {"type": "http.request", "body": body}

            await self.inner(scope, replay, send)
            return
        payload = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), **answer}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


async def tools(host: str | None) -> list[Any]:
    """The recording app's tools plus one whose calls fail."""
    return [*await list_tools(host), {"name": "failing", "annotations": {"readOnlyHint": True}}]


def exported_span(spans: InMemorySpanExporter, matches: Callable[[ReadableSpan], bool]) -> ReadableSpan:
    """The latest finished span that ``matches``, waited for a few seconds."""
    # A span ends once the answer is sent, so it can reach the exporter just after the client has it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [span for span in spans.get_finished_spans() if matches(span)]
        if found:
            return found[-1]
        time.sleep(0.01)
    raise AssertionError("no matching span was exported")


def metric_points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    """Every data point of the metric ``name`` collected so far (none before anything is measured)."""
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


@dataclass
class Traced:
    url: str
    keys: dict[str, str]
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    audit: ListAuditStore

    def post(self, label: str | None, body: Any, *, path: str = "/mcp", **headers: str) -> httpx.Response:
        sent = {"Authorization": f"Bearer {self.keys[label]}"} if label is not None else {}
        return httpx.post(self.url + path, json=body, headers={**sent, **headers})

    def span(self, matches: Callable[[ReadableSpan], bool]) -> ReadableSpan:
        return exported_span(self.spans, matches)

    def call_span(self, request_id: str) -> ReadableSpan:
        return self.span(lambda s: (s.attributes or {}).get("jsonrpc.request.id") == request_id)

    def points(self, name: str) -> list[Any]:
        return metric_points(self.metrics, name)


@contextmanager
def in_memory_telemetry(
    sampler: Sampler | None = None,
) -> Iterator[tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]]:
    """Telemetry whose spans and metrics are kept in memory, to be read back; shut down on the way out."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    try:
        yield Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider), spans, reader
    finally:
        tracer_provider.shutdown()
        meter_provider.shutdown()


@pytest.fixture(scope="module")
def traced() -> Iterator[Traced]:
    store = open_store("memory://")
    keys = make_keys(store, {"read": ("acme", ["mcp:read"]), "admin": ("acme", ["mcp:admin"])})
    audit = ListAuditStore()
    port = free_port()
    with in_memory_telemetry(trace_sampler()) as (telemetry, spans, reader):
        guard = MCPGuard(
            OutcomeApp(),
            GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            keys=cheap_keyring(store),
            tool_lister=tools,
            audit=audit,
            telemetry=telemetry,
        )
        with serve(guard, port) as url:
            yield Traced(url, keys, spans, reader, audit)


def test_allowed_tool_call_span_is_named_and_attributed(traced: Traced) -> None:
    """An allowed tools/call is one server span named after the tool, with the MCP attributes."""
    response = traced.post("read", rpc("tools/call", "allowed-1", {"name": "read_tool", "arguments": {}}))
    assert response.status_code == 200
    span = traced.call_span("allowed-1")
    assert span.name == "tools/call read_tool"
    assert span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "url.path": "/mcp",
        "http.route": "/mcp",
        "http.response.status_code": 200,
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "read_tool",
        "jsonrpc.request.id": "allowed-1",
        "mcpguard.tenant": "acme",
        "mcpguard.decision": "allowed",
    }


def test_scope_refusal_span_is_denied_with_its_error(traced: Traced) -> None:
    """A 403 for a missing scope is marked denied, reason scope, error.type insufficient_scope, status unset."""
    response = traced.post("read", rpc("tools/call", "denied-1", {"name": "drop_tool", "arguments": {}}))
    assert response.status_code == 403
    span = traced.call_span("denied-1")
    attributes = span.attributes or {}
    assert span.name == "tools/call drop_tool"
    assert attributes["error.type"] == "insufficient_scope"
    assert attributes["mcpguard.decision"] == "denied"
    assert attributes["mcpguard.reason"] == "scope"
    assert attributes["http.response.status_code"] == 403
    assert span.status.status_code is StatusCode.UNSET


def test_span_joins_the_clients_trace(traced: Traced) -> None:
    """A client's traceparent makes the guard's span a child in the client's trace, as the audit trail records."""
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    traced.post("read", rpc("ping", "traced-1"), **headers)
    span = traced.call_span("traced-1")
    assert span.context is not None
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None
    assert span.parent.is_remote
    assert span.parent.span_id == int(PARENT_SPAN_ID, 16)
    assert span.name == "ping"
    assert [e.trace_id for e in traced.audit.events if e.trace_id is not None][-1] == TRACE_ID


@pytest.mark.threat("T-TRACE-EVADE")
def test_client_marking_its_trace_unsampled_is_still_traced(traced: Traced) -> None:
    """A traceparent flagged "not sampled" cannot keep a call out of the guard's traces: the span is still
    recorded, in the client's trace."""
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"}
    response = traced.post("read", rpc("tools/call", "unsampled-1", {"name": "read_tool", "arguments": {}}), **headers)
    assert response.status_code == 200
    span = traced.call_span("unsampled-1")
    assert span.context is not None
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.context.trace_flags.sampled


def test_repeated_tracestate_headers_reach_the_span_as_one_list(traced: Traced) -> None:
    """Two tracestate headers are one list, as trace context requires: the span's parent carries both."""
    headers = [
        ("Authorization", f"Bearer {traced.keys['read']}"),
        ("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),
        ("tracestate", "alpha=1"),
        ("tracestate", "beta=2"),
    ]
    httpx.post(traced.url + "/mcp", json=rpc("ping", "tracestate-twice"), headers=headers)
    span = traced.call_span("tracestate-twice")
    assert span.parent is not None
    assert dict(span.parent.trace_state.items()) == {"alpha": "1", "beta": "2"}


def test_error_code_and_tool_error_become_error_type(traced: Traced) -> None:
    """A JSON-RPC error answer sets error.type to its code, an isError result to tool_error; both reach the audit."""
    traced.post("admin", rpc("missing/method", "rpc-error-1"))
    traced.post("read", rpc("tools/call", "tool-error-1", {"name": "failing", "arguments": {}}))
    assert (traced.call_span("rpc-error-1").attributes or {})["error.type"] == "-32601"
    assert (traced.call_span("tool-error-1").attributes or {})["error.type"] == "tool_error"
    ends = [e for e in traced.audit.events if e.phase == "end"]
    assert any(e.rpc_error == -32601 for e in ends)
    assert any(e.tool == "failing" and e.tool_error is True for e in ends)


@pytest.mark.threat("T-TELEMETRY-FLOOD")
def test_an_upstreams_own_error_codes_do_not_mint_metric_series(traced: Traced) -> None:
    """Codes outside JSON-RPC's reserved range are the server's choice: each stays on its span, but the duration
    metric names them all _OTHER, while reserved codes keep their own series."""
    codes = [1000 + n for n in range(30)]
    for code in codes:
        traced.post("read", rpc("ping", f"coded-{code}", {"code": code}))
    assert (traced.call_span(f"coded-{codes[-1]}").attributes or {})["error.type"] == str(codes[-1])
    measured = {(p.attributes or {}).get("error.type") for p in traced.points("mcp.server.operation.duration")}
    assert not measured & {str(code) for code in codes}
    assert "_OTHER" in measured
    traced.post("admin", rpc("missing/method", "rpc-error-2"))
    traced.call_span("rpc-error-2")
    assert "-32601" in {(p.attributes or {}).get("error.type") for p in traced.points("mcp.server.operation.duration")}


def test_app_exception_is_an_error_span_without_its_message(traced: Traced) -> None:
    """An app that raises gives a 500 span with status ERROR and the exception's type, never its message."""
    response = httpx.get(traced.url + "/boom", headers={"Authorization": f"Bearer {traced.keys['read']}"})
    assert response.status_code == 500
    span = traced.span(lambda s: (s.attributes or {}).get("url.path") == "/boom")
    assert span.name == "GET"
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "builtins.RuntimeError"
    assert span.events == ()


def test_session_id_is_the_audit_digest_never_the_id(traced: Traced) -> None:
    """mcp.session.id carries the same digest the audit trail keeps, so the two join without the raw id."""
    session = "session-4d2a"
    traced.post("read", rpc("ping", "session-1"), **{"Mcp-Session-Id": session})
    recorded = (traced.call_span("session-1").attributes or {})["mcp.session.id"]
    assert recorded == hashlib.sha256(session.encode()).hexdigest()[:32]
    assert recorded in {e.session for e in traced.audit.events}


def test_span_and_trail_name_the_same_session_when_the_header_repeats(traced: Traced) -> None:
    """With Mcp-Session-Id sent twice, the span and the audit entry both take the first, as every layer does."""
    headers = [
        ("Authorization", f"Bearer {traced.keys['read']}"),
        ("Mcp-Session-Id", "session-first"),
        ("Mcp-Session-Id", "session-second"),
    ]
    httpx.post(traced.url + "/mcp", json=rpc("ping", "session-twice"), headers=headers)
    recorded = (traced.call_span("session-twice").attributes or {})["mcp.session.id"]
    assert recorded == hashlib.sha256(b"session-first").hexdigest()[:32]
    assert recorded in {e.session for e in traced.audit.events}


def test_duration_histogram_and_decisions_counter_are_recorded(traced: Traced) -> None:
    """Each MCP request adds to mcp.server.operation.duration; every decision is counted by outcome and reason."""
    traced.post("read", rpc("tools/call", "metric-1", {"name": "read_tool", "arguments": {}}))
    traced.post("read", rpc("tools/call", "metric-2", {"name": "write_tool", "arguments": {}}))
    traced.call_span("metric-2")
    durations = {frozenset((p.attributes or {}).items()): p for p in traced.points("mcp.server.operation.duration")}
    allowed = durations[frozenset({("mcp.method.name", "tools/call"), ("gen_ai.tool.name", "read_tool")})]
    assert allowed.count >= 1
    assert 0 < allowed.sum < 5
    denied = durations[frozenset({("mcp.method.name", "tools/call"), ("error.type", "insufficient_scope")})]
    assert denied.count >= 1
    decisions = {frozenset((p.attributes or {}).items()): p.value for p in traced.points("mcpguard.decisions")}
    assert decisions[frozenset({("decision", "allowed")})] >= 1
    assert decisions[frozenset({("decision", "denied"), ("reason", "scope")})] >= 1


@pytest.mark.threat("T-AUDIT-LEAK")
def test_canary_never_reaches_spans_or_metrics(traced: Traced) -> None:
    """No secret sent anywhere in a request, nor the caller's key, appears in any span, event or metric."""
    traced.post(
        "read",
        rpc("tools/call", "canary-1", {"name": "read_tool", "arguments": {"secret": CANARY}}),
        path=f"/mcp?token={CANARY}",
        Cookie=f"session={CANARY}",
        **{"X-Custom": CANARY},
    )
    traced.post("read", rpc("resources/read", "canary-2", {"uri": f"file:///notes?token={CANARY}"}))
    traced.post("read", rpc("ping", "canary-3"), **{"Mcp-Session-Id": CANARY})
    traced.post(None, rpc("ping", "canary-4"), Authorization=f"Bearer {CANARY}")
    httpx.get(traced.url + f"/boom?token={CANARY}", headers={"Authorization": f"Bearer {traced.keys['read']}"})
    for request_id in ("canary-1", "canary-2", "canary-3", "canary-4"):
        traced.call_span(request_id)
    traced.span(lambda s: (s.attributes or {}).get("url.path") == "/boom")
    exported = "".join(span.to_json() for span in traced.spans.get_finished_spans())
    data = traced.metrics.get_metrics_data()
    assert data is not None
    measured = data.to_json()
    for secret in (CANARY, traced.keys["read"]):
        assert secret not in exported
        assert secret not in measured


def test_telemetry_is_a_layer_only_when_configured() -> None:
    """Without telemetry the stack has no telemetry layer; with it, the layer sits just inside the entry."""
    config = GuardConfig()
    assert "telemetry" not in stack_names(build_guard(RecordingApp(), config))
    traced = build_guard(RecordingApp(), config, telemetry=Telemetry(tracer_provider=TracerProvider()))
    assert stack_names(traced)[:2] == ["entry", "telemetry"]


def test_configure_telemetry_without_an_endpoint_is_off() -> None:
    """No OTLP endpoint means no telemetry at all, so the guard adds no layer."""
    assert configure_telemetry(service_name="mcpguard", otlp_endpoint=None) is None
    assert configure_telemetry(service_name="mcpguard", otlp_endpoint="") is None


def skip_if_otlp_installed() -> None:
    """Skip a test of what happens without the otlp extra where the extra is installed."""
    try:
        importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError:
        return
    pytest.skip("the otlp extra is installed here")


def test_endpoint_without_the_otlp_extra_is_a_config_error() -> None:
    """An endpoint given without the otlp extra installed fails at startup, naming the extra to install."""
    skip_if_otlp_installed()
    with pytest.raises(ConfigError, match=r"mcpguard\[otlp\]"):
        configure_telemetry(service_name="mcpguard", otlp_endpoint="http://127.0.0.1:4318")


def test_audit_logs_without_the_otlp_extra_are_a_config_error() -> None:
    """Asking for audit logs too, without the otlp extra installed, fails the same way, naming the extra."""
    skip_if_otlp_installed()
    with pytest.raises(ConfigError, match=r"mcpguard\[otlp\]"):
        configure_telemetry(service_name="mcpguard", otlp_endpoint="http://127.0.0.1:4318", logs=True)


def test_configure_telemetry_without_an_endpoint_exports_no_audit_logs() -> None:
    """Without an endpoint, asking for audit logs still means telemetry off: nothing to export them to."""
    assert configure_telemetry(service_name="mcpguard", otlp_endpoint=None, logs=True) is None
