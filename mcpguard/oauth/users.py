"""Who signs in on the consent page: a pluggable ``Authenticator``, and local users with argon2id passwords."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mcpguard.principal import TENANT_RULE, is_tenant_name
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE
from mcpguard.stores.base import UserRecord, UserStore

__all__ = ["Account", "Authenticator", "LocalUsers"]

_KNOWN_SCOPES = frozenset({READ, WRITE, ADMIN, AUDIT})
_MIN_PASSWORD = 12
_SUBJECT = "user:"
_MAX_PASSWORD = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """A signed-in person: the tenants they may bind a grant to and the most they may grant."""

    subject: str
    name: str
    tenants: tuple[str, ...]
    scopes: frozenset[str]


@runtime_checkable
class Authenticator(Protocol):
    """Checks a sign-in; an SSO bridge or a directory can stand in for the local users."""

    async def authenticate(self, username: str, password: str) -> Account | None:
        """The account ``username`` signs in to with ``password``, or ``None`` (never says which part was wrong)."""
        ...

    async def active(self, subject: str, tenant: str) -> bool:
        """Whether the account ``subject`` may still act in ``tenant`` (asked on every code exchange and refresh)."""
        ...


class LocalUsers:
    """Users kept in the store, passwords as argon2id hashes; one or more tenant memberships each."""

    def __init__(
        self,
        store: UserStore,
        *,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._hasher = hasher or PasswordHasher()
        self._clock = clock
        # Verified against when the user is unknown, so a sign-in costs the same whether or not they exist.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    async def add(
        self, *, email: str, password: str, tenants: Iterable[str], scopes: Iterable[str] = (READ,)
    ) -> UserRecord:
        """Create a user; a duplicate email (in any case) is a ``ValueError``."""
        email = email.strip().lower()
        tenant_list = tuple(dict.fromkeys(t.strip() for t in tenants if t.strip()))
        scope_set = tuple(dict.fromkeys(scopes))
        if "@" not in email or len(email) > 320:
            raise ValueError("email must be an address")
        # Listings print the email as it is: a newline or an escape sequence in it would forge or hide their lines.
        if any(c.isspace() or not c.isprintable() for c in email):
            raise ValueError("email must not hold spaces or control characters")
        if not tenant_list:
            raise ValueError("a user needs at least one tenant")
        if not all(map(is_tenant_name, tenant_list)):
            raise ValueError(TENANT_RULE)
        if not scope_set or not set(scope_set) <= _KNOWN_SCOPES:
            raise ValueError(f"scopes must be some of {sorted(_KNOWN_SCOPES)}")
        _check_password(password)
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        record = UserRecord(
            user_id="u_" + secrets.token_urlsafe(9),
            email=email,
            password_hash=password_hash,
            tenants=tenant_list,
            scopes=scope_set,
            created_at=self._clock(),
        )
        await self._store.add_user(record)
        return record

    async def authenticate(self, username: str, password: str) -> Account | None:
        """The user's account when the password is theirs and they are not disabled, else ``None``."""
        if not 0 < len(password) <= _MAX_PASSWORD:
            return None
        user = await self._store.get_user_by_email(username.strip().lower())
        stored = user.password_hash if user is not None and user.disabled_at is None else self._dummy
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled_at is not None:
            return None
        if self._hasher.check_needs_rehash(user.password_hash):
            await self._store.set_user_password(user.user_id, await asyncio.to_thread(self._hasher.hash, password))
        return Account(
            subject=_SUBJECT + user.user_id, name=user.email, tenants=user.tenants, scopes=frozenset(user.scopes)
        )

    async def active(self, subject: str, tenant: str) -> bool:
        """Whether the user behind ``subject`` still exists, is not disabled, and is still in ``tenant``."""
        if not subject.startswith(_SUBJECT):
            return False
        user = await self._store.get_user(subject.removeprefix(_SUBJECT))
        return user is not None and user.disabled_at is None and tenant in user.tenants


def _check_password(password: str) -> None:
    if not _MIN_PASSWORD <= len(password) <= _MAX_PASSWORD:
        raise ValueError(f"a password has {_MIN_PASSWORD} to {_MAX_PASSWORD} characters")
