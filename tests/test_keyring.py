"""KeyRing: keys issued once and stored hashed, verified with a cache under a keyed hash, cut off by revocation."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import argon2
import pytest

from mcpguard.errors import InvalidToken, StorageUnavailable
from mcpguard.keyring import KeyRing
from mcpguard.keys import generate_key
from mcpguard.principal import CredentialKind
from mcpguard.stores import open_store
from mcpguard.stores.base import KeyRecord
from mcpguard.stores.memory import MemoryStore
from tests.test_keys import checksummed

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


class CountingHasher(argon2.PasswordHasher):
    """argon2id at whatever cost it is given, counting its verifications and the threads they ran on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verifies = 0
        self.threads: set[int] = set()

    def verify(self, hash: str | bytes, password: str | bytes) -> Any:
        self.verifies += 1
        self.threads.add(threading.get_ident())
        return super().verify(hash, password)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


class Now:
    """A wall clock (UTC) the test moves by hand."""

    def __init__(self) -> None:
        self.value = T0

    def __call__(self) -> datetime:
        return self.value


class SwitchableStore(MemoryStore):
    """A memory store that can be made to fail as an unreachable backend would."""

    down = False

    async def get_key(self, key_id: str) -> KeyRecord | None:
        if self.down:
            raise StorageUnavailable("storage unavailable")
        return await super().get_key(key_id)


@dataclass
class Rig:
    """A KeyRing with every dependency in the test's hands."""

    ring: KeyRing
    store: SwitchableStore
    hasher: CountingHasher
    clock: Clock
    now: Now

    def create(self, **options: Any) -> tuple[str, KeyRecord]:
        """Create a key (tenant acme unless given)."""
        options.setdefault("tenant", "acme")
        return asyncio.run(self.ring.create(**options))

    def verify(self, key: str) -> Any:
        """Verify ``key`` in a fresh event loop, as a request would."""
        return asyncio.run(self.ring.verify(key))


def make_rig(**options: Any) -> Rig:
    """A rig over a memory store with a cheap counting hasher and hand-moved clocks."""
    store, clock, now = SwitchableStore(), Clock(), Now()
    hasher = CountingHasher.from_parameters(argon2.profiles.CHEAPEST)
    ring = KeyRing(store=store, hasher=hasher, clock=clock, now=now, **options)
    return Rig(ring=ring, store=store, hasher=hasher, clock=clock, now=now)


@pytest.fixture
def rig() -> Iterator[Rig]:
    """A fresh rig, its thread pool shut down afterwards."""
    made = make_rig()
    yield made
    asyncio.run(made.ring.aclose())


def with_secret(key: str, secret: str) -> str:
    """``key`` with its secret replaced and a valid checksum: well-formed, same id, wrong secret."""
    return checksummed(key[:16] + secret)


