"""One conformance suite for the authorization server's storage (clients, codes, grants, users) over every backend."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mcpguard.errors import StorageUnavailable
from mcpguard.stores import (
    ClientRecord,
    CodeOutcome,
    CodeRecord,
    GrantRecord,
    MemoryStore,
    RotationOutcome,
    Store,
    UserRecord,
    open_store,
)

_T = TypeVar("_T")

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
NO_GRACE = timedelta(0)
GRACE = timedelta(seconds=30)
TICK = timedelta(microseconds=1)
_forks = itertools.count()


def h(label: str) -> str:
    """The SHA-256 hex of ``label``, standing in for the hash of a code or refresh token."""
    return hashlib.sha256(label.encode()).hexdigest()


def client(client_id: str = "mc_one", **fields: Any) -> ClientRecord:
    """A confidential client registered at T0."""
    record = ClientRecord(
        client_id=client_id,
        client_secret_hash=h(f"secret-of-{client_id}"),
        metadata='{"redirect_uris":["https://app.example/cb"],"token_endpoint_auth_method":"client_secret_basic"}',
        created_at=T0,
    )
    return replace(record, **fields)


def code(label: str = "code-1", *, lifetime: timedelta = timedelta(seconds=60), **fields: Any) -> CodeRecord:
    """An authorization code issued at T0 that creates grant ``g-<label>``."""
    record = CodeRecord(
        code_hash=h(label),
        grant_id=f"g-{label}",
        client_id="mc_one",
        redirect_uri="https://app.example/cb",
        code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        resource="https://mcp.example/mcp",
        scopes=("mcp:read", "mcp:write"),
        tenant="acme",
        subject="user:u1",
        created_at=T0,
        expires_at=T0 + lifetime,
    )
    return replace(record, **fields)


def grant(grant_id: str = "g1", tenant: str = "acme", *, minutes: int = 0, **fields: Any) -> GrantRecord:
    """A grant created ``minutes`` after T0 whose family lives for 30 days."""
    created = T0 + timedelta(minutes=minutes)
    record = GrantRecord(
        grant_id=grant_id,
        tenant=tenant,
        subject="user:u1",
        client_id="mc_one",
        scopes=("mcp:read",),
        resource="https://mcp.example/mcp",
        created_at=created,
        expires_at=created + timedelta(days=30),
    )
    return replace(record, **fields)


def user(user_id: str = "u1", email: str = "alice@example.com", *, minutes: int = 0, **fields: Any) -> UserRecord:
    """A local user of tenant ``acme`` created ``minutes`` after T0."""
    record = UserRecord(
        user_id=user_id,
        email=email,
        password_hash=f"$argon2id$v=19$m=8,t=1,p=1$hash-of-{user_id}",
        tenants=("acme",),
        scopes=("mcp:read",),
        created_at=T0 + timedelta(minutes=minutes),
    )
    return replace(record, **fields)


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run one store call to completion."""
    return asyncio.run(coroutine)


def store_url(kind: str, tmp_path: Path) -> str:
    """The URL of a fresh store of backend ``kind``."""
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/s.db"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each backend, opened from its URL."""
    opened = open_store(store_url(request.param, tmp_path))
    yield opened
    run(opened.close())


def fork(store: Store, tmp_path: Path) -> Store:
    """An independent copy of ``store`` as it is now, so a probe can change the copy and leave the original."""
    if isinstance(store, MemoryStore):
        return copy.deepcopy(store)
    target = tmp_path / f"fork-{next(_forks)}.db"
    with (
        closing(sqlite3.connect(store.url.removeprefix("sqlite:///"))) as source,
        closing(sqlite3.connect(target)) as to,
    ):
        source.backup(to)
    return open_store(f"sqlite:///{target}")


def live_tokens(store: Store, tmp_path: Path, hashes: list[str], at: datetime) -> list[str]:
    """Those of ``hashes`` that would rotate now, each tried on its own copy of the store."""
    live = []
    for presented in hashes:
        probe = fork(store, tmp_path)
        try:
            rotation = run(probe.rotate_refresh(presented, h("probe"), at, NO_GRACE))
        finally:
            run(probe.close())
        if rotation.outcome is RotationOutcome.ROTATED:
            live.append(presented)
    return live


