"""What the operator commands share: where the state store is, and how records are printed."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

from mcpguard import Store, open_store

__all__ = ["DEFAULT_STATE", "iso", "opened_store", "print_table", "scope_list", "state_url"]

DEFAULT_STATE = "./mcpguard.db"


def state_url(args: argparse.Namespace) -> str:
    """``--state``, else ``$MCPGUARD_STATE``, else ``./mcpguard.db``, as a store URL (a bare path is SQLite)."""
    state: str = getattr(args, "state", None) or os.environ.get("MCPGUARD_STATE") or DEFAULT_STATE
    return state if "://" in state else f"sqlite:///{state}"


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


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """``rows`` (the first one the header) as left-aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
