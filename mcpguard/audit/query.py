"""A reviewer's question to the audit trail, checked from query parameters, and the opaque cursor."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mcpguard.errors import InvalidRequest

__all__ = ["DEFAULT_LIMIT", "FILTERS", "MAX_LIMIT", "TENANT_PARAMETER", "AuditPage", "AuditQuery", "parse_query"]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
# The query parameters anyone may send; the OpenAPI document is built from this list.
FILTERS = ("tool", "method", "status", "decision", "subject", "credential", "since", "until", "limit", "cursor")
# Read by the API rather than parsed here, because only an operator credential may send it.
TENANT_PARAMETER = "tenant"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditQuery:
    """Which calls to return, newest first; ``tenant`` is set by the guard from the credential, never the client.

    A tenant's calls are its own and the reads of its trail by others (an operator's, naming it in ``read_tenant``).
    """

    tenant: str | None
    tool: str | None = None
    method: str | None = None
    status: int | None = None
    decision: str | None = None
    subject: str | None = None
    credential: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_LIMIT
    before_id: str | None = None
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of calls (each a start joined with its outcome) and the cursor of the next, if any."""

    calls: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(last_id: str) -> str:
    """The opaque cursor that continues after ``last_id``."""
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("cursor is not one this API issued") from None
    version, _, last_id = text.partition(":")
    if version != "v1" or not _ID.fullmatch(last_id):
        raise InvalidRequest("cursor is not one this API issued")
    return last_id


# ASCII digits only: str.isdigit() also takes "²", which int() refuses.
_DIGITS = re.compile(r"[0-9]{1,9}")


def _time(name: str, value: str, problems: list[str]) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"{name} must be an ISO 8601 time such as 2026-11-22T10:00:00Z")
        return None
    parsed = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    try:
        # Compared in UTC: an offset that carries it past year 1 or 9999 names no time the trail can hold.
        return parsed.astimezone(UTC)
    except OverflowError:
        problems.append(f"{name} is outside the years 1 to 9999 in UTC")
        return None


def parse_query(params: Mapping[str, list[str]], *, tenant: str | None) -> AuditQuery:
    """Check every filter at once; a bad or repeated one is a 400 naming all the problems."""
    problems: list[str] = []
    values: dict[str, str] = {}
    for name, given in params.items():
        if name not in FILTERS and name != TENANT_PARAMETER:
            problems.append(f"unknown filter {name!r}; filters are {', '.join(FILTERS)}")
        elif len(given) != 1:
            problems.append(f"{name} given more than once")
        else:
            values[name] = given[0]
    status: int | None = None
    if "status" in values:
        if _DIGITS.fullmatch(values["status"]) and 100 <= int(values["status"]) <= 599:
            status = int(values["status"])
        else:
            problems.append("status must be an HTTP status code such as 403")
    if values.get("decision") not in (None, "allowed", "denied"):
        problems.append("decision must be allowed or denied")
    limit = DEFAULT_LIMIT
    if "limit" in values:
        if _DIGITS.fullmatch(values["limit"]) and 1 <= int(values["limit"]) <= MAX_LIMIT:
            limit = int(values["limit"])
        else:
            problems.append(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    since = _time("since", values["since"], problems) if "since" in values else None
    until = _time("until", values["until"], problems) if "until" in values else None
    before_id: str | None = None
    if "cursor" in values:
        try:
            before_id = _decode_cursor(values["cursor"])
        except InvalidRequest as exc:
            problems.append(exc.description)
    if problems:
        raise InvalidRequest("; ".join(problems))
    return AuditQuery(
        tenant=tenant,
        tool=values.get("tool"),
        method=values.get("method"),
        status=status,
        decision=values.get("decision"),
        subject=values.get("subject"),
        credential=values.get("credential"),
        since=since,
        until=until,
        limit=limit,
        before_id=before_id,
    )
