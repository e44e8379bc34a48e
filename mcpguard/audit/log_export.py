"""Audit events exported as OpenTelemetry log records, for a SIEM: one record per entry the trail keeps.

A record's attributes are the ``AuditEvent``'s own fields and nothing else, so the export is as body-free
as the trail. The store stays authoritative: a record is emitted only once the store has taken the entry,
and a failing export never fails or slows the append (the SDK's batch processor exports off the request).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry._logs import Logger, LoggerProvider, SeverityNumber, get_logger
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery
from mcpguard.audit.recorder import AuditStore

__all__ = ["AUDIT_EVENT_NAME", "ExportingAuditStore"]

logger = logging.getLogger("mcpguard.audit")

AUDIT_EVENT_NAME = "mcpguard.audit"
_ATTRIBUTE_PREFIX = "mcpguard.audit."
_INSTRUMENTATION = "mcpguard"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIELDS = AuditEvent._fields


class ExportingAuditStore:
    """An ``AuditStore`` that forwards every call to ``store`` and exports each entry it takes as a log record.

    Records go to ``logger_provider`` (the global OpenTelemetry one when ``None``); a denied call is WARN,
    anything else INFO, and a record is in the trace the entry names, under the guard's span when it is current.
    """

    def __init__(self, store: AuditStore, *, logger_provider: LoggerProvider | None = None) -> None:
        self.store = store
        self._logger: Logger = get_logger(_INSTRUMENTATION, logger_provider=logger_provider)
        self._failing = False

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        """Append to the wrapped store, then export ``event``; only the append can fail the call."""
        await self.store.append(event, durable=durable)
        self._export(event)

    async def query(self, q: AuditQuery) -> AuditPage:
        """The wrapped store's answer."""
        return await self.store.query(q)

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention, in the wrapped store only: exported records are the collector's to keep."""
        return await self.store.delete_before(cutoff)

    async def ping(self) -> None:
        """The wrapped store's readiness; the collector is not a dependency of the trail."""
        await self.store.ping()

    async def close(self) -> None:
        """Close the wrapped store; the logger provider belongs to whoever made it."""
        await self.store.close()

    def _export(self, event: AuditEvent) -> None:
        denied = event.decision == "denied"
        try:
            self._logger.emit(
                timestamp=(event.at - _EPOCH) // timedelta(microseconds=1) * 1000,
                context=_trace_context(event.trace_id),
                severity_number=SeverityNumber.WARN if denied else SeverityNumber.INFO,
                severity_text="WARN" if denied else "INFO",
                attributes=_attributes(event),
                event_name=AUDIT_EVENT_NAME,
            )
        except Exception as exc:  # the entry is already in the trail; the export must not undo the call
            if not self._failing:
                logger.warning("audit entries are not being exported as OpenTelemetry logs (%s)", type(exc).__name__)
                self._failing = True
            return
        if self._failing:
            logger.warning("audit entries are being exported as OpenTelemetry logs again")
            self._failing = False


def _attributes(event: AuditEvent) -> dict[str, AttributeValue]:
    """``event``'s fields as log attributes (``mcpguard.audit.<field>``), leaving out those it does not set."""
    attributes: dict[str, AttributeValue] = {}
    for name in _FIELDS:
        value = getattr(event, name)
        if value is None:
            continue
        attributes[_ATTRIBUTE_PREFIX + name] = value.isoformat() if isinstance(value, datetime) else value
    return attributes


def _trace_context(trace_id: str | None) -> Context | None:
    """The context a record is emitted in: ``None`` (the current one) unless the entry names another trace."""
    if trace_id is None:
        return None
    try:
        wanted = int(trace_id, 16)
    except ValueError:
        return None
    current = trace.get_current_span().get_span_context()
    if wanted == trace.INVALID_TRACE_ID or (current.is_valid and current.trace_id == wanted):
        return None
    # The trail keeps the trace but not the client's span, so the record names the trace alone.
    linked = trace.SpanContext(trace_id=wanted, span_id=trace.INVALID_SPAN_ID, is_remote=True)
    return trace.set_span_in_context(trace.NonRecordingSpan(linked))
