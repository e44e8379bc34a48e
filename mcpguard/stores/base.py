"""What a store must be able to do, as small capability protocols, and the records it keeps."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

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
    "Rotation",
    "RotationOutcome",
    "Store",
    "UserRecord",
    "UserStore",
]


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


# Hashes below are left out of every repr: a hash of a guessable secret is offline-attack material.


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRecord:
    """A registered OAuth client: its RFC 7591 metadata as JSON text, and the SHA-256 of its secret if it has one."""

    client_id: str
    client_secret_hash: str | None = field(repr=False)
    metadata: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeRecord:
    """An authorization code, kept by the SHA-256 of the code, with everything the exchange must check."""

    code_hash: str = field(repr=False)
    grant_id: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    resource: str
    scopes: tuple[str, ...]
    tenant: str
    subject: str
    created_at: datetime
    expires_at: datetime
    consumed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantRecord:
    """A grant and its refresh-token family; ``expires_at`` ends the family, ``generation`` counts rotations."""

    grant_id: str
    tenant: str
    subject: str
    client_id: str
    scopes: tuple[str, ...]
    resource: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None
    revoked_reason: str | None = None
    generation: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    """A local user who signs in with a password (argon2id hash), a member of one or more tenants."""

    user_id: str
    email: str
    password_hash: str = field(repr=False)
    tenants: tuple[str, ...]
    scopes: tuple[str, ...]
    created_at: datetime
    disabled_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ValueError("a user belongs to at least one tenant")


class CodeOutcome(enum.Enum):
    """What consuming an authorization code found."""

    FRESH = "fresh"
    """Never used and in time: now consumed, and the caller may exchange it."""
    REPLAYED = "replayed"
    """Exchanged before: the caller revokes the grant it created."""
    EXPIRED = "expired"
    """Too late: burnt without ever being exchanged."""
    UNKNOWN = "unknown"
    """No such code."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeConsumption:
    """The outcome of ``consume_code`` and the code as it is afterwards (``None`` when unknown)."""

    outcome: CodeOutcome
    record: CodeRecord | None


class RotationOutcome(enum.Enum):
    """What presenting a refresh token did to its family."""

    ROTATED = "rotated"
    """It was the live token: the new token replaces it."""
    GRACE_REISSUED = "grace_reissued"
    """It was the token just rotated, within the grace window: the new token replaces its successor."""
    REUSE_REVOKED = "reuse_revoked"
    """It was an older token of the family: the whole family is now revoked."""
    REVOKED = "revoked"
    """The family was already revoked; nothing changed."""
    EXPIRED = "expired"
    """The family has ended; nothing changed."""
    UNKNOWN = "unknown"
    """No family ever issued this token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotation:
    """The outcome of ``rotate_refresh`` and the grant as it is afterwards (``None`` when unknown)."""

    outcome: RotationOutcome
    grant: GrantRecord | None


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
class ClientStore(Protocol):
    """Keeps registered OAuth clients; every method is one atomic store operation."""

    async def add_client(self, record: ClientRecord) -> None:
        """Insert a new client; an existing ``client_id`` is a ``ValueError``."""

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """The client ``client_id`` names, or ``None``."""


@runtime_checkable
class CodeStore(Protocol):
    """Keeps authorization codes, and the consent tickets they are issued for, by hash; using either is one
    atomic operation."""

    async def add_code(self, record: CodeRecord) -> None:
        """Insert a new code; an existing ``code_hash`` is a ``ValueError``."""

    async def consume_code(self, code_hash: str, at: datetime) -> CodeConsumption:
        """Use the code once: of any number of concurrent calls for one code, exactly one is ``FRESH``."""

    async def spend_ticket(self, ticket_hash: str, expires_at: datetime, at: datetime) -> bool:
        """Use a consent ticket once: of any number of concurrent calls for one ticket before ``expires_at``,
        exactly one is ``True``; at or after it every call is ``False``, and the ticket may be forgotten."""


@runtime_checkable
class GrantStore(Protocol):
    """Keeps grants and their refresh-token families; a rotation is one atomic compare-and-swap."""

    async def add_grant(self, grant: GrantRecord, refresh_hash: str) -> None:
        """Create the grant's family, ``refresh_hash`` its live token; a known id or hash is a ``ValueError``."""

    async def get_grant(self, grant_id: str) -> GrantRecord | None:
        """The grant ``grant_id`` names (revoked or not), or ``None``; cheap enough for every request."""

    async def rotate_refresh(self, presented_hash: str, new_hash: str, at: datetime, grace: timedelta) -> Rotation:
        """Replace the presented token by ``new_hash`` if it is live, or revoke its family on reuse.

        ``grace`` (0 to 60 s, else ``ValueError``) lets the token rotated last be presented again for that
        long after its rotation; a family never has more than one live token.
        """

    async def revoke_grant(self, grant_id: str, at: datetime, reason: str) -> GrantRecord | None:
        """Revoke the grant and its family (the first revocation's time and reason are kept); ``None`` if unknown."""

    async def grant_for_refresh(self, presented_hash: str) -> GrantRecord | None:
        """The grant whose family ever issued this refresh token (live or not), or ``None``."""

    async def list_grants(self, tenant: str) -> list[GrantRecord]:
        """Every grant of ``tenant``, oldest first."""


@runtime_checkable
class UserStore(Protocol):
    """Keeps local users; emails are unique whatever their case, and stored lower-cased."""

    async def add_user(self, record: UserRecord) -> None:
        """Insert a new user; an existing ``user_id`` or email (in any case) is a ``ValueError``."""

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user ``user_id`` names, or ``None``."""

    async def get_user_by_email(self, email: str) -> UserRecord | None:
        """The user with this email, compared case-insensitively, or ``None``."""

    async def set_user_password(self, user_id: str, password_hash: str) -> UserRecord | None:
        """Replace the user's password hash; the record after, or ``None`` if unknown."""

    async def list_users(self, tenant: str | None = None) -> list[UserRecord]:
        """Every user, or every member of ``tenant``, oldest first."""

    async def disable_user(self, user_id: str, at: datetime) -> UserRecord | None:
        """Mark the user disabled at ``at`` (kept if already disabled); the record after, or ``None`` if unknown."""


@runtime_checkable
class Store(KeyStore, ClientStore, CodeStore, GrantStore, UserStore, Protocol):
    """A backend opened from a URL; it offers the capability protocols above."""

    url: str

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
