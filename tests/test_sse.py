"""EventSplitter and event_data: whole server-sent events out of arbitrary chunks, bytes untouched."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpguard.sse import EventSplitter, event_data

TERMINATORS = (b"\n", b"\r\n", b"\r")
LINE_END = re.compile(rb"\r\n|\r|\n")

# One event per line-ending style, with multi-line data, a comment and a non-UTF-8 byte.
STREAM = (
    b'event: message\ndata: {"a":\ndata: 1}\n\n'
    b": keep-alive\r\ndata: two\r\n\r\n"
    b"id: 3\rdata: \xff three\r\r"
    b"data: four\n\n"
)
EVENTS = [
    b'event: message\ndata: {"a":\ndata: 1}\n\n',
    b": keep-alive\r\ndata: two\r\n\r\n",
    b"id: 3\rdata: \xff three\r\r",
    b"data: four\n\n",
]

line_bytes = st.binary(min_size=1, max_size=16).map(lambda b: b.replace(b"\r", b"r").replace(b"\n", b"n"))
events = st.builds(
    lambda lines, end: end.join(lines) + end + end,
    st.lists(line_bytes, min_size=1, max_size=4),
    st.sampled_from(TERMINATORS),
)
noisy_bytes = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"data: x", b":", b"\xff", b" "]), max_size=40).map(
    b"".join
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[list[bytes], EventSplitter]:
    """Feed ``data`` split at ``cuts``; every event emitted along the way, and the splitter."""
    splitter = EventSplitter()
    emitted: list[bytes] = []
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        emitted.extend(splitter.feed(data[start:end]))
    return emitted, splitter


def ends_with_blank_line(event: bytes) -> bool:
    """Whether ``event``'s last line is empty, reading CRLF as one line ending."""
    lines = LINE_END.split(event)
    return len(lines) >= 2 and lines[-1] == lines[-2] == b""


def cuts_within(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=0, max_value=len(data)), max_size=8)


class TestEventSplitter:
    def test_whole_stream_in_one_chunk(self) -> None:
        """A stream fed at once comes back as its events, each with its own line-ending style."""
        splitter = EventSplitter()
        assert splitter.feed(STREAM) == EVENTS
        assert splitter.rest() == b""

    @pytest.mark.parametrize("offset", range(len(STREAM) + 1))
    def test_split_at_every_offset(self, offset: int) -> None:
        """Cutting the stream in two at any byte gives the same events as feeding it whole."""
        emitted, splitter = feed_in_pieces(STREAM, [offset])
        assert emitted == EVENTS
        assert splitter.rest() == b""

    def test_split_at_every_pair_of_offsets(self) -> None:
        """Cutting the stream in three at any two bytes (CR and LF of one CRLF apart included) changes nothing."""
        for first in range(len(STREAM) + 1):
            for second in range(first, len(STREAM) + 1):
                assert feed_in_pieces(STREAM, [first, second])[0] == EVENTS, (first, second)

    def test_one_byte_at_a_time(self) -> None:
        """Fed a byte at a time, each event is emitted when its blank line completes (a final CR one byte later,
        since it may be the start of a CRLF)."""
        splitter = EventSplitter()
        emitted: list[bytes] = []
        for index in range(len(STREAM)):
            got = splitter.feed(STREAM[index : index + 1])
            assert len(got) <= 1
            if got:
                seen = STREAM[: index + 1]
                assert seen.endswith(got[0]) or (got[0].endswith(b"\r") and seen[:-1].endswith(got[0]))
            emitted.extend(got)
        assert emitted == EVENTS

    @pytest.mark.parametrize(
        ("stream", "expected"),
        [
            (b"data: a\n\ndata: b\n\n", [b"data: a\n\n", b"data: b\n\n"]),
            (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]),
            (b"data: a\r\rdata: b\r\r", [b"data: a\r\r", b"data: b\r\r"]),
            (b"data: a\r\n\ndata: b\n\n", [b"data: a\r\n\n", b"data: b\n\n"]),
        ],
        ids=["lf", "crlf", "cr", "crlf-then-lf"],
    )
    def test_boundaries_in_each_line_ending(self, stream: bytes, expected: list[bytes]) -> None:
        """A blank line ends an event whether lines end in LF, CRLF or CR (a final CR at end of stream)."""
        splitter = EventSplitter()
        assert splitter.feed(stream) + splitter.close() == expected

    def test_single_crlf_is_not_a_boundary(self) -> None:
        """One CRLF ends a line, not an event: its CR and LF are not two line endings."""
        splitter = EventSplitter()
        assert splitter.feed(b"data: a\r\ndata: b\r\n") == []
        assert splitter.feed(b"\r\n") == [b"data: a\r\ndata: b\r\n\r\n"]

    def test_incomplete_event_is_held_back(self) -> None:
        """Bytes without a closing blank line wait in ``rest`` and count in ``pending_size``."""
        splitter = EventSplitter()
        assert splitter.feed(b"data: a\n\ndata: b\n") == [b"data: a\n\n"]
        assert splitter.rest() == b"data: b\n"
        assert splitter.pending_size == len(b"data: b\n")

    def test_held_back_bytes_join_the_next_chunk(self) -> None:
        """Once its blank line arrives, a held-back event is emitted whole and nothing is pending."""
        splitter = EventSplitter()
        splitter.feed(b"data: partial")
        assert splitter.feed(b" end\n\n") == [b"data: partial end\n\n"]
        assert splitter.pending_size == 0

    def test_empty_chunk_emits_nothing(self) -> None:
        """Feeding no bytes changes nothing."""
        splitter = EventSplitter()
        splitter.feed(b"data: x")
        assert splitter.feed(b"") == []
        assert splitter.rest() == b"data: x"

    @settings(max_examples=150)
    @given(data=st.data(), generated=st.lists(events, max_size=6))
    def test_generated_events_come_back_as_sent(self, data: st.DataObject, generated: list[bytes]) -> None:
        """Events in any line-ending style, cut anywhere, come back exactly as they were written."""
        stream = b"".join(generated)
        emitted, splitter = feed_in_pieces(stream, data.draw(cuts_within(stream)))
        assert emitted + splitter.close() == generated
        assert splitter.rest() == b""

    @settings(max_examples=200)
    @given(data=st.data(), stream=noisy_bytes)
    def test_no_byte_is_lost_or_reordered(self, data: st.DataObject, stream: bytes) -> None:
        """For any bytes cut anywhere, the events plus the rest are the input, each event ends in a blank line."""
        emitted, splitter = feed_in_pieces(stream, data.draw(cuts_within(stream)))
        assert b"".join(emitted) + splitter.rest() == stream
        assert all(ends_with_blank_line(event) for event in emitted)
        assert emitted == EventSplitter().feed(stream)

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize(
        "first",
        [b"data: 1\n\r\n", b"data: 1\n\r", b"data: 1\r\n\r"],
        ids=["lf-then-crlf", "lf-then-cr", "crlf-then-cr"],
    )
    def test_mixed_line_endings_end_an_event(self, first: bytes) -> None:
        """Any line ending followed by an empty line ends the event, as an SSE client reads the stream."""
        second = b"data: 2\n\n"
        emitted = EventSplitter().feed(first + second)
        assert emitted == [first, second]
        assert [event_data(event) for event in emitted] == [(None, "1"), (None, "2")]