class TestCreate:
    """Issuing keys."""

    def test_create_returns_the_key_once_and_stores_only_its_hash(self, rig: Rig) -> None:
        """The record holds an argon2id hash of the whole key, and the store holds that same record."""
        key, record = rig.create(name="ci", expires_at=T0 + timedelta(days=1))
        assert key.startswith(f"mk_{record.key_id}_")
        assert record.secret_hash.startswith("$argon2id$")
        assert rig.hasher.verify(record.secret_hash, key)
        assert (record.tenant, record.name, record.created_at) == ("acme", "ci", T0)
        assert asyncio.run(rig.store.get_key(record.key_id)) == record

    def test_default_scopes_exclude_admin(self, rig: Rig) -> None:
        """Without explicit scopes a key can read and write, never administer."""
        _, record = rig.create()
        assert record.scopes == ("mcp:read", "mcp:write")

    def test_admin_and_audit_only_when_asked(self, rig: Rig) -> None:
        """mcp:admin and mcp:audit are granted when named; duplicates collapse."""
        _, record = rig.create(scopes=["mcp:admin", "mcp:audit", "mcp:admin"])
        assert record.scopes == ("mcp:admin", "mcp:audit")

    @pytest.mark.parametrize("scopes", [["mcp:root"], ["MCP:READ"], [], "mcp:read", ["mcp:read", "mcp:read mcp:admin"]])
    def test_invalid_scopes_are_value_errors(self, rig: Rig, scopes: Any) -> None:
        """Unknown, empty, wrongly cased or space-smuggled scopes are a ValueError and store nothing."""
        with pytest.raises(ValueError, match="scope"):
            rig.create(scopes=scopes)
        assert asyncio.run(rig.ring.list("acme")) == []

    @pytest.mark.parametrize("tenant", ["", "a" * 129, "a b", "a/b", "t\u00e9nant", "acme\n", "acme;x"])
    def test_invalid_tenants_are_value_errors(self, rig: Rig, tenant: str) -> None:
        """A tenant outside 1-128 characters of [A-Za-z0-9._-] is a ValueError."""
        with pytest.raises(ValueError, match="tenant"):
            rig.create(tenant=tenant)

    def test_tenant_at_the_length_limit(self, rig: Rig) -> None:
        """128 characters of the allowed alphabet make a valid tenant."""
        _, record = rig.create(tenant="A-z_0." + "x" * 122)
        assert len(record.tenant) == 128

    @pytest.mark.parametrize("name", ["", "bot\r\nX-Injected: 1", "n" * 129, "caf\u00e9"])
    def test_invalid_names_are_value_errors(self, rig: Rig, name: str) -> None:
        """A name that could not travel in a header (control or non-ASCII characters, too long) is a ValueError."""
        with pytest.raises(ValueError, match="name"):
            rig.create(name=name)

    @pytest.mark.parametrize("expires_at", [T0, T0 - timedelta(seconds=1), datetime(2030, 1, 1)])
    def test_bad_expiry_is_value_error(self, rig: Rig, expires_at: datetime) -> None:
        """An expiry that is not in the future, or has no time zone, is a ValueError."""
        with pytest.raises(ValueError, match="expires_at"):
            rig.create(expires_at=expires_at)


