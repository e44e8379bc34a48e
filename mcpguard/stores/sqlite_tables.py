"""What every group of SQLite tables shares: column conversions, the write transaction, and the store's connections."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Protocol, TypeVar, overload

__all__ = ["Connections", "from_json_list", "from_timestamp", "immediate", "json_list", "timestamp", "words"]

_T = TypeVar("_T")


class Connections(Protocol):
    """The store's connections as its tables use them: writes and scans on one thread, hot reads in place."""

    async def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``operation`` on the writer thread's connection."""
        ...

    async def _read(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``operation`` on this thread's read-only connection, without a thread hop."""
        ...


@overload
def timestamp(value: datetime) -> str: ...
@overload
def timestamp(value: None) -> None: ...
def timestamp(value: datetime | None) -> str | None:
    """Fixed-width UTC text, so that ORDER BY on the column is chronological."""
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


@overload
def from_timestamp(value: str) -> datetime: ...
@overload
def from_timestamp(value: None) -> None: ...
def from_timestamp(value: str | None) -> datetime | None:
    """The datetime :func:`timestamp` wrote."""
    return None if value is None else datetime.fromisoformat(value)


def words(values: tuple[str, ...]) -> str:
    """Space-separated, as OAuth writes scopes (RFC 6749 §3.3: a scope never holds a space)."""
    return " ".join(values)


def json_list(values: tuple[str, ...]) -> str:
    """A JSON array, for values that may hold any character, such as tenant names."""
    return json.dumps(list(values), separators=(",", ":"))


def from_json_list(value: str) -> tuple[str, ...]:
    """The values :func:`json_list` wrote."""
    return tuple(json.loads(value))


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, locked from its first statement, so a read inside it cannot go stale."""
    # IMMEDIATE takes the write lock at BEGIN: another process cannot change what this one read before it writes.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
