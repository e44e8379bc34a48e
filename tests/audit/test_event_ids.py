"""Audit entry ids: 26 Crockford base32 digits that sort by time and do not repeat."""

from __future__ import annotations

from mcpguard.audit import new_event_id

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def value_of(event_id: str) -> int:
    value = 0
    for digit in event_id:
        value = value * 32 + CROCKFORD.index(digit)
    return value


def test_id_carries_its_millisecond_then_80_random_bits() -> None:
    """The top 48 bits are the time in milliseconds, and the two bits above them are zero."""
    now = 1_764_620_000.123
    for _ in range(2000):
        event_id = new_event_id(now)
        assert len(event_id) == 26
        assert set(event_id) <= set(CROCKFORD)
        assert value_of(event_id) >> 80 == int(now * 1000)
        assert value_of(event_id) < 2**128


def test_ids_sort_by_time_and_never_repeat() -> None:
    """Ids of later milliseconds sort after earlier ones; many in one millisecond are still all different."""
    spaced = [new_event_id(1_764_620_000 + k * 0.002) for k in range(2000)]
    assert spaced == sorted(spaced)
    same_millisecond = {new_event_id(1_764_620_000.5) for _ in range(20_000)}
    assert len(same_millisecond) == 20_000
    random_part = {value_of(event_id) & (2**80 - 1) for event_id in same_millisecond}
    assert len(random_part) == 20_000
    # Every one of the 80 random bits varies: none is stuck at 0 or 1.
    for bit in range(80):
        assert len({(part >> bit) & 1 for part in random_part}) == 2
