"""MCP keys as a service: issued once and stored as an argon2id hash, verified with a short cache, revoked.

argon2 is the price of a stolen store being useless, so a successful verification is remembered under a
keyed hash (BLAKE2b, RFC 7693) of the key for a short while; the record itself is read on every call,
so revocation and expiry still take effect on the next request.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import NamedTuple

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

from mcpguard.errors import InvalidToken
from mcpguard.keys import generate_key, parse_key
from mcpguard.principal import TENANT_RULE, CredentialKind, Principal, is_tenant_name
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE
from mcpguard.stores.base import KeyRecord, KeyStore

__all__ = ["KeyRing"]

_log = logging.getLogger(__name__)

_KNOWN_SCOPES = (READ, WRITE, ADMIN, AUDIT)
# Printable ASCII only: the name becomes the subject, which travels to the upstream in a header.
_NAME = re.compile(r"[ -~]{1,128}")


class _Verified(NamedTuple):
    key_id: str
    until: float


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _checked_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        raise ValueError("scopes must be a collection of scope names, not one string")
    granted = tuple(dict.fromkeys(scopes))
    unknown = [scope for scope in granted if scope not in _KNOWN_SCOPES]
    if unknown:
        raise ValueError(f"unknown scopes {', '.join(unknown)}; known scopes are {', '.join(_KNOWN_SCOPES)}")
    if not granted:
        raise ValueError("a key needs at least one scope")
    return granted


class KeyRing:
    """Creates, verifies, lists and revokes MCP keys held in a ``KeyStore``."""

    def __init__(
        self,
        *,
        store: KeyStore,
        hasher: argon2.PasswordHasher | None = None,
        cache_ttl: float = 300.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utcnow,
        max_workers: int = 2,
    ) -> None:
        self._store = store
        self._hasher = hasher if hasher is not None else argon2.PasswordHasher()
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        self._now = now
        # Bounded so that argon2 work queues up instead of taking every core.
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mcpguard-argon2")
        # Cache entries are keyed by a keyed hash under a secret that never leaves this object, so the cache
        # holds nothing that could be checked against a guessed key.
        self._cache_secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[bool]] = {}
        self._dummy_hash: str | None = None

    async def create(
        self,
        *,
        tenant: str,
        scopes: Iterable[str] = (READ, WRITE),
        name: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key of ``tenant`` as ``(key, record)``: the key is returned here once and never stored."""
        granted = _checked_scopes(scopes)
        if not is_tenant_name(tenant):
            raise ValueError(TENANT_RULE)
        if name is not None and not _NAME.fullmatch(name):
            raise ValueError("a key name is 1 to 128 printable ASCII characters")
        created_at = self._now()
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise ValueError("expires_at must carry a time zone")
            if expires_at <= created_at:
                raise ValueError("expires_at must be in the future")
        key_id, key = generate_key()
        secret_hash = await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, key)
        record = KeyRecord(
            key_id=key_id,
            tenant=tenant,
            name=name,
            scopes=granted,
            secret_hash=secret_hash,
            created_at=created_at,
            expires_at=expires_at,
        )
        await self._store.add_key(record)
        _log.info("created key %s for tenant %s with scopes %s", key_id, tenant, " ".join(granted))
        return key, record

    def _digest(self, presented: str) -> bytes:
        # BLAKE2b with a key is a MAC of its own, and cheaper per call than OpenSSL's HMAC setup.
        return hashlib.blake2b(
            presented.encode(errors="surrogatepass"), key=self._cache_secret, digest_size=32
        ).digest()

    def remembers(self, presented: str) -> bool:
        """Whether ``presented`` is this very key verified a short while ago, so checking it again runs no argon2.

        Only the exact key string matches: a guess never does, however close. The record is still read and
        checked by ``verify``.
        """
        return self._cached_id(self._digest(presented)) is not None

    async def verify(self, presented: str) -> Principal:
        """The principal ``presented`` proves, or ``InvalidToken``; a store failure propagates (fail closed)."""
        digest = self._digest(presented)
        # A cached digest is this very key, already parsed and verified: its id is known without parsing again.
        cached_id = self._cached_id(digest)
        key_id = cached_id if cached_id is not None else parse_key(presented)[0]
        record = await self._store.get_key(key_id)
        if record is None:
            # As costly as a real check, so that timing does not tell which key ids exist.
            await asyncio.get_running_loop().run_in_executor(self._pool, self._dummy_verify, presented)
            raise self._refusal(key_id, "invalid key")
        if record.revoked_at is not None:
            raise self._refusal(key_id, "key revoked")
        if record.expires_at is not None and record.expires_at <= self._now():
            raise self._refusal(key_id, "key expired")
        if cached_id is None:
            if not await self._verify_once(digest, record.secret_hash, presented):
                raise self._refusal(key_id, "invalid key")
            self._remember(digest, key_id)
        return Principal(
            tenant=record.tenant,
            subject=f"key:{record.name or record.key_id}",
            credential_id=record.key_id,
            client_id=record.key_id,
            scopes=frozenset(record.scopes),
            kind=CredentialKind.KEY,
        )

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke ``key_id`` from now on (an earlier revocation stands); the record after, or ``None``."""
        record = await self._store.revoke_key(key_id, self._now())
        for digest in [digest for digest, entry in self._cache.items() if entry.key_id == key_id]:
            del self._cache[digest]
        if record is not None:
            _log.info("revoked key %s of tenant %s", key_id, record.tenant)
        return record

    async def list(self, tenant: str) -> builtins.list[KeyRecord]:
        """Every key of ``tenant``, revoked and expired ones included, oldest first."""
        return await self._store.list_keys(tenant)

    async def aclose(self) -> None:
        """Stop the argon2 threads; the store belongs to the caller and stays open."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _refusal(self, key_id: str, reason: str) -> InvalidToken:
        _log.debug("refused key %s: %s", key_id, reason)
        return InvalidToken(reason)

    def _cached_id(self, digest: bytes) -> str | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if entry.until > self._clock():
            return entry.key_id
        del self._cache[digest]
        return None

    def _remember(self, digest: bytes, key_id: str) -> None:
        self._cache[digest] = _Verified(key_id, self._clock() + self._cache_ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _verify_once(self, digest: bytes, secret_hash: str, presented: str) -> bool:
        # Concurrent first requests with the same key share one argon2 run instead of queueing one each.
        pending = self._in_flight.get(digest)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._pool, self._check, secret_hash, presented)
            self._in_flight[digest] = pending
            pending.add_done_callback(lambda _: self._in_flight.pop(digest, None))
        # Shielded: one waiter giving up must not cancel the check the others wait for.
        return await asyncio.shield(pending)

    def _check(self, secret_hash: str, presented: str) -> bool:
        try:
            return self._hasher.verify(secret_hash, presented)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy_verify(self, presented: str) -> None:
        if self._dummy_hash is None:
            # Made by the same hasher, so it costs what a real verification costs.
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(32))
        self._check(self._dummy_hash, presented)
