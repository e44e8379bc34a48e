"""Audit entries exported as OpenTelemetry log records: one per entry, its fields only, in its trace, and
an export that fails or stalls never touches the call."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor, ReadableLogRecord, ReadWriteLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    InMemoryLogRecordExporter,
    LogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mcpguard import AuditEvent, ExportingAuditStore, GuardConfig, MCPGuard, Telemetry, open_store
from mcpguard.audit import SQLiteAuditStore
from tests.conftest import cheap_keyring, free_port, make_keys, serve
from tests.test_audit import CANARY, ToolApp, tools
from tests.test_guard import rpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PREFIX = "mcpguard.audit."


def in_memory_logs() -> tuple[LoggerProvider, InMemoryLogRecordExporter]:
    """A logger provider that hands each record to an in-memory exporter as it is emitted."""
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    return provider, exporter


def attributes(record: ReadableLogRecord) -> dict[str, Any]:
    """A record's attributes as a plain dict."""
    return dict(record.log_record.attributes or {})


def wait_for(found: Callable[[], Sequence[Any]], count: int) -> list[Any]:
    """What ``found`` returns once it holds ``count`` items (an entry's end is written after the answer)."""
    deadline = time.monotonic() + 5
    while True:
        items = list(found())
        if len(items) >= count or time.monotonic() > deadline:
            return items
        time.sleep(0.01)


def stored_ids(database: Path, trace_id: str) -> set[str]:
    """The ids of the trail's entries in ``trace_id``, read from the SQLite file."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT id FROM audit_events WHERE trace_id = ?", (trace_id,)).fetchall()
    conn.close()
    return {row[0] for row in rows}


@dataclass
class Exported:
    url: str
    database: Path
    keys: dict[str, str]
    logs: InMemoryLogRecordExporter
    spans: InMemorySpanExporter

    def post(self, label: str | None, body: Any, *, path: str = "/mcp", **headers: str) -> httpx.Response:
        sent = {"Authorization": f"Bearer {self.keys[label]}"} if label is not None else {}
        return httpx.post(self.url + path, json=body, headers={**sent, **headers})

    def records(self, **wanted: Any) -> Callable[[], list[ReadableLogRecord]]:
        def matching() -> list[ReadableLogRecord]:
            return [
                record
                for record in self.logs.get_finished_logs()
                if all(attributes(record).get(PREFIX + name) == value for name, value in wanted.items())
            ]

        return matching

    def server_span(self, trace_id: int) -> ReadableSpan:
        spans = wait_for(
            lambda: [
                s
                for s in self.spans.get_finished_spans()
                if s.kind is SpanKind.SERVER and s.context is not None and s.context.trace_id == trace_id
            ],
            1,
        )
        assert len(spans) == 1
        return spans[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    database = tmp_path_factory.mktemp("log-export") / "audit.db"
    store = open_store("memory://")
    keys = make_keys(store, {"acme": ("acme", ["mcp:read"])})
    provider, logs = in_memory_logs()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    audit = ExportingAuditStore(SQLiteAuditStore(str(database)), logger_provider=provider)
    port = free_port()
    guard = MCPGuard(
        ToolApp(database),
        GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        keys=cheap_keyring(store),
        tool_lister=tools,
        audit=audit,
        telemetry=Telemetry(tracer_provider=tracer_provider),
    )
    with serve(guard, port) as url:
        yield Exported(url, database, keys, logs, spans)
    tracer_provider.shutdown()
    provider.shutdown()


def test_each_entry_of_a_call_is_one_record_in_its_trace(exported: Exported) -> None:
    """A forwarded call's start and end are two INFO records with their fields, under the guard's span."""
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    body = rpc("tools/call", {"name": "read_tool", "arguments": {}})
    assert exported.post("acme", body, traceparent=traceparent).status_code == 200
    records = wait_for(exported.records(trace_id=TRACE_ID), 2)
    stored = wait_for(lambda: sorted(stored_ids(exported.database, TRACE_ID)), 2)
    assert sorted(attributes(r)[PREFIX + "id"] for r in records) == stored
    assert len(records) == 2
    # Ids order by millisecond only: a call's start and end made within one are told apart by phase.
    start, end = sorted(records, key=lambda r: attributes(r)[PREFIX + "phase"] != "start")
    assert (attributes(start)[PREFIX + "phase"], attributes(end)[PREFIX + "phase"]) == ("start", "end")
    assert attributes(end)[PREFIX + "start_id"] == attributes(start)[PREFIX + "id"]
    span = exported.server_span(int(TRACE_ID, 16))
    assert span.context is not None
    for record in (start, end):
        found = attributes(record)
        assert found[PREFIX + "tenant"] == "acme"
        assert found[PREFIX + "subject"] == "key:acme"
        assert found[PREFIX + "tool"] == "read_tool"
        assert (found[PREFIX + "http_method"], found[PREFIX + "path"]) == ("POST", "/mcp")
        assert all(name.startswith(PREFIX) for name in found)
        assert record.log_record.event_name == "mcpguard.audit"
        assert record.log_record.severity_text == "INFO"
        assert record.log_record.trace_id == int(TRACE_ID, 16)
        assert record.log_record.span_id == span.context.span_id
    assert (attributes(end)[PREFIX + "status"], attributes(end)[PREFIX + "decision"]) == (200, "allowed")


def test_entry_without_a_client_trace_joins_the_guards_span(exported: Exported) -> None:
    """With no traceparent the entry names no trace, and its record is in the trace the guard's span began."""
    body = rpc("tools/call", {"name": "read_tool", "arguments": {}}, rid=77)
    assert exported.post("acme", body, **{"User-Agent": "untraced-client/1"}).status_code == 200
    records = wait_for(exported.records(user_agent="untraced-client/1"), 2)
    assert len(records) == 2
    trace_ids = {record.log_record.trace_id for record in records}
    assert len(trace_ids) == 1
    span = exported.server_span(trace_ids.pop())
    assert span.context is not None
    assert {record.log_record.span_id for record in records} == {span.context.span_id}
    assert all(PREFIX + "trace_id" not in attributes(record) for record in records)


