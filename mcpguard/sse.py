"""Incremental splitting of a ``text/event-stream`` body into whole events, bytes kept as they came, and
writing one."""

from __future__ import annotations

import re

__all__ = ["EventSplitter", "event_bytes", "event_data", "event_with_data"]

# SSE lines end in CRLF, LF or CR, mixed freely; an empty line ends an event.
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Feed chunks in, get back every complete event (with its terminating blank line), scanning each
    byte once. A CR at the end of a chunk waits for the next byte, since it may begin a CRLF."""

    def __init__(self) -> None:
        self._pending = b""
        self._scanned = 0
        self._line_start = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete events that ``chunk`` finishes, in order."""
        return self._scan(self._pending + chunk, final=False)

    def close(self) -> list[bytes]:
        """At end of stream: the events a final CR completes, then any unfinished tail as one last piece."""
        events = self._scan(self._pending, final=True)
        tail, self._pending, self._scanned, self._line_start = self._pending, b"", 0, 0
        return [*events, tail] if tail else events

    def _scan(self, data: bytes, *, final: bool) -> list[bytes]:
        scanned, line_start, event_start = len(data), self._line_start, 0
        events: list[bytes] = []
        for match in _LINE.finditer(data, self._scanned):
            if not final and match.group() == b"\r" and match.end() == len(data):
                scanned = match.start()
                break
            if match.start() == line_start:
                events.append(data[event_start : match.end()])
                event_start = match.end()
            line_start = match.end()
        self._pending = data[event_start:]
        self._scanned = scanned - event_start
        self._line_start = line_start - event_start
        return events

    def rest(self) -> bytes:
        """What was fed but never completed an event."""
        return self._pending

    @property
    def pending_size(self) -> int:
        """Bytes held back waiting for an event boundary."""
        return len(self._pending)


def event_data(event: bytes) -> tuple[str | None, str | None]:
    """The event's type and its joined ``data`` lines (``None`` when it has none)."""
    kind: str | None = None
    data: list[str] = []
    for raw in _LINE.split(event):
        # A byte order mark before a field is skipped, as EventSource readers skip one at the start of a stream.
        line = raw.decode("utf-8", "replace").removeprefix("\ufeff")
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value or None  # an empty type is dispatched as the default, "message"
        elif name == "data":
            data.append(value)
    return kind, ("\n".join(data) if data else None)


def event_bytes(kind: str | None, data: bytes) -> bytes:
    """One event of type ``kind`` (``None``: the default type) whose data is ``data``, a single line."""
    head = b"event: " + kind.encode() + b"\r\n" if kind else b""
    return head + b"data: " + data + b"\r\n\r\n"


def event_with_data(event: bytes, data: bytes) -> bytes:
    """``event`` with its data lines replaced by one line holding ``data``, where the first of them was; every
    other line (its type, ``id``, ``retry``, comments) kept as it came, so a client can still resume the stream."""
    lines: list[bytes] = []
    placed = False
    for line in _LINE.split(event):
        if not line:
            continue
        if line.removeprefix(b"\xef\xbb\xbf").split(b":", 1)[0] == b"data":
            if not placed:
                lines.append(b"data: " + data)
                placed = True
            continue
        lines.append(line)
    if not placed:
        lines.append(b"data: " + data)
    return b"\r\n".join(lines) + b"\r\n\r\n"