class TestVerify:
    """Checking a presented key."""

    def test_verify_returns_the_keys_principal(self, rig: Rig) -> None:
        """A valid key yields its tenant, scopes and id; the subject is the key id without a name."""
        key, record = rig.create(scopes=["mcp:read"])
        principal = rig.verify(key)
        assert principal.tenant == "acme"
        assert principal.subject == f"key:{record.key_id}"
        assert principal.credential_id == principal.client_id == record.key_id
        assert principal.scopes == frozenset({"mcp:read"})
        assert principal.kind is CredentialKind.KEY

    def test_subject_is_the_name_when_named(self, rig: Rig) -> None:
        """A named key's subject is key:<name>."""
        key, _ = rig.create(name="nightly-ci")
        assert rig.verify(key).subject == "key:nightly-ci"

    def test_argon2_runs_off_the_event_loop_thread(self, rig: Rig) -> None:
        """The argon2 verification runs in the pool, never on the thread running the event loop."""
        key, _ = rig.create()
        rig.verify(key)
        assert rig.hasher.threads
        assert threading.get_ident() not in rig.hasher.threads

    @pytest.mark.threat("T-KEY-GUESS")
    def test_malformed_key_refused_without_argon2(self, rig: Rig) -> None:
        """A key with a bad checksum is refused before the store or argon2 are asked."""
        key, _ = rig.create()
        rig.store.down = True
        with pytest.raises(InvalidToken, match="malformed key"):
            rig.verify(key[:-1] + ("0" if key[-1] != "0" else "1"))
        assert rig.hasher.verifies == 0

    @pytest.mark.threat("T-KEY-GUESS")
    def test_wrong_secret_with_right_id_refused(self, rig: Rig) -> None:
        """A well-formed key with a real id but another secret is refused after a real argon2 check."""
        key, _ = rig.create()
        forged = with_secret(key, "A" * 43)
        with pytest.raises(InvalidToken, match="invalid key"):
            rig.verify(forged)
        assert rig.hasher.verifies == 1

    @pytest.mark.threat("T-KEY-GUESS")
    def test_unknown_id_refused_after_a_dummy_verify(self, rig: Rig) -> None:
        """An id with no record runs one argon2 verification anyway, then is refused like a wrong secret."""
        _, unknown = generate_key()
        with pytest.raises(InvalidToken) as caught:
            rig.verify(unknown)
        assert caught.value.description == "invalid key"
        assert rig.hasher.verifies == 1
        with pytest.raises(InvalidToken):
            rig.verify(unknown)
        assert rig.hasher.verifies == 2

    def test_cached_verification_skips_argon2(self, rig: Rig) -> None:
        """A key verified a moment ago is accepted again without argon2."""
        key, _ = rig.create()
        for _ in range(5):
            rig.verify(key)
        assert rig.hasher.verifies == 1

    def test_cache_expiry_runs_argon2_again(self, rig: Rig) -> None:
        """Once the cache TTL has passed, the next verification runs argon2 again."""
        key, _ = rig.create()
        rig.verify(key)
        rig.clock.value += 299
        rig.verify(key)
        assert rig.hasher.verifies == 1
        rig.clock.value += 2
        rig.verify(key)
        assert rig.hasher.verifies == 2

    @pytest.mark.threat("T-KEY-GUESS")
    def test_cache_of_a_good_key_does_not_admit_a_forged_one(self, rig: Rig) -> None:
        """A cached success for one key does not let another secret for the same id through."""
        key, _ = rig.create()
        rig.verify(key)
        with pytest.raises(InvalidToken):
            rig.verify(with_secret(key, "B" * 43))
        assert rig.hasher.verifies == 2

    @pytest.mark.threat("T-KEY-GUESS")
    def test_remembers_only_the_exact_key_verified_and_only_while_cached(self, rig: Rig) -> None:
        """``remembers`` is true for a key verified within the TTL; never for a forged secret of its id, an
        unverified key, or the key once its cache entry has expired."""
        key, _ = rig.create()
        other, _ = rig.create()
        assert not rig.ring.remembers(key)
        rig.verify(key)
        assert rig.ring.remembers(key)
        assert not rig.ring.remembers(with_secret(key, "B" * 43))
        assert not rig.ring.remembers(other)
        assert not rig.ring.remembers(key + "x")
        rig.clock.value += 301
        assert not rig.ring.remembers(key)

    def test_cache_is_bounded(self) -> None:
        """Past its size the cache drops its oldest entry, whose key then needs argon2 again."""
        rig = make_rig(cache_size=3)
        keys = [rig.create()[0] for _ in range(4)]
        for key in keys:
            rig.verify(key)
        assert rig.hasher.verifies == 4
        rig.verify(keys[-1])
        assert rig.hasher.verifies == 4
        rig.verify(keys[0])
        assert rig.hasher.verifies == 5
        asyncio.run(rig.ring.aclose())

    def test_concurrent_first_verifications_share_one_argon2(self, rig: Rig) -> None:
        """Many simultaneous first requests with one key cost one argon2 run, and all succeed."""
        key, _ = rig.create()

        async def burst() -> list[Any]:
            return await asyncio.gather(*(rig.ring.verify(key) for _ in range(20)))

        assert len(asyncio.run(burst())) == 20
        assert rig.hasher.verifies == 1

    @pytest.mark.threat("T-STORE-FAIL")
    def test_store_failure_refused_even_when_cached(self, rig: Rig) -> None:
        """With the store down, a cached key is not accepted: StorageUnavailable propagates (fail closed)."""
        key, _ = rig.create()
        rig.verify(key)
        rig.store.down = True
        with pytest.raises(StorageUnavailable):
            rig.verify(key)