def in_threads(calls: list[Callable[[], _T]]) -> list[_T]:
    """Run every call at once, each on its own thread (and so its own event loop), and collect the results."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def worker(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # handed back to the test thread, which re-raises it
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class TestClientStoreConformance:
    """What every ``ClientStore`` backend guarantees."""

    def test_add_then_get_returns_the_same_record(self, store: Store) -> None:
        """Confidential and public clients come back field for field."""
        confidential, public = client("mc_one"), client("mc_two", client_secret_hash=None)
        run(store.add_client(confidential))
        run(store.add_client(public))
        assert run(store.get_client("mc_one")) == confidential
        assert run(store.get_client("mc_two")) == public

    def test_get_unknown_is_none(self, store: Store) -> None:
        """A client id never added is ``None``."""
        assert run(store.get_client("mc_missing")) is None

    def test_duplicate_id_is_value_error(self, store: Store) -> None:
        """A second client with the same id is a ValueError, and the first one stays."""
        first = client()
        run(store.add_client(first))
        with pytest.raises(ValueError, match="already exists"):
            run(store.add_client(client(metadata="{}")))
        assert run(store.get_client("mc_one")) == first


class TestCodeStoreConformance:
    """What every ``CodeStore`` backend guarantees: each code is exchanged at most once."""

    def test_first_consume_is_fresh_and_marks_the_code(self, store: Store) -> None:
        """Consuming a new code in time returns it with its consumption time."""
        run(store.add_code(code()))
        at = T0 + timedelta(seconds=5)
        consumed = run(store.consume_code(h("code-1"), at))
        assert consumed.outcome is CodeOutcome.FRESH
        assert consumed.record == replace(code(), consumed_at=at)

    @pytest.mark.threat("T-CODE-REPLAY")
    def test_replayed_code_is_reported_with_the_grant_it_created(self, store: Store) -> None:
        """A second consume is REPLAYED and names the grant to revoke; the first consumption time is kept."""
        run(store.add_code(code()))
        first = T0 + timedelta(seconds=5)
        run(store.consume_code(h("code-1"), first))
        for at in (first, first + timedelta(seconds=1), T0 + timedelta(days=1)):
            again = run(store.consume_code(h("code-1"), at))
            assert again.outcome is CodeOutcome.REPLAYED
            assert again.record is not None
            assert again.record.grant_id == "g-code-1"
            assert again.record.consumed_at == first

    def test_expiry_is_exclusive_and_burns_the_code(self, store: Store) -> None:
        """A code is good until just before expires_at; at it, it is EXPIRED, burnt, and stays EXPIRED."""
        run(store.add_code(code("early")))
        run(store.add_code(code("late")))
        expires = T0 + timedelta(seconds=60)
        assert run(store.consume_code(h("early"), expires - TICK)).outcome is CodeOutcome.FRESH
        late = run(store.consume_code(h("late"), expires))
        assert late.outcome is CodeOutcome.EXPIRED
        assert late.record is not None
        assert late.record.consumed_at == expires
        again = run(store.consume_code(h("late"), expires + timedelta(hours=1)))
        assert again.outcome is CodeOutcome.EXPIRED
        assert again.record == late.record

    def test_unknown_code(self, store: Store) -> None:
        """A hash never added is UNKNOWN with no record."""
        consumed = run(store.consume_code(h("nothing"), T0))
        assert consumed.outcome is CodeOutcome.UNKNOWN
        assert consumed.record is None

    def test_duplicate_code_is_value_error(self, store: Store) -> None:
        """Adding the same code hash twice is a ValueError."""
        run(store.add_code(code()))
        with pytest.raises(ValueError, match="already exists"):
            run(store.add_code(code(grant_id="g-other")))

    @pytest.mark.threat("T-CODE-REPLAY")
    def test_concurrent_consumes_have_exactly_one_fresh_and_the_rest_replayed(self, store: Store) -> None:
        """Of 20 concurrent consumes of one code exactly one is FRESH; all others are REPLAYED."""
        run(store.add_code(code()))

        async def race() -> list[CodeOutcome]:
            calls = [store.consume_code(h("code-1"), T0 + timedelta(seconds=1)) for _ in range(20)]
            return [consumed.outcome for consumed in await asyncio.gather(*calls)]

        assert Counter(run(race())) == {CodeOutcome.FRESH: 1, CodeOutcome.REPLAYED: 19}


class TestConsentTicketConformance:
    """What every ``CodeStore`` backend guarantees of consent tickets: each answers one decision, and only in time."""

    EXPIRES = T0 + timedelta(minutes=5)

    @pytest.mark.threat("T-CONSENT-CSRF")
    def test_a_ticket_is_spent_once(self, store: Store) -> None:
        """The first spend is True; every later one before its expiry is False, other tickets unaffected."""
        assert run(store.spend_ticket(h("t1"), self.EXPIRES, T0)) is True
        for at in (T0, T0 + timedelta(seconds=1), self.EXPIRES - TICK):
            assert run(store.spend_ticket(h("t1"), self.EXPIRES, at)) is False
        assert run(store.spend_ticket(h("t2"), self.EXPIRES, T0 + timedelta(seconds=1))) is True

    def test_expiry_is_exclusive(self, store: Store) -> None:
        """A ticket can be spent until just before expires_at; at it or after, never, spent before or not."""
        assert run(store.spend_ticket(h("early"), self.EXPIRES, self.EXPIRES - TICK)) is True
        assert run(store.spend_ticket(h("late"), self.EXPIRES, self.EXPIRES)) is False
        for label in ("early", "late"):
            assert run(store.spend_ticket(h(label), self.EXPIRES, self.EXPIRES + timedelta(hours=1))) is False

    def test_expired_tickets_do_not_hide_fresh_ones(self, store: Store) -> None:
        """Spending after many tickets have expired still spends a new ticket once, and the old ones stay refused."""
        for i in range(50):
            assert run(store.spend_ticket(h(f"old-{i}"), T0 + timedelta(seconds=i + 1), T0)) is True
        later = T0 + timedelta(minutes=1)
        assert run(store.spend_ticket(h("new"), later + timedelta(minutes=5), later)) is True
        assert run(store.spend_ticket(h("new"), later + timedelta(minutes=5), later)) is False
        assert run(store.spend_ticket(h("old-0"), T0 + timedelta(seconds=1), later)) is False

    @pytest.mark.threat("T-CONSENT-CSRF")
    def test_concurrent_spends_have_exactly_one_winner(self, store: Store) -> None:
        """Of 20 concurrent spends of one ticket exactly one is True."""

        async def race() -> list[bool]:
            return list(await asyncio.gather(*(store.spend_ticket(h("t1"), self.EXPIRES, T0) for _ in range(20))))

        assert Counter(run(race())) == {True: 1, False: 19}


class TestGrantStoreConformance:
    """What every ``GrantStore`` backend guarantees about grants, outside rotation."""

    def test_add_then_get_returns_the_same_record(self, store: Store) -> None:
        """A grant comes back field for field, whatever it is looked up by."""
        record = grant(scopes=("mcp:read", "mcp:write"))
        run(store.add_grant(record, h("r0")))
        assert run(store.get_grant("g1")) == record
        assert run(store.grant_for_refresh(h("r0"))) == record

    def test_unknown_grant_and_token_are_none(self, store: Store) -> None:
        """An unknown grant id or refresh hash is ``None``."""
        assert run(store.get_grant("missing")) is None
        assert run(store.grant_for_refresh(h("missing"))) is None

    def test_duplicate_grant_id_or_refresh_hash_is_value_error(self, store: Store) -> None:
        """A second grant with the same id, or with a refresh hash already issued, is a ValueError."""
        first = grant()
        run(store.add_grant(first, h("r0")))
        with pytest.raises(ValueError, match="already exists"):
            run(store.add_grant(grant(tenant="other"), h("r-other")))
        with pytest.raises(ValueError, match="already issued"):
            run(store.add_grant(grant("g2"), h("r0")))
        assert run(store.get_grant("g1")) == first
        assert run(store.get_grant("g2")) is None
        assert run(store.grant_for_refresh(h("r-other"))) is None

    def test_revoke_keeps_the_first_time_and_reason(self, store: Store) -> None:
        """Revoking sets time and reason; revoking again changes neither."""
        run(store.add_grant(grant(), h("r0")))
        first = T0 + timedelta(hours=1)
        revoked = run(store.revoke_grant("g1", first, "revoked"))
        assert revoked is not None
        assert (revoked.revoked_at, revoked.revoked_reason) == (first, "revoked")
        again = run(store.revoke_grant("g1", first + timedelta(hours=1), "code_replay"))
        assert again == revoked
        assert run(store.get_grant("g1")) == revoked

    def test_revoke_unknown_is_none(self, store: Store) -> None:
        """Revoking an unknown grant returns ``None`` and creates nothing."""
        assert run(store.revoke_grant("missing", T0, "revoked")) is None
        assert run(store.get_grant("missing")) is None

    def test_list_is_oldest_first_and_tenant_scoped(self, store: Store) -> None:
        """A tenant's grants are listed by creation time and never include another tenant's."""
        for grant_id, tenant, minutes in (("g2", "acme", 2), ("g1", "acme", 1), ("g3", "acme-b", 0)):
            run(store.add_grant(grant(grant_id, tenant, minutes=minutes), h(f"r-{grant_id}")))
        assert [g.grant_id for g in run(store.list_grants("acme"))] == ["g1", "g2"]
        assert [g.grant_id for g in run(store.list_grants("acme-b"))] == ["g3"]
        assert run(store.list_grants("nobody")) == []


class TestRefreshRotationConformance:
    """Every outcome of ``rotate_refresh``, and the invariant that a family has at most one live token."""

    def test_live_token_rotates_and_counts_a_generation(self, store: Store) -> None:
        """The live token is ROTATED; its successor is then the one that rotates, and each rotation counts."""
        run(store.add_grant(grant(), h("r0")))
        first = run(store.rotate_refresh(h("r0"), h("r1"), T0 + timedelta(minutes=1), NO_GRACE))
        assert first.outcome is RotationOutcome.ROTATED
        assert first.grant == replace(grant(), generation=1)
        second = run(store.rotate_refresh(h("r1"), h("r2"), T0 + timedelta(minutes=2), NO_GRACE))
        assert second.outcome is RotationOutcome.ROTATED
        assert second.grant is not None
        assert second.grant.generation == 2
        assert run(store.get_grant("g1")) == second.grant
        assert run(store.grant_for_refresh(h("r2"))) == second.grant

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_replayed_rotated_token_revokes_the_family(self, store: Store) -> None:
        """With no grace (the default), a rotated token presented again revokes the family, even at the same instant."""
        run(store.add_grant(grant(), h("r0")))
        at = T0 + timedelta(minutes=1)
        run(store.rotate_refresh(h("r0"), h("r1"), at, NO_GRACE))
        replayed = run(store.rotate_refresh(h("r0"), h("stolen-next"), at, NO_GRACE))
        assert replayed.outcome is RotationOutcome.REUSE_REVOKED
        assert replayed.grant is not None
        assert (replayed.grant.revoked_at, replayed.grant.revoked_reason) == (at, "reuse")
        assert run(store.get_grant("g1")) == replayed.grant
        assert run(store.grant_for_refresh(h("stolen-next"))) is None
        later = run(store.rotate_refresh(h("r1"), h("r2"), at + timedelta(seconds=1), NO_GRACE))
        assert later.outcome is RotationOutcome.REVOKED
        assert run(store.grant_for_refresh(h("r2"))) is None

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_every_older_token_is_recognised_as_reuse(self, store: Store) -> None:
        """A token from several generations back is still known to the family and revokes it."""
        run(store.add_grant(grant(), h("r0")))
        for n in range(1, 5):
            run(store.rotate_refresh(h(f"r{n - 1}"), h(f"r{n}"), T0 + timedelta(minutes=n), NO_GRACE))
        assert run(store.grant_for_refresh(h("r0"))) == run(store.get_grant("g1"))
        replayed = run(store.rotate_refresh(h("r0"), h("x"), T0 + timedelta(minutes=9), GRACE))
        assert replayed.outcome is RotationOutcome.REUSE_REVOKED

    def test_revoked_family_changes_nothing(self, store: Store) -> None:
        """After revoke_grant even the live token is REVOKED, and its new hash is never issued."""
        run(store.add_grant(grant(), h("r0")))
        revoked = run(store.revoke_grant("g1", T0 + timedelta(minutes=1), "revoked"))
        rotation = run(store.rotate_refresh(h("r0"), h("r1"), T0 + timedelta(minutes=2), GRACE))
        assert rotation.outcome is RotationOutcome.REVOKED
        assert rotation.grant == revoked
        assert run(store.get_grant("g1")) == revoked
        assert run(store.grant_for_refresh(h("r1"))) is None
        assert run(store.grant_for_refresh(h("r0"))) == revoked

    def test_family_ends_at_expires_at(self, store: Store) -> None:
        """The live token rotates until just before expires_at; at it, it is EXPIRED and nothing rotates."""
        run(store.add_grant(grant(), h("r0")))
        end = grant().expires_at
        expired = run(store.rotate_refresh(h("r0"), h("late"), end, NO_GRACE))
        assert expired.outcome is RotationOutcome.EXPIRED
        assert expired.grant == grant()
        assert run(store.grant_for_refresh(h("late"))) is None
        assert run(store.rotate_refresh(h("r0"), h("r1"), end - TICK, NO_GRACE)).outcome is RotationOutcome.ROTATED

    def test_unknown_token(self, store: Store) -> None:
        """A hash no family issued is UNKNOWN and rotates nothing."""
        run(store.add_grant(grant(), h("r0")))
        rotation = run(store.rotate_refresh(h("never"), h("r1"), T0, NO_GRACE))
        assert rotation.outcome is RotationOutcome.UNKNOWN
        assert rotation.grant is None
        assert run(store.grant_for_refresh(h("r1"))) is None

    @pytest.mark.parametrize("grace", [timedelta(seconds=61), timedelta(seconds=-1)])
    def test_grace_outside_0_to_60_seconds_is_value_error(self, store: Store, grace: timedelta) -> None:
        """A grace window over 60 seconds or negative is a ValueError, whatever the token."""
        run(store.add_grant(grant(), h("r0")))
        for presented in (h("r0"), h("never")):
            with pytest.raises(ValueError, match="60 seconds"):
                run(store.rotate_refresh(presented, h("r1"), T0, grace))
        assert run(store.get_grant("g1")) == grant()

    def test_new_hash_already_issued_is_value_error(self, store: Store) -> None:
        """A successor hash that some family already issued is a ValueError, and nothing changes."""
        run(store.add_grant(grant(), h("r0")))
        run(store.add_grant(grant("g2"), h("other")))
        with pytest.raises(ValueError, match="already issued"):
            run(store.rotate_refresh(h("r0"), h("other"), T0, NO_GRACE))
        assert run(store.rotate_refresh(h("r0"), h("r1"), T0, NO_GRACE)).outcome is RotationOutcome.ROTATED

    def test_grace_reissues_for_the_previous_token_and_kills_its_successor(self, store: Store, tmp_path: Path) -> None:
        """Inside the window the previous token gets a fresh successor; the successor before it no longer works."""
        run(store.add_grant(grant(), h("r0")))
        rotated_at = T0 + timedelta(minutes=1)
        run(store.rotate_refresh(h("r0"), h("r1"), rotated_at, GRACE))
        retried = run(store.rotate_refresh(h("r0"), h("r1b"), rotated_at + timedelta(seconds=10), GRACE))
        assert retried.outcome is RotationOutcome.GRACE_REISSUED
        assert retried.grant == replace(grant(), generation=1)
        later = rotated_at + timedelta(seconds=20)
        assert live_tokens(store, tmp_path, [h("r0"), h("r1"), h("r1b")], later) == [h("r1b")]
        killed = run(store.rotate_refresh(h("r1"), h("r2"), later, GRACE))
        assert killed.outcome is RotationOutcome.REUSE_REVOKED

    def test_grace_window_includes_its_edge(self, store: Store) -> None:
        """Exactly ``grace`` after the rotation the previous token is still reissued."""
        run(store.add_grant(grant(), h("r0")))
        rotated_at = T0 + timedelta(minutes=1)
        run(store.rotate_refresh(h("r0"), h("r1"), rotated_at, GRACE))
        edge = run(store.rotate_refresh(h("r0"), h("r1b"), rotated_at + GRACE, GRACE))
        assert edge.outcome is RotationOutcome.GRACE_REISSUED

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_replay_after_the_grace_window_revokes(self, store: Store) -> None:
        """Just past the window the previous token is reuse and revokes the family."""
        run(store.add_grant(grant(), h("r0")))
        rotated_at = T0 + timedelta(minutes=1)
        run(store.rotate_refresh(h("r0"), h("r1"), rotated_at, GRACE))
        late = run(store.rotate_refresh(h("r0"), h("r1b"), rotated_at + GRACE + TICK, GRACE))
        assert late.outcome is RotationOutcome.REUSE_REVOKED
        assert run(store.rotate_refresh(h("r1"), h("r2"), rotated_at + GRACE, GRACE)).outcome is RotationOutcome.REVOKED

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_grace_reissue_does_not_extend_the_window(self, store: Store) -> None:
        """Reissues inside the window keep its start, so retrying cannot keep the previous token alive for long."""
        run(store.add_grant(grant(), h("r0")))
        rotated_at = T0 + timedelta(minutes=1)
        run(store.rotate_refresh(h("r0"), h("r1"), rotated_at, GRACE))
        for n in range(1, 4):
            at = rotated_at + timedelta(seconds=7 * n)
            assert run(store.rotate_refresh(h("r0"), h(f"r1-{n}"), at, GRACE)).outcome is RotationOutcome.GRACE_REISSUED
        replayed = run(store.rotate_refresh(h("r0"), h("r1-late"), rotated_at + GRACE + TICK, GRACE))
        assert replayed.outcome is RotationOutcome.REUSE_REVOKED

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_replayed_grandparent_inside_the_window_revokes(self, store: Store) -> None:
        """Only the immediately previous token has a grace: one two rotations back revokes, however recent."""
        run(store.add_grant(grant(), h("r0")))
        run(store.rotate_refresh(h("r0"), h("r1"), T0 + timedelta(seconds=1), GRACE))
        run(store.rotate_refresh(h("r1"), h("r2"), T0 + timedelta(seconds=2), GRACE))
        replayed = run(store.rotate_refresh(h("r0"), h("r3"), T0 + timedelta(seconds=3), GRACE))
        assert replayed.outcome is RotationOutcome.REUSE_REVOKED

    @pytest.mark.threat("T-REFRESH-REPLAY")
    def test_concurrent_replays_without_grace_have_one_winner_and_no_survivor(
        self, store: Store, tmp_path: Path
    ) -> None:
        """Of 20 concurrent refreshes of one token one rotates, the next revokes the family, and then no token works."""
        run(store.add_grant(grant(), h("r0")))
        at = T0 + timedelta(minutes=1)

        async def race() -> list[RotationOutcome]:
            calls = [store.rotate_refresh(h("r0"), h(f"n{i}"), at, NO_GRACE) for i in range(20)]
            return [rotation.outcome for rotation in await asyncio.gather(*calls)]

        assert Counter(run(race())) == {
            RotationOutcome.ROTATED: 1,
            RotationOutcome.REUSE_REVOKED: 1,
            RotationOutcome.REVOKED: 18,
        }
        family = run(store.get_grant("g1"))
        assert family is not None
        assert family.revoked_reason == "reuse"
        issued = [h("r0")] + [h(f"n{i}") for i in range(20)]
        assert live_tokens(store, tmp_path, issued, at + timedelta(seconds=1)) == []

    def test_concurrent_refreshes_with_grace_leave_exactly_one_live_token(self, store: Store, tmp_path: Path) -> None:
        """With a grace window, 20 concurrent refreshes give one ROTATED, 19 reissues, and one live token in the end."""
        run(store.add_grant(grant(), h("r0")))
        at = T0 + timedelta(minutes=1)

        async def race() -> list[RotationOutcome]:
            calls = [store.rotate_refresh(h("r0"), h(f"n{i}"), at, GRACE) for i in range(20)]
            return [rotation.outcome for rotation in await asyncio.gather(*calls)]

        assert Counter(run(race())) == {RotationOutcome.ROTATED: 1, RotationOutcome.GRACE_REISSUED: 19}
        issued = [h("r0")] + [h(f"n{i}") for i in range(20)]
        assert len(live_tokens(store, tmp_path, issued, at + GRACE + TICK)) == 1

    @pytest.mark.threat("T-REFRESH-REPLAY")
    @pytest.mark.parametrize("seed", [2, 11, 21])
    def test_random_presentations_never_leave_two_live_tokens(self, store: Store, tmp_path: Path, seed: int) -> None:
        """Whatever tokens are presented, and when, a family keeps at most one live token, and none once revoked."""
        chance = random.Random(seed)
        run(store.add_grant(grant(), h("t0")))
        issued, at = [h("t0")], T0
        for step in range(1, 13):
            at += timedelta(seconds=chance.choice([0, 5, 20, 31]))
            new = h(f"t{step}")
            # Mostly the newest tokens, so that a run rotates and reissues a while before reuse ends it.
            presented = chance.choice([issued[-1], issued[-1], issued[-1], *issued[-2:], chance.choice(issued)])
            rotation = run(store.rotate_refresh(presented, new, at, GRACE))
            if rotation.outcome in (RotationOutcome.ROTATED, RotationOutcome.GRACE_REISSUED):
                issued.append(new)
            else:
                assert run(store.grant_for_refresh(new)) is None
            family = run(store.get_grant("g1"))
            assert family is not None
            live = live_tokens(store, tmp_path, issued, at)
            assert len(live) == (0 if family.revoked_at is not None else 1), (step, rotation.outcome)


class TestUserStoreConformance:
    """What every ``UserStore`` backend guarantees."""

    def test_add_then_get_by_email_in_any_case(self, store: Store) -> None:
        """A user added with a mixed-case email is found in any case, and stored lower-cased."""
        added = user(email="Alice@Example.COM", tenants=("acme", "beta corp"), scopes=("mcp:read", "mcp:write"))
        run(store.add_user(added))
        expected = replace(added, email="alice@example.com")
        for spelling in ("alice@example.com", "ALICE@EXAMPLE.COM", "Alice@Example.COM"):
            assert run(store.get_user_by_email(spelling)) == expected
        assert run(store.get_user_by_email("bob@example.com")) is None

    def test_get_by_id(self, store: Store) -> None:
        """A user is found by its id as it was stored; an unknown id is ``None``."""
        run(store.add_user(user(email="Alice@Example.COM")))
        assert run(store.get_user("u1")) == replace(user(), email="alice@example.com")
        assert run(store.get_user("u2")) is None

    def test_duplicate_email_in_another_case_is_value_error(self, store: Store) -> None:
        """A second user whose email differs only in case is a ValueError, and the first one stays."""
        first = user()
        run(store.add_user(first))
        with pytest.raises(ValueError, match="already exists"):
            run(store.add_user(user("u2", "ALICE@example.com")))
        assert run(store.get_user_by_email("alice@example.com")) == first
        assert run(store.list_users()) == [first]

    def test_duplicate_user_id_is_value_error(self, store: Store) -> None:
        """A second user with the same id is a ValueError."""
        run(store.add_user(user()))
        with pytest.raises(ValueError, match="already exists"):
            run(store.add_user(user(email="other@example.com")))
        assert run(store.get_user_by_email("other@example.com")) is None

    def test_set_password_replaces_the_hash(self, store: Store) -> None:
        """Setting a password returns the record with its new hash, as the store now keeps it."""
        run(store.add_user(user()))
        updated = run(store.set_user_password("u1", "$argon2id$new"))
        assert updated == replace(user(), password_hash="$argon2id$new")
        assert run(store.get_user_by_email("alice@example.com")) == updated

    def test_set_password_of_unknown_user_is_none(self, store: Store) -> None:
        """Setting the password of an unknown user returns ``None`` and creates nothing."""
        assert run(store.set_user_password("missing", "$argon2id$new")) is None
        assert run(store.list_users()) == []

    def test_list_is_oldest_first_and_filters_by_exact_membership(self, store: Store) -> None:
        """Users are listed by creation time; a tenant lists its members only, never a name it is part of."""
        run(store.add_user(user("u2", "b@example.com", minutes=2, tenants=("acme", 'odd "name"'))))
        run(store.add_user(user("u1", "a@example.com", minutes=1, tenants=("acme-b",))))
        run(store.add_user(user("u3", "c@example.com", minutes=3, tenants=("acme", "beta corp"))))
        assert [u.user_id for u in run(store.list_users())] == ["u1", "u2", "u3"]
        assert [u.user_id for u in run(store.list_users("acme"))] == ["u2", "u3"]
        assert [u.user_id for u in run(store.list_users("acme-b"))] == ["u1"]
        assert [u.user_id for u in run(store.list_users('odd "name"'))] == ["u2"]
        assert [u.user_id for u in run(store.list_users("beta"))] == []

    def test_disable_marks_the_user_and_keeps_the_first_time(self, store: Store) -> None:
        """Disabling returns the record as now kept, and disabling again leaves the first time in place."""
        run(store.add_user(user()))
        run(store.add_user(user("u2", "bob@example.com")))
        disabled = run(store.disable_user("u1", T0 + timedelta(hours=1)))
        assert disabled == replace(user(), disabled_at=T0 + timedelta(hours=1))
        assert run(store.disable_user("u1", T0 + timedelta(hours=2))) == disabled
        assert run(store.get_user_by_email("alice@example.com")) == disabled
        assert run(store.list_users()) == [disabled, user("u2", "bob@example.com")]

    def test_disable_unknown_user_is_none(self, store: Store) -> None:
        """Disabling an unknown user returns ``None`` and creates nothing."""
        assert run(store.disable_user("missing", T0)) is None
        assert run(store.list_users()) == []

    def test_user_needs_a_tenant(self) -> None:
        """A user record with no tenant cannot be made."""
        with pytest.raises(ValueError, match="at least one tenant"):
            user(tenants=())


class TestRecordsKeepHashesOut:
    """What a record's repr shows."""

    def test_reprs_name_no_hash(self, store: Store) -> None:
        """No record, consumption or rotation repr shows a secret, code, refresh token or password hash."""
        run(store.add_client(client()))
        run(store.add_code(code()))
        run(store.add_grant(grant(), h("r0")))
        run(store.add_user(user()))
        shown = [
            repr(run(store.get_client("mc_one"))),
            repr(run(store.consume_code(h("code-1"), T0))),
            repr(run(store.rotate_refresh(h("r0"), h("r1"), T0, NO_GRACE))),
            repr(run(store.get_user_by_email("alice@example.com"))),
        ]
        for hidden in (h("secret-of-mc_one"), h("code-1"), h("r0"), h("r1"), "hash-of-u1"):
            assert not any(hidden in text for text in shown), hidden
        assert "mc_one" in shown[0]
        assert "g-code-1" in shown[1]