def test_denied_call_is_a_warning(exported: Exported) -> None:
    """A refusal is exported as one WARN record naming the decision and its reason."""
    body = rpc("tools/call", {"name": "drop_tool", "arguments": {}})
    assert exported.post("acme", body).status_code == 403
    records = wait_for(exported.records(tool="drop_tool"), 1)
    assert len(records) == 1
    found = attributes(records[0])
    assert (found[PREFIX + "phase"], found[PREFIX + "decision"], found[PREFIX + "reason"]) == (
        "local",
        "denied",
        "scope",
    )
    assert records[0].log_record.severity_text == "WARN"
    assert records[0].log_record.severity_number is not None
    assert records[0].log_record.severity_number.name == "WARN"


@pytest.mark.threat("T-AUDIT-LEAK")
def test_canary_never_reaches_an_exported_record(exported: Exported) -> None:
    """A secret in arguments, results, headers, cookies, the query string or a bad key is in no exported record."""
    before = len(exported.logs.get_finished_logs())
    response = exported.post(
        "acme",
        rpc("tools/call", {"name": "read_tool", "arguments": {"secret": CANARY}}),
        path=f"/mcp?token={CANARY}",
        Cookie=f"session={CANARY}",
        **{"X-Custom": CANARY},
    )
    assert CANARY in response.text
    exported.post("acme", rpc("resources/read", {"uri": f"file:///notes?token={CANARY}"}))
    exported.post("acme", rpc("ping"), **{"Mcp-Session-Id": CANARY})
    assert exported.post(None, rpc("ping"), Authorization=f"Bearer {CANARY}").status_code == 401
    records = wait_for(exported.logs.get_finished_logs, before + 6)[before:]
    assert len(records) >= 6
    for record in records:
        text = record.to_json() + json.dumps(attributes(record))
        assert CANARY not in text
        assert exported.keys["acme"] not in text


def test_record_holds_every_field_of_the_entry_and_nothing_else(tmp_path: Path) -> None:
    """Every field the entry sets is an attribute of the same value (the time as ISO 8601); unset ones are absent."""
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    event = AuditEvent(
        id="01JGZ0000000000000000000AB",
        at=at,
        phase="end",
        start_id="01JGZ0000000000000000000AA",
        tenant="acme",
        subject="key:alice",
        credential_id="cred-1",
        client_id="client-1",
        session="5e55",
        rpc_method="tools/call",
        tool="read_tool",
        http_method="POST",
        path="/mcp",
        status=200,
        rpc_error=-32601,
        tool_error=False,
        decision="allowed",
        duration_ms=1.5,
        bytes_in=10,
        bytes_out=20,
        trace_id=TRACE_ID,
    )
    provider, logs = in_memory_logs()

    async def body() -> None:
        store = ExportingAuditStore(SQLiteAuditStore(str(tmp_path / "audit.db")), logger_provider=provider)
        await store.append(event, durable=True)
        await store.close()

    asyncio.run(body())
    (record,) = logs.get_finished_logs()
    assert attributes(record) == {
        PREFIX + "id": "01JGZ0000000000000000000AB",
        PREFIX + "at": "2025-01-02T03:04:05.678901+00:00",
        PREFIX + "phase": "end",
        PREFIX + "start_id": "01JGZ0000000000000000000AA",
        PREFIX + "tenant": "acme",
        PREFIX + "subject": "key:alice",
        PREFIX + "credential_id": "cred-1",
        PREFIX + "client_id": "client-1",
        PREFIX + "session": "5e55",
        PREFIX + "rpc_method": "tools/call",
        PREFIX + "tool": "read_tool",
        PREFIX + "http_method": "POST",
        PREFIX + "path": "/mcp",
        PREFIX + "status": 200,
        PREFIX + "rpc_error": -32601,
        PREFIX + "tool_error": False,
        PREFIX + "decision": "allowed",
        PREFIX + "duration_ms": 1.5,
        PREFIX + "bytes_in": 10,
        PREFIX + "bytes_out": 20,
        PREFIX + "trace_id": TRACE_ID,
    }
    assert record.log_record.timestamp == int(at.timestamp()) * 10**9 + 678901 * 1000
    assert record.log_record.trace_id == int(TRACE_ID, 16)
    assert record.log_record.body is None
    provider.shutdown()