class TestEventData:
    def test_multi_line_data_is_joined_with_newlines(self) -> None:
        """Each ``data`` line is one line of the event's data."""
        assert event_data(b'data: {"a":\ndata: 1}\n\n') == (None, '{"a":\n1}')

    def test_comments_are_ignored(self) -> None:
        """Lines starting with a colon are comments, contributing neither type nor data."""
        assert event_data(b": data: no\ndata: yes\n: event: no\n\n") == (None, "yes")

    def test_event_type_is_read(self) -> None:
        """The ``event`` field names the event's type."""
        assert event_data(b"event: message\ndata: x\n\n") == ("message", "x")

    def test_last_event_field_wins(self) -> None:
        """With several ``event`` lines the last one is the type, as a client dispatches it."""
        assert event_data(b"event: a\nevent: b\ndata: x\n\n") == ("b", "x")

    def test_event_without_data(self) -> None:
        """An event with no ``data`` line has no data (and a client would not dispatch it)."""
        assert event_data(b"event: ping\n: only a comment\n\n") == ("ping", None)

    def test_empty_data_line_is_empty_data(self) -> None:
        """``data:`` with nothing after it is data, just empty."""
        assert event_data(b"data:\n\n") == (None, "")

    def test_field_without_colon_has_empty_value(self) -> None:
        """A bare ``data`` line is the field with an empty value."""
        assert event_data(b"data\ndata: x\n\n") == (None, "\nx")

    def test_only_one_leading_space_is_dropped(self) -> None:
        """One space after the colon is separator; any further space is part of the value."""
        assert event_data(b"data:x\ndata:  y\n\n") == (None, "x\n y")

    def test_other_fields_are_ignored(self) -> None:
        """``id``, ``retry`` and unknown fields carry no data."""
        assert event_data(b"id: 7\nretry: 10\nfoo: bar\ndata: x\n\n") == (None, "x")

    def test_field_names_are_case_sensitive(self) -> None:
        """``Data`` and ``EVENT`` are not the ``data`` and ``event`` fields."""
        assert event_data(b"Data: x\nEVENT: y\n\n") == (None, None)

    @pytest.mark.parametrize("end", TERMINATORS, ids=["lf", "crlf", "cr"])
    def test_every_line_ending_separates_fields(self, end: bytes) -> None:
        """LF, CRLF and CR each end a line of the event."""
        event = end.join([b"event: e", b"data: a", b"data: b"]) + end + end
        assert event_data(event) == ("e", "a\nb")

    def test_invalid_utf8_is_replaced_not_raised(self) -> None:
        """Bytes that are not UTF-8 decode to U+FFFD, as a client decodes them."""
        assert event_data(b"data: \xff\n\n") == (None, "\ufffd")

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    def test_empty_event_field_reads_as_a_message(self) -> None:
        """``event:`` with no value leaves the type empty, which a client dispatches as a ``message``."""
        kind, data = event_data(b"event:\ndata: x\n\n")
        assert kind in (None, "message")
        assert data == "x"