class TestSQLiteOAuth:
    """What only SQLite promises: persistence, atomicity across threads and connections, failing closed."""

    def test_records_persist_across_reopen(self, tmp_path: Path) -> None:
        """Clients, codes, grants with their token history, users and spent tickets read back the same after reopening
        the file."""
        url = store_url("sqlite", tmp_path)
        first = open_store(url)
        run(first.add_client(client()))
        run(first.add_code(code()))
        run(first.consume_code(h("code-1"), T0))
        run(first.add_grant(grant(), h("r0")))
        rotated = run(first.rotate_refresh(h("r0"), h("r1"), T0, NO_GRACE)).grant
        run(first.add_user(user(email="Alice@Example.com")))
        run(first.spend_ticket(h("t1"), T0 + timedelta(minutes=5), T0))
        run(first.close())
        reopened = open_store(url)
        try:
            assert run(reopened.get_client("mc_one")) == client()
            assert run(reopened.consume_code(h("code-1"), T0)).outcome is CodeOutcome.REPLAYED
            assert run(reopened.get_grant("g1")) == rotated
            assert run(reopened.list_grants("acme")) == [rotated]
            assert run(reopened.get_user_by_email("alice@example.com")) == user()
            assert run(reopened.spend_ticket(h("t1"), T0 + timedelta(minutes=5), T0)) is False
            replayed = run(reopened.rotate_refresh(h("r0"), h("r2"), T0 + timedelta(seconds=1), NO_GRACE))
            assert replayed.outcome is RotationOutcome.REUSE_REVOKED
        finally:
            run(reopened.close())

    def test_oauth_tables_on_open(self, tmp_path: Path) -> None:
        """Opening creates the authorization server's tables and the tenant index of grants."""
        path = tmp_path / "s.db"
        run(open_store(f"sqlite:///{path}").close())
        with closing(sqlite3.connect(path)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            indexes = {row[1] for row in conn.execute("PRAGMA index_list(oauth_grants)")}
        expected = {"oauth_clients", "oauth_codes", "oauth_consent_tickets", "oauth_grants", "oauth_refresh_tokens"}
        assert expected | {"oauth_users"} <= tables
        assert "oauth_grants_by_tenant" in indexes

    @pytest.mark.threat("T-CODE-REPLAY")
    def test_code_replayed_from_threads_and_connections_has_one_fresh(self, tmp_path: Path) -> None:
        """20 threads, each with its own event loop, over 4 connections to one file: exactly one consume is FRESH."""
        url = store_url("sqlite", tmp_path)
        stores = [open_store(url) for _ in range(4)]
        try:
            run(stores[0].add_code(code()))
            outcomes = in_threads(
                [
                    lambda s=stores[i % 4]: run(s.consume_code(h("code-1"), T0 + timedelta(seconds=1))).outcome
                    for i in range(20)
                ]
            )
        finally:
            for opened in stores:
                run(opened.close())
        assert Counter(outcomes) == {CodeOutcome.FRESH: 1, CodeOutcome.REPLAYED: 19}

    @pytest.mark.threat("T-CONSENT-CSRF")
    def test_ticket_spent_from_threads_and_connections_has_one_winner(self, tmp_path: Path) -> None:
        """20 threads, each with its own event loop, over 4 connections to one file: exactly one spend is True."""
        url = store_url("sqlite", tmp_path)
        stores = [open_store(url) for _ in range(4)]
        expires = T0 + timedelta(minutes=5)
        try:
            spent = in_threads(
                [
                    lambda s=stores[i % 4]: run(s.spend_ticket(h("t1"), expires, T0 + timedelta(seconds=1)))
                    for i in range(20)
                ]
            )
        finally:
            for opened in stores:
                run(opened.close())
        assert Counter(spent) == {True: 1, False: 19}

    @pytest.mark.threat("T-REFRESH-REPLAY")
    @pytest.mark.parametrize("grace", [NO_GRACE, GRACE])
    def test_refresh_replayed_from_threads_and_connections_keeps_the_invariant(
        self, tmp_path: Path, grace: timedelta
    ) -> None:
        """20 threads over 4 connections refreshing one token: one ROTATED, and never two live tokens after."""
        url = store_url("sqlite", tmp_path)
        stores = [open_store(url) for _ in range(4)]
        at = T0 + timedelta(minutes=1)
        try:
            run(stores[0].add_grant(grant(), h("r0")))
            outcomes = in_threads(
                [
                    lambda s=stores[i % 4], i=i: run(s.rotate_refresh(h("r0"), h(f"n{i}"), at, grace)).outcome
                    for i in range(20)
                ]
            )
            issued = [h("r0")] + [h(f"n{i}") for i in range(20)]
            live = live_tokens(stores[1], tmp_path, issued, at + GRACE + TICK)
            family = run(stores[2].get_grant("g1"))
        finally:
            for opened in stores:
                run(opened.close())
        assert family is not None
        if grace:
            assert Counter(outcomes) == {RotationOutcome.ROTATED: 1, RotationOutcome.GRACE_REISSUED: 19}
            assert len(live) == 1
        else:
            assert Counter(outcomes) == {
                RotationOutcome.ROTATED: 1,
                RotationOutcome.REUSE_REVOKED: 1,
                RotationOutcome.REVOKED: 18,
            }
            assert family.revoked_reason == "reuse"
            assert live == []

    def test_grant_read_in_place_sees_the_latest_write(self, tmp_path: Path) -> None:
        """A grant read on the calling thread's read-only connection sees a revocation committed just before."""
        store = open_store(store_url("sqlite", tmp_path))
        try:
            run(store.add_grant(grant(), h("r0")))

            async def read_revoke_read() -> tuple[GrantRecord | None, GrantRecord | None]:
                before = await store.get_grant("g1")
                await store.revoke_grant("g1", T0, "revoked")
                return before, await store.get_grant("g1")

            before, after = run(read_revoke_read())
        finally:
            run(store.close())
        assert before is not None
        assert before.revoked_at is None
        assert after is not None
        assert after.revoked_at == T0

    @pytest.mark.threat("T-STORE-FAIL")
    def test_dropped_tables_refused_as_unavailable(self, tmp_path: Path) -> None:
        """With the grant and code tables dropped behind the store's back, every call is StorageUnavailable."""
        path = tmp_path / "s.db"
        store = open_store(f"sqlite:///{path}")
        try:
            with closing(sqlite3.connect(path)) as conn:
                conn.executescript("DROP TABLE oauth_refresh_tokens; DROP TABLE oauth_grants; DROP TABLE oauth_codes;")
            calls: list[Callable[[], Coroutine[Any, Any, object]]] = [
                lambda: store.get_grant("g1"),
                lambda: store.rotate_refresh(h("r0"), h("r1"), T0, NO_GRACE),
                lambda: store.grant_for_refresh(h("r0")),
                lambda: store.consume_code(h("code-1"), T0),
            ]
            for call in calls:
                with pytest.raises(StorageUnavailable):
                    run(call())
        finally:
            run(store.close())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_closed_store_refused_as_unavailable(self, tmp_path: Path) -> None:
        """After close, the hot-path grant read and a rotation are StorageUnavailable."""
        store = open_store(store_url("sqlite", tmp_path))
        run(store.close())
        with pytest.raises(StorageUnavailable):
            run(store.get_grant("g1"))
        with pytest.raises(StorageUnavailable):
            run(store.rotate_refresh(h("r0"), h("r1"), T0, NO_GRACE))