def test_failed_append_exports_nothing(tmp_path: Path) -> None:
    """An entry the store refuses is not exported: the records mirror the trail, not what was tried."""
    provider, logs = in_memory_logs()
    event = AuditEvent(id="01JGZ0000000000000000000AC", at=AuditEvent.now(), phase="local")

    async def body() -> None:
        store = ExportingAuditStore(SQLiteAuditStore(str(tmp_path / "audit.db")), logger_provider=provider)
        await store.close()
        with pytest.raises(Exception, match="audit store unavailable"):
            await store.append(event, durable=True)

    asyncio.run(body())
    assert logs.get_finished_logs() == ()
    provider.shutdown()


class RaisingExporter(LogRecordExporter):
    """An exporter whose collector is always down."""

    def __init__(self) -> None:
        self.attempts = 0

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.attempts += 1
        raise ConnectionError("collector down")

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class RaisingProcessor(LogRecordProcessor):
    """A processor that fails on the request path itself, as a broken pipeline would."""

    def __init__(self) -> None:
        self.calls = 0

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        self.calls += 1
        raise RuntimeError("pipeline broken")

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class StalledExporter(LogRecordExporter):
    """An exporter whose collector takes every batch and never answers until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        self.entered.set()
        self.release.wait(30)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@contextmanager
def guarded_with(provider: LoggerProvider, database: Path) -> Iterator[tuple[str, str, SQLiteAuditStore]]:
    """A guard over the tool app exporting its audit entries to ``provider``; yields its URL, a key and the trail."""
    store = open_store("memory://")
    key = make_keys(store, {"acme": ("acme", ["mcp:read"])})["acme"]
    trail = SQLiteAuditStore(str(database))
    port = free_port()
    guard = MCPGuard(
        ToolApp(database),
        GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        keys=cheap_keyring(store),
        tool_lister=tools,
        audit=ExportingAuditStore(trail, logger_provider=provider),
    )
    with serve(guard, port) as url:
        yield url, key, trail


def read_calls(url: str, key: str, count: int) -> list[httpx.Response]:
    """``count`` calls of read_tool with ``key``."""
    body = rpc("tools/call", {"name": "read_tool", "arguments": {}})
    return [httpx.post(url + "/mcp", json=body, headers={"Authorization": f"Bearer {key}"}) for _ in range(count)]


def trail_size(database: Path) -> int:
    """How many entries the SQLite trail holds."""
    with sqlite3.connect(database) as conn:
        count: int = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
    conn.close()
    return count


def test_export_failure_never_fails_the_call(tmp_path: Path) -> None:
    """A collector that is down and a pipeline that raises on emit leave every call answered and recorded."""
    exporter, processor = RaisingExporter(), RaisingProcessor()
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    provider.add_log_record_processor(processor)
    database = tmp_path / "audit.db"
    with guarded_with(provider, database) as (url, key, _):
        responses = read_calls(url, key, 3)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert len(wait_for(lambda: [None] * trail_size(database), 6)) == 6
    assert exporter.attempts >= 3
    assert processor.calls >= 3
    provider.shutdown()


def test_stalled_collector_never_slows_the_call(tmp_path: Path) -> None:
    """With the batch processor stuck in an export that never returns, calls are still answered and recorded."""
    exporter = StalledExporter()
    provider = LoggerProvider(shutdown_on_exit=False)
    provider.add_log_record_processor(BatchLogRecordProcessor(exporter, schedule_delay_millis=10))
    database = tmp_path / "audit.db"
    try:
        with guarded_with(provider, database) as (url, key, _):
            assert read_calls(url, key, 1)[0].status_code == 200
            assert exporter.entered.wait(5)
            responses = read_calls(url, key, 10)
            assert not exporter.release.is_set()
            assert all(r.status_code == 200 for r in responses)
            assert len(wait_for(lambda: [None] * trail_size(database), 22)) == 22
    finally:
        exporter.release.set()
        provider.shutdown()
