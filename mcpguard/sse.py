"""Incremental splitting of a ``text/event-stream`` body into whole events, bytes kept as they came."""

from __future__ import annotations

import re

__all__ = ["EventSplitter", "event_data"]

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Feed chunks in, get back every complete event (with its terminating blank line)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete events that ``chunk`` finishes, in order."""
        data = self._pending + chunk
        events: list[bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
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
        line = raw.decode("utf-8", "replace")
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    return kind, ("\n".join(data) if data else None)
