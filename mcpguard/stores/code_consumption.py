"""How presenting an authorization code changes it (single use, RFC 6749 §4.1.2), apart from any backend."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from mcpguard.stores.base import CodeConsumption, CodeOutcome, CodeRecord

__all__ = ["consume"]


def consume(record: CodeRecord, at: datetime) -> CodeConsumption:
    """The outcome of presenting ``record``'s code at ``at``, with the record as the store must keep it after.

    A code is exchanged at most once. Presented again it is a replay, unless it was only ever burnt for
    being late: that one was never exchanged, so there is nothing to revoke and it stays ``EXPIRED``.
    """
    exchanged = record.consumed_at is not None and record.consumed_at < record.expires_at
    if exchanged:
        return CodeConsumption(outcome=CodeOutcome.REPLAYED, record=record)
    if at >= record.expires_at:
        burnt = record if record.consumed_at is not None else replace(record, consumed_at=at)
        return CodeConsumption(outcome=CodeOutcome.EXPIRED, record=burnt)
    return CodeConsumption(outcome=CodeOutcome.FRESH, record=replace(record, consumed_at=at))
