"""A store in this process's memory: for tests, and for a single process that may forget on restart."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from mcpguard.stores.base import (
    ClientRecord,
    CodeConsumption,
    CodeOutcome,
    CodeRecord,
    GrantRecord,
    KeyRecord,
    Rotation,
    RotationOutcome,
    UserRecord,
)
from mcpguard.stores.code_consumption import consume
from mcpguard.stores.refresh_families import Family, check_grace, rotate

__all__ = ["MemoryStore"]

_URL = "memory://"


class MemoryStore:
    """Every record in a dict; each method completes without yielding, so each is atomic within one event loop."""

    def __init__(self) -> None:
        self.url = _URL
        self._keys: dict[str, KeyRecord] = {}
        self._clients: dict[str, ClientRecord] = {}
        self._codes: dict[str, CodeRecord] = {}
        self._tickets: dict[str, datetime] = {}  # spent consent tickets, until they expire
        self._families: dict[str, Family] = {}
        # Every refresh token a family ever issued, so that an old one is recognised as reuse.
        self._refresh_owners: dict[str, str] = {}
        self._users: dict[str, UserRecord] = {}
        self._user_ids_by_email: dict[str, str] = {}

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

    async def add_client(self, record: ClientRecord) -> None:
        """Insert a new client; an existing ``client_id`` is a ``ValueError``."""
        if record.client_id in self._clients:
            raise ValueError(f"client id {record.client_id!r} already exists")
        self._clients[record.client_id] = record

    async def get_client(self, client_id: str) -> ClientRecord | None:
        """The client ``client_id`` names, or ``None``."""
        return self._clients.get(client_id)

    async def add_code(self, record: CodeRecord) -> None:
        """Insert a new code; an existing ``code_hash`` is a ``ValueError``."""
        if record.code_hash in self._codes:
            raise ValueError("this authorization code already exists")
        self._codes[record.code_hash] = record

    async def consume_code(self, code_hash: str, at: datetime) -> CodeConsumption:
        """Use the code once: of any number of concurrent calls for one code, exactly one is ``FRESH``."""
        record = self._codes.get(code_hash)
        if record is None:
            return CodeConsumption(outcome=CodeOutcome.UNKNOWN, record=None)
        consumption = consume(record, at)
        if consumption.record is not None:
            self._codes[code_hash] = consumption.record
        return consumption

    async def spend_ticket(self, ticket_hash: str, expires_at: datetime, at: datetime) -> bool:
        """Use a consent ticket once: of any number of concurrent calls for one ticket before ``expires_at``,
        exactly one is ``True``; at or after it every call is ``False``, and the ticket may be forgotten."""
        if at >= expires_at:
            return False
        # Tickets live minutes and are spent at a person's pace, so a sweep per spend stays small.
        self._tickets = {spent: until for spent, until in self._tickets.items() if until > at}
        if ticket_hash in self._tickets:
            return False
        self._tickets[ticket_hash] = expires_at
        return True

    async def add_grant(self, grant: GrantRecord, refresh_hash: str) -> None:
        """Create the grant's family, ``refresh_hash`` its live token; a known id or hash is a ``ValueError``."""
        if grant.grant_id in self._families:
            raise ValueError(f"grant id {grant.grant_id!r} already exists")
        if refresh_hash in self._refresh_owners:
            raise ValueError("this refresh token was already issued")
        self._families[grant.grant_id] = Family(grant=grant, current_hash=refresh_hash)
        self._refresh_owners[refresh_hash] = grant.grant_id

    async def get_grant(self, grant_id: str) -> GrantRecord | None:
        """The grant ``grant_id`` names (revoked or not), or ``None``."""
        family = self._families.get(grant_id)
        return None if family is None else family.grant

    async def rotate_refresh(self, presented_hash: str, new_hash: str, at: datetime, grace: timedelta) -> Rotation:
        """Replace the presented token by ``new_hash`` if it is live, or revoke its family on reuse."""
        check_grace(grace)
        grant_id = self._refresh_owners.get(presented_hash)
        if grant_id is None:
            return Rotation(outcome=RotationOutcome.UNKNOWN, grant=None)
        if new_hash in self._refresh_owners:
            raise ValueError("this refresh token was already issued")
        outcome, family = rotate(self._families[grant_id], presented_hash, new_hash, at, grace)
        self._families[grant_id] = family
        if outcome in (RotationOutcome.ROTATED, RotationOutcome.GRACE_REISSUED):
            self._refresh_owners[new_hash] = grant_id
        return Rotation(outcome=outcome, grant=family.grant)

    async def revoke_grant(self, grant_id: str, at: datetime, reason: str) -> GrantRecord | None:
        """Revoke the grant and its family (the first revocation's time and reason are kept); ``None`` if unknown."""
        family = self._families.get(grant_id)
        if family is None:
            return None
        if family.grant.revoked_at is None:
            family = self._families[grant_id] = replace(
                family, grant=replace(family.grant, revoked_at=at, revoked_reason=reason)
            )
        return family.grant

    async def grant_for_refresh(self, presented_hash: str) -> GrantRecord | None:
        """The grant whose family ever issued this refresh token (live or not), or ``None``."""
        grant_id = self._refresh_owners.get(presented_hash)
        return None if grant_id is None else self._families[grant_id].grant

    async def list_grants(self, tenant: str) -> list[GrantRecord]:
        """Every grant of ``tenant``, oldest first."""
        grants = (f.grant for f in self._families.values() if f.grant.tenant == tenant)
        return sorted(grants, key=lambda g: g.created_at)

    async def add_user(self, record: UserRecord) -> None:
        """Insert a new user; an existing ``user_id`` or email (in any case) is a ``ValueError``."""
        email = record.email.lower()
        if record.user_id in self._users:
            raise ValueError(f"user id {record.user_id!r} already exists")
        if email in self._user_ids_by_email:
            raise ValueError("a user with this email already exists")
        self._users[record.user_id] = replace(record, email=email)
        self._user_ids_by_email[email] = record.user_id

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user ``user_id`` names, or ``None``."""
        return self._users.get(user_id)

    async def get_user_by_email(self, email: str) -> UserRecord | None:
        """The user with this email, compared case-insensitively, or ``None``."""
        user_id = self._user_ids_by_email.get(email.lower())
        return None if user_id is None else self._users[user_id]

    async def set_user_password(self, user_id: str, password_hash: str) -> UserRecord | None:
        """Replace the user's password hash; the record after, or ``None`` if unknown."""
        record = self._users.get(user_id)
        if record is None:
            return None
        record = self._users[user_id] = replace(record, password_hash=password_hash)
        return record

    async def list_users(self, tenant: str | None = None) -> list[UserRecord]:
        """Every user, or every member of ``tenant``, oldest first."""
        users = (u for u in self._users.values() if tenant is None or tenant in u.tenants)
        return sorted(users, key=lambda u: u.created_at)

    async def disable_user(self, user_id: str, at: datetime) -> UserRecord | None:
        """Mark the user disabled at ``at`` (kept if already disabled); the record after, or ``None`` if unknown."""
        record = self._users.get(user_id)
        if record is None or record.disabled_at is not None:
            return record
        record = self._users[user_id] = replace(record, disabled_at=at)
        return record

    async def close(self) -> None:
        """Forget every record."""
        for table in (
            self._keys,
            self._clients,
            self._codes,
            self._families,
            self._refresh_owners,
            self._users,
            self._user_ids_by_email,
        ):
            table.clear()
