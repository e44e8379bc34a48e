"""An audit entry cannot be changed once made, and has no field that could carry a body."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mcpguard import AuditEvent


def test_an_entry_cannot_be_changed_or_given_new_fields() -> None:
    """Neither a field nor a new attribute can be set on an entry after it is made."""
    event = AuditEvent(id="01", at=datetime.now(UTC), phase="start", tenant="acme")
    with pytest.raises(AttributeError):
        event.tenant = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        event.arguments = {"secret": 1}  # type: ignore[attr-defined]
    assert event.tenant == "acme"


def test_no_field_could_hold_arguments_or_results() -> None:
    """The entry's fields are the call's facts only; a name that suggests a body would be a regression."""
    suspicious = {"arguments", "params", "result", "body", "content", "payload", "request", "response"}
    assert not suspicious & set(AuditEvent._fields)
    assert {"tenant", "subject", "tool", "status", "duration_ms"} <= set(AuditEvent._fields)
