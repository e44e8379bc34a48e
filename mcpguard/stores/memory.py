"""A store in this process's memory: for tests, and for a single process that may forget on restart."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from mcpguard.stores.base import KeyRecord

__all__ = ["MemoryStore"]

_URL = "memory://"


class MemoryStore:
    """Every record in a dict; each method completes without yielding, so each is atomic."""

    def __init__(self) -> None:
        self.url = _URL
        self._keys: dict[str, KeyRecord] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Open ``memory://``; the URL takes no host, path or options."""
        if url != _URL:
            raise ValueError(f"a memory store URL is exactly {_URL}")
        return cls()

    async def add_key(self, record: KeyRecord) -> None:
        """Insert a new key record; an existing ``key_id`` is a ``ValueError``."""
        if record.key_id in self._keys:
            raise ValueError(f"key id {record.key_id!r} already exists")
        self._keys[record.key_id] = record

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The record for ``key_id`` (revoked or not), or ``None``."""
        return self._keys.get(key_id)

    async def list_keys(self, tenant: str) -> list[KeyRecord]:
        """Every key record of ``tenant``, oldest first."""
        return sorted((r for r in self._keys.values() if r.tenant == tenant), key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        """Mark the key revoked at ``at`` (kept if already revoked); the record after, or ``None``."""
        record = self._keys.get(key_id)
        if record is None or record.revoked_at is not None:
            return record
        record = self._keys[key_id] = replace(record, revoked_at=at)
        return record

    async def close(self) -> None:
        """Forget every record."""
        self._keys.clear()
