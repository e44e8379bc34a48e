"""What a store must be able to do, as small capability protocols, and the records it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

__all__ = ["KeyRecord", "KeyStore", "Store"]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """One MCP key as stored: its argon2id hash, never the key itself."""

    key_id: str
    tenant: str
    name: str | None
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def __repr__(self) -> str:
        # The hash is not the key, but it is still offline-attack material: keep it out of logs.
        return (
            f"KeyRecord(key_id={self.key_id!r}, tenant={self.tenant!r}, name={self.name!r}, "
            f"scopes={self.scopes!r}, created_at={self.created_at!r}, expires_at={self.expires_at!r}, "
            f"revoked_at={self.revoked_at!r})"
        )


@runtime_checkable
class KeyStore(Protocol):
    """Keeps MCP key records; every method is one atomic store operation."""

    async def add_key(self, record: KeyRecord) -> None:
        """Insert a new key record; an existing ``key_id`` is an error."""

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The record for ``key_id`` (revoked or not), or ``None``."""

    async def list_keys(self, tenant: str) -> list[KeyRecord]:
        """Every key record of ``tenant``, oldest first."""

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        """Mark the key revoked at ``at`` (kept if already revoked); the record after, or ``None``."""


@runtime_checkable
class Store(KeyStore, Protocol):
    """A backend opened from a URL; it offers the capability protocols above."""

    url: str

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
