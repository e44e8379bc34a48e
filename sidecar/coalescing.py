"""The sidecar's HTTP/1.1 server protocol: uvicorn's httptools protocol, a response's head and body in one write.

uvicorn hands a response's head to the socket as soon as the app starts the response, and its body as a
second write. Over loopback each write wakes the client at once, so a small answer cost the client two
wake-ups, and the sidecar a pre-emption each time the client ran on its CPU. Here a response head is held
back until the next write on its connection, which takes it along, or at the latest until the end of the
event loop's pass: a head and a body sent together leave together, and a stream's head leaves within the pass
even when its first chunk comes much later.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol"]


def _is_head(data: bytes | bytearray | memoryview) -> bool:
    # uvicorn writes a head whole, in one write. A body chunk that happens to look like one is merely held too.
    return bytes(data[:5]) == b"HTTP/" and bytes(data[-4:]) == b"\r\n\r\n"


class _CoalescingTransport(asyncio.Transport):
    """A connection's transport that holds a response head back for the write that follows it."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif _is_head(data):
            self._held = bytes(data)
            self._loop.call_soon(self._flush)
            return
        if data:
            self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if self._held is None:
            return  # taken along by a later write, or by close() or write_eof(), or dropped by abort()
        data, self._held = self._held, None
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol writing each connection through a coalescing transport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's transport (uvloop's is not an asyncio.Transport subclass, but has its methods).
        stream = cast(asyncio.Transport, transport)
        super().connection_made(_CoalescingTransport(stream, asyncio.get_running_loop()))
