"""The body-free audit trail: events, the recording layers, the query API and its stores."""

from __future__ import annotations

from mcpguard.audit.api import TOOL_CALLS_PATH, AuditAPI
from mcpguard.audit.events import ALL_TENANTS, AuditEvent, new_event_id
from mcpguard.audit.postgres_store import PostgresAuditStore
from mcpguard.audit.query import AuditPage, AuditQuery, parse_query
from mcpguard.audit.recorder import AuditGate, AuditLayer, AuditStore
from mcpguard.audit.sqlite_store import SQLiteAuditStore
from mcpguard.audit.stores import open_audit_store

__all__ = [
    "ALL_TENANTS",
    "TOOL_CALLS_PATH",
    "AuditAPI",
    "AuditEvent",
    "AuditGate",
    "AuditLayer",
    "AuditPage",
    "AuditQuery",
    "AuditStore",
    "PostgresAuditStore",
    "SQLiteAuditStore",
    "new_event_id",
    "open_audit_store",
    "parse_query",
]
