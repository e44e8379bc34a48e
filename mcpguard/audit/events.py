"""What the audit trail records about a call: who, which tenant, what method and tool, how it ended.

``AuditEvent`` has no field that could hold a request's arguments or a tool's results: the trail is
body-free by type. A forwarded call is two entries, its start (written before the call leaves) and its
end (naming the start); a call the guard answered itself is one ``local`` entry. Nothing is updated.

A read of the audit trail that the guard answered with calls names the tenant whose trail it read in
``read_tenant`` (``ALL_TENANTS`` for an operator's read of every tenant): the query string that chose it is
never kept, and that tenant's reviewers find the entry in their own trail.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from typing import Literal, NamedTuple, overload

__all__ = ["ALL_TENANTS", "NAME_LIMIT", "AuditEvent", "Decision", "Phase", "bounded", "new_event_id", "reason_for"]

Phase = Literal["start", "end", "local"]
Decision = Literal["allowed", "denied"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every pair of digits, so an id is 13 lookups of 10 bits rather than 26 of 5.
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
USER_AGENT_LIMIT = 256
# What the client names (JSON-RPC method, tool, path) is kept to this many characters, a cut one ending in "…":
# the trail records which call was made, not whatever a client chose to send in a name.
NAME_LIMIT = 256
# ``read_tenant`` of an operator's read of every tenant's trail; never a tenant name (see ``is_tenant_name``).
ALL_TENANTS = "*"


@overload
def bounded(text: str) -> str: ...
@overload
def bounded(text: None) -> None: ...
def bounded(text: str | None) -> str | None:
    """``text`` cut to ``NAME_LIMIT`` characters, its last one "…" when something was cut."""
    if text is None or len(text) <= NAME_LIMIT:
        return text
    return text[: NAME_LIMIT - 1] + "…"


# The refusal's wire code, reduced to the reasons a reviewer filters by.
_REASONS = {
    "unauthorized": "auth",
    "invalid_token": "auth",
    "insufficient_scope": "scope",
    "rate_limited": "rate",
    "tenant_mismatch": "tenant",
    "session_not_found": "session",
    "origin_not_allowed": "origin",
    "misdirected_request": "origin",
    "invalid_request": "invalid",
    "request_too_large": "invalid",
    "method_not_allowed": "invalid",
    "temporarily_unavailable": "unavailable",
    "bad_gateway": "upstream",
    "gateway_timeout": "upstream",
    # The authorization server's own codes (RFC 6749 §5.2, RFC 7591, RFC 8707).
    "invalid_client": "auth",
    "invalid_grant": "auth",
    "invalid_scope": "scope",
    "invalid_target": "invalid",
    "unsupported_grant_type": "invalid",
    "invalid_redirect_uri": "invalid",
    "invalid_client_metadata": "invalid",
}


def reason_for(error_code: str, named: str | None = None) -> str:
    """The audit reason for a refusal's wire code, unless the refusal ``named`` one of its own."""
    return named or _REASONS.get(error_code, "policy")


def new_event_id(now: float | None = None) -> str:
    """A 26-character id that sorts by time (48-bit milliseconds, then 80 random bits), like a ULID."""
    millis = int((time.time() if now is None else now) * 1000)
    # Ids only need to be unique, not unguessable: the module's generator (reseeded in a forked child) spares a
    # system call per entry. 26 digits of 5 bits are 130 bits: two zero bits, the milliseconds, the random bits,
    # written as 13 pairs of digits from two halves small enough for cheap arithmetic.
    high = (millis << 10) | random.getrandbits(10)  # digits 1-12: zero bits, milliseconds, 10 random bits
    low = random.getrandbits(70)  # digits 13-26
    p = _PAIRS
    return "".join(
        (
            p[high >> 50],
            p[high >> 40 & 1023],
            p[high >> 30 & 1023],
            p[high >> 20 & 1023],
            p[high >> 10 & 1023],
            p[high & 1023],
            p[low >> 60],
            p[low >> 50 & 1023],
            p[low >> 40 & 1023],
            p[low >> 30 & 1023],
            p[low >> 20 & 1023],
            p[low >> 10 & 1023],
            p[low & 1023],
        )
    )


class AuditEvent(NamedTuple):
    """One entry of the audit trail; there is deliberately nowhere to put arguments or results.

    Immutable, and a tuple in column order: two are made for every forwarded call, and a tuple is made in
    a third of the time a frozen dataclass takes.
    """

    id: str
    at: datetime
    phase: Phase
    start_id: str | None = None
    tenant: str | None = None
    subject: str | None = None
    credential_id: str | None = None
    client_id: str | None = None
    session: str | None = None
    rpc_method: str | None = None
    tool: str | None = None
    http_method: str = ""
    path: str = ""
    status: int | None = None
    rpc_error: int | None = None
    tool_error: bool | None = None
    decision: Decision | None = None
    reason: str | None = None
    duration_ms: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    trace_id: str | None = None
    user_agent: str | None = None
    read_tenant: str | None = None

    @staticmethod
    def now() -> datetime:
        """The current time, as events record it (UTC)."""
        return datetime.now(UTC)
