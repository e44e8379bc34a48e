"""The audit trail's SQL, shared by the SQL stores: the columns, the query for calls and how a row reads back.

Every store asks the same question the same way, so a reviewer gets the same answer whichever database
keeps the trail; a ``Dialect`` says only how a database spells a bound parameter and takes a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mcpguard.audit.events import AuditEvent
from mcpguard.audit.query import AuditPage, AuditQuery, encode_cursor

__all__ = ["COLUMNS", "Dialect", "calls_sql", "delete_sql", "insert_sql", "iso_time", "page_of", "row_of"]

COLUMNS = AuditEvent._fields
# Outcome columns of an end entry that overlay its start when a call is read back.
_OUTCOME = ("status", "rpc_error", "tool_error", "decision", "reason", "duration_ms", "bytes_in", "bytes_out")
_AT = COLUMNS.index("at")


def _utc(at: datetime) -> datetime:
    # Entries are stamped in UTC already; converting costs as much as formatting.
    return at if at.tzinfo is UTC else at.astimezone(UTC)


def iso_time(at: datetime) -> str:
    """``at`` in UTC as ISO 8601 with microseconds: how a call's time reads back, whatever the store."""
    return _utc(at).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one database spells a bound parameter and takes a UTC time."""

    param: str
    time: Callable[[datetime], object]


def insert_sql(dialect: Dialect) -> str:
    """The statement appending one event, its values bound in ``COLUMNS`` order."""
    # Built from the dataclass's own field names only; every value is a bound parameter.
    return f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES ({', '.join(dialect.param for _ in COLUMNS)})"  # noqa: S608


def row_of(event: AuditEvent, dialect: Dialect) -> tuple[Any, ...]:
    """The values ``insert_sql`` binds for ``event``."""
    values: list[Any] = list(event)  # an event is a tuple in column order
    values[_AT] = dialect.time(_utc(event.at))
    return tuple(values)


def delete_sql(dialect: Dialect) -> str:
    """Retention: the statement deleting every entry older than its one parameter."""
    return f"DELETE FROM audit_events WHERE at < {dialect.param}"  # noqa: S608 - fixed text, bound value


def calls_sql(q: AuditQuery, dialect: Dialect) -> tuple[str, list[Any]]:
    """The query for ``q``'s calls, newest first, each start or local entry joined with its end; one row extra.

    A tenant's calls are its own and the reads of its trail by others (an operator's): each found by its own
    index and cut to the page before the two are merged, so a page never sorts the tenant's whole trail.
    """
    p = dialect.param
    # A start that a local entry names is one whose commit failed yet landed: the call was refused, not forwarded.
    where = [
        "s.phase IN ('start', 'local')",
        "(s.phase = 'local' OR NOT EXISTS "
        "(SELECT 1 FROM audit_events x WHERE x.phase = 'local' AND x.start_id = s.id))",
    ]
    args: list[Any] = []
    for column, value in (
        ("s.tool", q.tool),
        ("s.rpc_method", q.method),
        ("s.subject", q.subject),
        ("s.credential_id", q.credential),
        ("COALESCE(e.status, s.status)", q.status),
        ("COALESCE(e.decision, s.decision)", q.decision),
        ("s.id", q.call_id),
    ):
        if value is not None:
            where.append(f"{column} = {p}")
            args.append(value)
    if q.since is not None:
        where.append(f"s.at >= {p}")
        args.append(dialect.time(_utc(q.since)))
    if q.until is not None:
        where.append(f"s.at < {p}")
        args.append(dialect.time(_utc(q.until)))
    if q.before_id is not None:
        where.append(f"s.id < {p}")
        args.append(q.before_id)
    start_cols = ", ".join(f"s.{c}" for c in COLUMNS)
    end_cols = ", ".join(f"e.{c}" for c in _OUTCOME)
    select = (
        f"SELECT {start_cols}, e.id, {end_cols} FROM audit_events s "  # noqa: S608 - fixed column names
        "LEFT JOIN audit_events e ON e.phase = 'end' AND e.start_id = s.id WHERE "
    )
    newest = f" ORDER BY s.id DESC LIMIT {p}"
    rows = q.limit + 1
    # None (operator, all tenants) is the only way round the tenant condition.
    if q.tenant is None:
        return select + " AND ".join(where) + newest, [*args, rows]
    own = select + " AND ".join([f"s.tenant = {p}", *where]) + newest
    # Only the audit API sets read_tenant, to the reader's own tenant or (for an operator) the one it named;
    # the reader's own entries are already in the first part.
    read = select + " AND ".join([f"s.read_tenant = {p}", f"s.tenant <> {p}", *where]) + newest
    sql = f"SELECT * FROM ({own}) own UNION ALL SELECT * FROM ({read}) reads ORDER BY 1 DESC LIMIT {p}"  # noqa: S608 - fixed text
    return sql, [q.tenant, *args, rows, q.tenant, q.tenant, *args, rows, rows]


def page_of(rows: Sequence[Sequence[Any]], q: AuditQuery) -> AuditPage:
    """The page ``calls_sql`` answered: up to ``q.limit`` calls, and a cursor when its extra row came back."""
    calls = [_call_of(row) for row in rows[: q.limit]]
    next_cursor = encode_cursor(calls[-1]["id"]) if len(rows) > q.limit and calls else None
    return AuditPage(calls, next_cursor)


def _call_of(row: Sequence[Any]) -> dict[str, Any]:
    start = dict(zip(COLUMNS, row[: len(COLUMNS)], strict=True))
    end_id = row[len(COLUMNS)]
    outcome = dict(zip(_OUTCOME, row[len(COLUMNS) + 1 :], strict=True))
    call = {k: v for k, v in start.items() if k not in ("phase", "start_id")}
    if isinstance(call["at"], datetime):  # a native timestamp reads back as the text SQLite keeps
        call["at"] = iso_time(call["at"])
    if start["phase"] == "start":
        if end_id is None:
            call["outcome"] = "no_outcome"
        else:
            call.update({name: value for name, value in outcome.items() if value is not None})
            call["outcome"] = "complete"
    else:
        call["outcome"] = "local"
    if call.get("tool_error") is not None:
        call["tool_error"] = bool(call["tool_error"])
    return call
