"""Audit stores chosen by URL, as the other stores are: the scheme picks the backend, which reads the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from mcpguard.audit.postgres_store import PostgresAuditStore
from mcpguard.audit.recorder import AuditStore
from mcpguard.audit.sqlite_store import SQLiteAuditStore

__all__ = ["open_audit_store"]

_SQLITE = "sqlite:///"
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _sqlite(url: str) -> AuditStore:
    path, _, options = url.removeprefix(_SQLITE).partition("?")
    if not url.startswith(_SQLITE) or not path:
        raise ValueError(f"an SQLite audit URL is {_SQLITE}<path> ({_SQLITE}/<path> when absolute)")
    if options not in ("", "synchronous=NORMAL", "synchronous=FULL"):
        raise ValueError("the only SQLite audit URL option is synchronous=NORMAL or synchronous=FULL")
    return SQLiteAuditStore(path, synchronous=options.removeprefix("synchronous=") or "NORMAL")


def _postgres(url: str) -> AuditStore:
    return PostgresAuditStore(url)


_BACKENDS: Mapping[str, Callable[[str], AuditStore]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def open_audit_store(url: str) -> AuditStore:
    """The audit store ``url`` names: ``sqlite:///PATH`` (``:memory:`` allowed) or ``postgresql://…``.

    ``sqlite:///PATH?synchronous=FULL`` syncs every commit, so the trail also survives power loss.

    SQLite opens now; PostgreSQL connects on first use, in the event loop that uses it (or await
    ``PostgresAuditStore.open`` to connect at once).
    """
    # Only the scheme is ever repeated back: the rest of a URL may hold a password.
    match = _URL_SCHEME.match(url)
    factory = _BACKENDS.get(match[1].lower()) if match else None
    if factory is None:
        known = ", ".join(f"{scheme}://" for scheme in _BACKENDS)
        named = f" {match[1]!r}" if match else ""
        raise ValueError(f"unsupported audit store URL scheme{named}: expected one of {known}")
    return factory(url)
