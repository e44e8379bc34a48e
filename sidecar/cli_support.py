"""What the operator commands share: where the state and audit stores are, how an operator's revocation is
put in the audit trail, and how records are printed (inert: no value printed can move the cursor or add a line)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from mcpguard import AuditEvent, MCPGuardError, Store, new_event_id, open_audit_store, open_store

__all__ = [
    "DEFAULT_STATE",
    "add_audit_option",
    "audit_url",
    "inert",
    "iso",
    "opened_store",
    "print_table",
    "record_operator_action",
    "scope_list",
    "state_url",
]

DEFAULT_STATE = "./mcpguard.db"


def state_url(args: argparse.Namespace) -> str:
    """``--state``, else ``$MCPGUARD_STATE``, else ``./mcpguard.db``, as a store URL (a bare path is SQLite)."""
    state: str = getattr(args, "state", None) or os.environ.get("MCPGUARD_STATE") or DEFAULT_STATE
    return state if "://" in state else f"sqlite:///{state}"


def add_audit_option(parser: argparse.ArgumentParser) -> None:
    """``--audit``: where the trail is, when it is not in the state file."""
    parser.add_argument(
        "--audit",
        metavar="URL",
        help="audit store: SQLite path or URL, or postgresql://… (default: $MCPGUARD_AUDIT, else the state file)",
    )


def audit_url(args: argparse.Namespace) -> str | None:
    """``--audit``, else ``$MCPGUARD_AUDIT``, else the SQLite state file (as the sidecar finds its trail), else
    ``None`` (no trail to write to)."""
    audit: str | None = getattr(args, "audit", None) or os.environ.get("MCPGUARD_AUDIT")
    if audit:
        return audit if "://" in audit else f"sqlite:///{audit}"
    state = state_url(args)
    return state if state.startswith("sqlite:///") else None


async def record_operator_action(args: argparse.Namespace, action: str, *, tenant: str, credential_id: str) -> bool:
    """Put an operator's revocation in the tenant's audit trail (who ran which command on which credential).

    Returns whether it was recorded; the revocation itself has happened either way, so a failure is reported
    to the operator rather than undone.
    """
    url = audit_url(args)
    if url is None:
        return True
    event = AuditEvent(
        id=new_event_id(),
        at=datetime.now(UTC),
        phase="local",
        tenant=tenant,
        subject=f"operator:{getpass.getuser()}",
        credential_id=credential_id,
        http_method="CLI",
        path=f"mcpguard {action}",
        decision="allowed",
    )
    try:
        store = open_audit_store(url)
        try:
            await store.append(event, durable=True)
        finally:
            await store.close()
    except (MCPGuardError, OSError) as exc:
        print(f"mcpguard: warning: done, but not recorded in the audit trail ({type(exc).__name__})", file=sys.stderr)
        return False
    return True


@asynccontextmanager
async def opened_store(args: argparse.Namespace) -> AsyncIterator[Store]:
    """The state store the command line names, closed afterwards."""
    store = open_store(state_url(args))
    try:
        yield store
    finally:
        await store.close()


def scope_list(text: str) -> list[str]:
    """A comma-separated list of scopes, as ``--scopes`` takes it."""
    return [scope.strip() for scope in text.split(",") if scope.strip()]


def iso(value: datetime | None) -> str | None:
    """A time to the second in ISO 8601, or ``None``."""
    return None if value is None else value.isoformat(timespec="seconds")


def inert(text: str) -> str:
    """``text`` with each backslash and non-printable character (newlines, escapes, bidi controls) backslash-escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """``rows`` (the first one the header) as left-aligned columns, each cell :func:`inert`."""
    rows = [[inert(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
