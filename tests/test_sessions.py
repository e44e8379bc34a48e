"""Session bindings in this process: bounded in all and per owner, so one principal cannot push out the rest."""

from __future__ import annotations

import asyncio

import pytest

from mcpguard.sessions import MemorySessionBindings


@pytest.mark.threat("T-SESSION-HIJACK")
def test_an_owner_opening_sessions_by_the_thousand_pushes_out_only_its_own() -> None:
    """With room for 100 bindings (10 per owner), a flooding owner keeps its 10 newest, and every other owner's
    session stays bound to that owner: none is forgotten (a 404 to its owner) to make room for the flood."""

    async def run() -> None:
        bindings = MemorySessionBindings(max_sessions=100)
        for victim in range(9):
            await bindings.bind(f"victim-{victim}", f"owner-{victim}")
        for index in range(5000):
            await bindings.bind(f"flood-{index}", "flooder")
        for victim in range(9):
            assert await bindings.owner(f"victim-{victim}") == f"owner-{victim}"
        kept = [index for index in range(5000) if await bindings.owner(f"flood-{index}") == "flooder"]
        assert kept == list(range(4990, 5000))

    asyncio.run(run())


def test_bindings_are_forgotten_when_unbound_idle_or_rebound() -> None:
    """Unbinding, idling past the TTL and binding an id afresh each leave exactly one live owner or none."""
    now = [0.0]

    async def run() -> None:
        bindings = MemorySessionBindings(idle_ttl=10, max_sessions=100, clock=lambda: now[0])
        await bindings.bind("s1", "a")
        await bindings.bind("s2", "a")
        await bindings.unbind("s1")
        assert await bindings.owner("s1") is None
        now[0] = 5
        assert await bindings.owner("s2") == "a"  # used: its idle time starts over
        now[0] = 14
        assert await bindings.owner("s2") == "a"
        now[0] = 30
        assert await bindings.owner("s2") is None
        await bindings.bind("s3", "a")
        await bindings.bind("s3", "b")
        assert await bindings.owner("s3") == "b"
        for index in range(10):
            await bindings.bind(f"b-{index}", "b")
        assert await bindings.owner("s3") is None  # b's oldest, pushed out by b's own eleventh

    asyncio.run(run())
