"""Stores chosen by URL, as ``limits`` does it: the scheme picks the backend, which parses the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from mcpguard.stores.base import (
    ClientRecord,
    ClientStore,
    CodeConsumption,
    CodeOutcome,
    CodeRecord,
    CodeStore,
    GrantRecord,
    GrantStore,
    KeyRecord,
    KeyStore,
    Rotation,
    RotationOutcome,
    Store,
    UserRecord,
    UserStore,
)
from mcpguard.stores.memory import MemoryStore
from mcpguard.stores.refresh_families import MAX_GRACE
from mcpguard.stores.sqlite import SQLiteStore

__all__ = [
    "ClientRecord",
    "ClientStore",
    "CodeConsumption",
    "CodeOutcome",
    "CodeRecord",
    "CodeStore",
    "GrantRecord",
    "GrantStore",
    "KeyRecord",
    "KeyStore",
    "MAX_GRACE",
    "MemoryStore",
    "Rotation",
    "RotationOutcome",
    "SQLiteStore",
    "Store",
    "UserRecord",
    "UserStore",
    "open_store",
]

# One entry per backend, each a factory taking the whole URL; Redis and PostgreSQL plug in here.
_BACKENDS: Mapping[str, Callable[[str], Store]] = {
    "memory": MemoryStore.from_url,
    "sqlite": SQLiteStore.from_url,
}
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def open_store(url: str) -> Store:
    """Open the store ``url`` names, e.g. ``memory://`` or ``sqlite:///state/mcpguard.db``."""
    # Only the scheme is ever repeated back: the rest of a URL may hold a password.
    match = _URL_SCHEME.match(url)
    factory = _BACKENDS.get(match[1].lower()) if match else None
    if factory is None:
        known = ", ".join(f"{scheme}://" for scheme in _BACKENDS)
        named = f" {match[1]!r}" if match else ""
        raise ValueError(f"unsupported store URL scheme{named}: expected one of {known}")
    return factory(url)
