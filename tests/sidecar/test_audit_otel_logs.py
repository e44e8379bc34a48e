"""The sidecar's ``audit_otel_logs`` and ``otlp_endpoint`` settings: loaded and checked with the others, and
wired so that every audit entry of a call through the sidecar is exported as a log record."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mcpguard import ConfigError, Telemetry
from sidecar.serve import sidecar_from_settings
from sidecar.settings import SettingsError, SidecarSettings
from tests.conftest import free_port, make_keys, serve
from tests.sidecar.test_settings import load, problems_of
from tests.test_guard import RecordingApp
from tests.test_telemetry import skip_if_otlp_installed

UPSTREAM = "http://127.0.0.1:9000/mcp"
COLLECTOR = "http://collector.internal:4318"
NEEDS_ENDPOINT = "needs otlp_endpoint, the OTLP collector the audit logs are sent to"
BAD_ENDPOINT = "must be an http(s) URL of an OTLP/HTTP collector, without credentials or query"


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mcpguard.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


class TestSettings:
    def test_off_by_default(self) -> None:
        """Without the settings no audit log is exported and no collector is configured."""
        settings = load(upstream=UPSTREAM)
        assert (settings.audit_otel_logs, settings.otlp_endpoint) == (False, None)

    def test_from_toml(self, tmp_path: Path) -> None:
        """``audit_otel_logs = true`` and an ``otlp_endpoint`` load from the file."""
        config = write_toml(
            tmp_path, f'upstream = "{UPSTREAM}"\naudit_otel_logs = true\notlp_endpoint = "{COLLECTOR}"\n'
        )
        settings = load(config_file=config)
        assert (settings.audit_otel_logs, settings.otlp_endpoint) == (True, COLLECTOR)

    @pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("Yes", True), ("off", False)])
    def test_from_env(self, text: str, value: bool) -> None:
        """``MCPGUARD_AUDIT_OTEL_LOGS`` takes the usual spellings of a switch."""
        env = {"MCPGUARD_AUDIT_OTEL_LOGS": text, "MCPGUARD_OTLP_ENDPOINT": COLLECTOR}
        assert load(env=env, upstream=UPSTREAM).audit_otel_logs is value

    def test_env_beats_toml(self, tmp_path: Path) -> None:
        """The environment switches off what the file switched on."""
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\naudit_otel_logs = true\n')
        assert load(config_file=config, env={"MCPGUARD_AUDIT_OTEL_LOGS": "false"}).audit_otel_logs is False

    def test_not_a_switch(self, tmp_path: Path) -> None:
        """A string in the file or an unknown word in the environment is a problem named by its source."""
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\naudit_otel_logs = "true"\n')
        assert problems_of(config_file=config) == [f"{config}: audit_otel_logs: expected true or false"]
        env = {"MCPGUARD_AUDIT_OTEL_LOGS": "maybe"}
        assert problems_of(env=env, upstream=UPSTREAM) == ["MCPGUARD_AUDIT_OTEL_LOGS: expected true or false"]

    def test_needs_a_collector_reported_with_every_other_problem(self) -> None:
        """Logs without an otlp_endpoint are one problem among the others, all reported at once."""
        env = {"MCPGUARD_AUDIT_OTEL_LOGS": "true", "MCPGUARD_RATE_LIMIT_PER_MIN": "0"}
        problems = problems_of(env=env, upstream=UPSTREAM, audit="mysql://db/audit")
        assert problems == [
            "--audit: must be sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE",
            f"MCPGUARD_AUDIT_OTEL_LOGS: {NEEDS_ENDPOINT}",
            "MCPGUARD_RATE_LIMIT_PER_MIN: must be at least 1",
        ]

    @pytest.mark.parametrize(
        "endpoint",
        ["collector:4318", "ftp://collector", "http://user:hunter2@collector:4318", "http://collector?key=hunter2"],
    )
    def test_bad_endpoint_is_never_quoted(self, endpoint: str) -> None:
        """An endpoint that is not a plain http(s) URL is refused without repeating it."""
        problems = problems_of(env={"MCPGUARD_OTLP_ENDPOINT": endpoint}, upstream=UPSTREAM)
        assert problems == [f"MCPGUARD_OTLP_ENDPOINT: {BAD_ENDPOINT}"]

    def test_missing_collector_is_moot_when_the_endpoint_is_broken(self, tmp_path: Path) -> None:
        """An endpoint of the wrong type is reported once, not again as a missing collector."""
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\naudit_otel_logs = true\notlp_endpoint = 4318\n')
        assert problems_of(config_file=config) == [f"{config}: otlp_endpoint: expected a string"]

    def test_direct_construction_is_checked_too(self) -> None:
        """Settings built without the loader are checked the same way."""
        with pytest.raises(SettingsError) as info:
            SidecarSettings(upstream=UPSTREAM, audit_otel_logs=True)
        assert info.value.problems == [f"audit_otel_logs: {NEEDS_ENDPOINT}"]

    def test_endpoint_without_the_otlp_extra_fails_at_startup(self) -> None:
        """A collector configured without the otlp extra installed stops the sidecar, naming the extra."""
        skip_if_otlp_installed()
        settings = load(upstream=UPSTREAM, state="memory://", otlp_endpoint=COLLECTOR, audit_otel_logs=True)
        with pytest.raises(ConfigError, match=r"mcpguard\[otlp\]"):
            sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"})


@contextmanager
def sidecar(audit_otel_logs: bool) -> Iterator[tuple[str, str, InMemoryLogRecordExporter, InMemorySpanExporter]]:
    """A sidecar from settings, exporting to in-memory telemetry; yields its URL, a key, the logs and spans."""
    logs, spans = InMemoryLogRecordExporter(), InMemorySpanExporter()
    logger_provider = LoggerProvider(shutdown_on_exit=False)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = Telemetry(tracer_provider=tracer_provider, logger_provider=logger_provider)
    with serve(RecordingApp()) as upstream:
        port = free_port()
        settings = load(
            upstream=upstream + "/mcp",
            listen=f"127.0.0.1:{port}",
            state="memory://",
            otlp_endpoint=COLLECTOR,
            audit_otel_logs=audit_otel_logs,
        )
        app = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"}, telemetry=telemetry)
        key = make_keys(app.store, {"acme": ("acme", ["mcp:read"])})["acme"]
        with serve(app, port) as url:
            yield url, key, logs, spans
    tracer_provider.shutdown()
    logger_provider.shutdown()


def ping(url: str, key: str) -> None:
    response = httpx.post(
        url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200


def test_sidecar_exports_each_audit_entry_of_a_call() -> None:
    """With audit_otel_logs on, a forwarded call through the sidecar is two records, its start and its end."""
    with sidecar(audit_otel_logs=True) as (url, key, logs, spans):
        ping(url, key)
        deadline = time.monotonic() + 5
        while len(logs.get_finished_logs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        records = logs.get_finished_logs()
        phases = sorted(str((r.log_record.attributes or {})["mcpguard.audit.phase"]) for r in records)
        assert phases == ["end", "start"]
        assert {r.log_record.trace_id for r in records} == {s.context.trace_id for s in spans.get_finished_spans()}


def test_sidecar_without_audit_otel_logs_exports_spans_only() -> None:
    """With a collector but audit_otel_logs off, calls make spans and no audit record is exported."""
    with sidecar(audit_otel_logs=False) as (url, key, logs, spans):
        ping(url, key)
        deadline = time.monotonic() + 5
        while not spans.get_finished_spans() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spans.get_finished_spans()
        assert logs.get_finished_logs() == ()
