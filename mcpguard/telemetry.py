"""OpenTelemetry for the guard: a server span per request and the MCP operation metrics, named as the MCP
semantic conventions name them.

``TelemetryLayer`` sits just inside the entry and outside the audit layer, so a span covers the whole
request, audit writes included; the two share one scan of the answer (``RequestState.outcome``). Nothing
secret goes into a span or a metric: no body, header, query string or credential, and the
``Mcp-Session-Id`` only as the audit trail's digest of it.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass

from opentelemetry import metrics, propagate, trace
from opentelemetry._logs import LoggerProvider
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk._logs import LoggerProvider as SDKLoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.audit.events import bounded, reason_for
from mcpguard.config import ConfigError, GuardConfig
from mcpguard.outcome import Outcome, decision_for, observe
from mcpguard.request_state import RequestState, request_headers, state_of
from mcpguard.scopes import MCP_METHODS
from mcpguard.sessions import session_digest

__all__ = ["Telemetry", "TelemetryLayer", "configure_telemetry", "trace_sampler"]

_INSTRUMENTATION = "mcpguard"
_SESSION = b"mcp-session-id"
# The MCP semantic conventions' advised boundaries for mcp.server.operation.duration, in seconds.
_DURATION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Tool names and request ids are the client's choice: cut so one request cannot bloat every span it makes (a
# method and a path are cut as the audit trail cuts them).
_CLIENT_VALUE_LIMIT = 128
_TARGETS = {"tools/call": "gen_ai.tool.name", "prompts/get": "gen_ai.prompt.name"}
# A method the protocol does not name, or an error code outside JSON-RPC's reserved range (an upstream's own,
# any 64-bit number), is measured under this one name, as OpenTelemetry's HTTP conventions do.
_OTHER = "_OTHER"
_RESERVED_CODES = range(-32768, -32000 + 1)
# The OTLP package still names its log exporter module as private, while the logs signal settles.
_LOG_EXPORTER = "opentelemetry.exporter.otlp.proto.http._log_exporter"


@dataclass(frozen=True, slots=True, kw_only=True)
class Telemetry:
    """Where the guard's spans, metrics and exported audit logs go: the global OpenTelemetry providers unless
    others are given (audit logs are exported only through ``ExportingAuditStore``)."""

    tracer_provider: trace.TracerProvider | None = None
    meter_provider: metrics.MeterProvider | None = None
    logger_provider: LoggerProvider | None = None


def _propagation(textmap: TextMapPropagator) -> tuple[TextMapPropagator, frozenset[bytes]]:
    # ASGI header names are lower case bytes; the propagator names its fields as strings.
    return textmap, frozenset(field.lower().encode("latin-1") for field in textmap.fields)


class TelemetryLayer:
    """One server span per request, in the client's trace when it sent a ``traceparent``, plus the
    ``mcp.server.operation.duration`` histogram and the ``mcpguard.decisions`` counter."""

    name = "telemetry"

    def __init__(self, app: ASGIApp, config: GuardConfig, telemetry: Telemetry | None = None) -> None:
        self.app = app
        telemetry = telemetry if telemetry is not None else Telemetry()
        self._mcp_path = config.mcp_path
        self._tenant_path = config.tenant_path
        self._tracer = trace.get_tracer(_INSTRUMENTATION, tracer_provider=telemetry.tracer_provider)
        meter = metrics.get_meter(_INSTRUMENTATION, meter_provider=telemetry.meter_provider)
        self._duration = meter.create_histogram(
            "mcp.server.operation.duration",
            unit="s",
            description="Duration of MCP requests through the guard, refusals included.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._decisions = meter.create_counter(
            "mcpguard.decisions", unit="{request}", description="Requests the guard allowed or denied, by reason."
        )
        self._propagation = _propagation(propagate.get_global_textmap())

    def _read_headers(self, scope: Scope) -> tuple[Context | None, str | None]:
        """The client's trace context (``None`` when it sent none) and ``Mcp-Session-Id``, from its header index."""
        textmap, fields = self._propagation
        if textmap is not propagate.get_global_textmap():
            # The global propagator is normally set once at startup; follow it if it is replaced later.
            textmap, fields = self._propagation = _propagation(propagate.get_global_textmap())
        headers = request_headers(scope)
        # A repeated field is one comma-separated list (RFC 9110 §5.3), as trace context asks of tracestate.
        carrier = {
            name.decode("latin-1"): b",".join(values).decode("latin-1")
            for name in fields
            if (values := headers.get(name))
        }
        sessions = headers.get(_SESSION)
        session = sessions[0].decode("latin-1") if sessions else None  # the first, as every layer reads it
        # Without a propagation header, extracting would only cost time: the current context is the parent.
        return (textmap.extract(carrier) if carrier else None), session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = state_of(scope)
        parent, session = self._read_headers(scope)
        outcome, observing_send = observe(scope, send)
        error_type: str | None = None
        began = time.perf_counter()
        with self._tracer.start_as_current_span(
            scope["method"],
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": bounded(scope["path"])},
            # Exception messages can quote what a request carried; only the exception's type is recorded.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await self.app(scope, receive, observing_send)
            except Exception as exc:
                error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
                raise
            finally:
                self._finish(span, scope, state, outcome, session, error_type, time.perf_counter() - began)

    def _finish(
        self,
        span: trace.Span,
        scope: Scope,
        state: RequestState,
        outcome: Outcome,
        session: str | None,
        error_type: str | None,
        elapsed: float,
    ) -> None:
        message, principal, refusal = state.message, state.principal, state.refusal
        method = bounded(message.method) if message is not None else None
        target_key = _TARGETS.get(method) if method is not None else None
        name = message.name if message is not None and target_key is not None else None
        target = name[:_CLIENT_VALUE_LIMIT] if name is not None else None
        decision = decision_for(refusal)
        status = outcome.status
        error = _error_type(refusal, error_type, outcome)

        attributes: dict[str, AttributeValue] = {"mcpguard.decision": decision}
        if refusal is not None:
            attributes["mcpguard.reason"] = reason_for(refusal, state.refusal_reason)
        if error is not None:
            attributes["error.type"] = error
        if status is not None:
            attributes["http.response.status_code"] = status
        route = None
        if state.is_mcp:
            route = self._tenant_path if state.path_tenant is not None else self._mcp_path
            if route is not None:
                attributes["http.route"] = route
        if method is not None:
            attributes["mcp.method.name"] = method
            if target_key is not None and target is not None:
                attributes[target_key] = target
        if message is not None and message.id is not None:
            attributes["jsonrpc.request.id"] = str(message.id)[:_CLIENT_VALUE_LIMIT]
        if session is not None:
            attributes["mcp.session.id"] = session_digest(session)
        if principal is not None:
            attributes["mcpguard.tenant"] = principal.tenant
        span.set_attributes(attributes)
        if method is not None:
            span.update_name(f"{method} {target}" if target is not None else method)
        elif route is not None:
            span.update_name(f"{scope['method']} {route}")
        if error_type is not None or (status is not None and status >= 500):
            span.set_status(trace.Status(trace.StatusCode.ERROR))

        if method is not None:
            named = method if method in MCP_METHODS else _OTHER
            measured: dict[str, AttributeValue] = {"mcp.method.name": named}
            # Only an allowed call of a tool the server listed names it here: refused callers, or an admin's calls of
            # made-up names, could otherwise mint metric series at will.
            if method == "tools/call" and target is not None and decision == "allowed" and state.known_tool:
                measured["gen_ai.tool.name"] = target
            if error is not None:
                code = outcome.rpc_error
                chosen = code is not None and error == str(code) and code not in _RESERVED_CODES
                measured["error.type"] = _OTHER if chosen else error
            self._duration.record(elapsed, measured)
        counted: dict[str, AttributeValue] = {"decision": decision}
        if refusal is not None:
            counted["reason"] = reason_for(refusal, state.refusal_reason)
        self._decisions.add(1, counted)


def _error_type(refusal: str | None, raised: str | None, outcome: Outcome) -> str | None:
    """The guard's refusal, else what was raised, else the JSON-RPC error code, a tool error or a 5xx."""
    if refusal is not None or raised is not None:
        return refusal or raised
    if outcome.rpc_error is not None:
        return str(outcome.rpc_error)
    if outcome.tool_error:
        return "tool_error"
    if outcome.status is not None and outcome.status >= 500:
        return str(outcome.status)
    return None


def trace_sampler() -> Sampler:
    """Every request traced, whatever the client's ``traceparent`` says: its span joins the client's trace, but a
    client that marks its trace "not sampled" cannot keep its requests out of the guard's traces.

    The SDK's default follows a remote parent's flag, which would let any caller switch its own spans off.
    """
    return ParentBased(root=ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)


def configure_telemetry(*, service_name: str, otlp_endpoint: str | None, logs: bool = False) -> Telemetry | None:
    """Providers exporting to the OTLP/HTTP collector at ``otlp_endpoint`` (its base URL, such as
    ``http://collector:4318``), or ``None`` (telemetry off) without one; the global providers are left alone.

    With ``logs``, a logger provider for audit events exported as log records too (see ``ExportingAuditStore``).
    Spans are sampled by ``trace_sampler()`` unless ``OTEL_TRACES_SAMPLER`` names another sampler.
    Needs the ``otlp`` extra: ``pip install 'mcpguard[otlp]'``.
    """
    if not otlp_endpoint:
        return None
    try:
        span_exporters = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        metric_exporters = importlib.import_module("opentelemetry.exporter.otlp.proto.http.metric_exporter")
        log_exporters = importlib.import_module(_LOG_EXPORTER) if logs else None
    except ImportError:
        raise ConfigError(
            ["otlp_endpoint is set but the OTLP exporter is not installed: pip install 'mcpguard[otlp]'"]
        ) from None
    base = otlp_endpoint.rstrip("/")
    resource = Resource.create({"service.name": service_name})
    # An operator's OTEL_TRACES_SAMPLER is theirs to choose (the SDK reads it when given no sampler).
    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else trace_sampler()
    tracer_provider = SDKTracerProvider(resource=resource, sampler=sampler)
    span_exporter = span_exporters.OTLPSpanExporter(endpoint=f"{base}/v1/traces")
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    reader = PeriodicExportingMetricReader(metric_exporters.OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))
    meter_provider = SDKMeterProvider(resource=resource, metric_readers=[reader])
    logger_provider = None
    if log_exporters is not None:
        logger_provider = SDKLoggerProvider(resource=resource)
        # Batched: records are queued on the request path and exported by the SDK's own thread.
        log_exporter = log_exporters.OTLPLogExporter(endpoint=f"{base}/v1/logs")
        logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
    return Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider, logger_provider=logger_provider)