class TestRevocationAndExpiry:
    """Revoked and expired keys stop working on the next request, cached or not."""

    @pytest.mark.threat("T-KEY-REVOKE")
    def test_revoked_key_refused_at_once_while_cached(self, rig: Rig) -> None:
        """Revoking through the ring refuses the key on the very next call, without argon2."""
        key, record = rig.create()
        rig.verify(key)
        revoked = asyncio.run(rig.ring.revoke(record.key_id))
        assert revoked is not None
        assert revoked.revoked_at == T0
        with pytest.raises(InvalidToken, match="key revoked"):
            rig.verify(key)
        assert rig.hasher.verifies == 1

    @pytest.mark.threat("T-KEY-REVOKE")
    def test_revoked_elsewhere_refused_while_cached_here(self, rig: Rig) -> None:
        """A revocation by another process on the same store (the CLI) cuts a key this ring has cached."""
        key, record = rig.create()
        rig.verify(key)
        other = KeyRing(store=rig.store, hasher=rig.hasher)
        asyncio.run(other.revoke(record.key_id))
        asyncio.run(other.aclose())
        with pytest.raises(InvalidToken, match="key revoked"):
            rig.verify(key)

    @pytest.mark.threat("T-KEY-REVOKE")
    def test_expired_key_refused_at_once_while_cached(self, rig: Rig) -> None:
        """A key past its expiry is refused on the next call even with a fresh cache entry."""
        key, _ = rig.create(expires_at=T0 + timedelta(hours=1))
        rig.verify(key)
        rig.now.value = T0 + timedelta(hours=1)
        with pytest.raises(InvalidToken, match="key expired"):
            rig.verify(key)

    def test_revoke_unknown_is_none(self, rig: Rig) -> None:
        """Revoking an id that does not exist returns None."""
        assert asyncio.run(rig.ring.revoke("nosuchkey123")) is None

    def test_list_shows_a_tenants_keys_revoked_included(self, rig: Rig) -> None:
        """Listing returns the tenant's keys, oldest first, revoked ones marked, other tenants absent."""
        _, first = rig.create()
        rig.now.value = T0 + timedelta(minutes=1)
        _, second = rig.create()
        rig.create(tenant="other")
        asyncio.run(rig.ring.revoke(first.key_id))
        listed = asyncio.run(rig.ring.list("acme"))
        assert [r.key_id for r in listed] == [first.key_id, second.key_id]
        assert listed[0].revoked_at is not None
        assert listed[1].revoked_at is None


@pytest.mark.threat("T-KEY-LEAK")
def test_key_never_leaks_into_reprs_logs_errors_or_the_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cheap_hasher: argon2.PasswordHasher
) -> None:
    """A created key's secret appears in no repr, log line, exception text, nor the SQLite file or its WAL."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "keys.db"
    store = open_store(f"sqlite:///{path}")
    ring = KeyRing(store=store, hasher=cheap_hasher)
    seen: list[str] = []

    async def refuse(attempt: str) -> None:
        with pytest.raises(InvalidToken) as caught:
            await ring.verify(attempt)
        seen.extend([str(caught.value), repr(caught.value), str(caught.value.challenge("https://x/m"))])

    async def scenario() -> tuple[str, KeyRecord]:
        key, record = await ring.create(tenant="acme", name="canary")
        principal = await ring.verify(key)
        seen.extend([repr(record), str(record), repr(principal), repr(ring)])
        for attempt in (with_secret(key, "C" * 43), key[:-1], key + "x", generate_key()[1]):
            await refuse(attempt)
        await ring.revoke(record.key_id)
        await refuse(key)
        seen.extend(repr(r) for r in await ring.list("acme"))
        return key, record

    key, record = asyncio.run(scenario())
    secret = key[16:59]
    assert (tmp_path / "keys.db-wal").exists()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    asyncio.run(ring.aclose())
    asyncio.run(store.close())
    on_disk += b"".join(p.read_bytes() for p in tmp_path.iterdir())

    assert record.key_id.encode() in on_disk, "the scan must be reading the key table"
    for text in [*seen, caplog.text]:
        assert secret not in text
        assert record.secret_hash not in text
    assert secret.encode() not in on_disk
    assert record.key_id in caplog.text, "logging must have been captured"
