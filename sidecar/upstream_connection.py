"""One HTTP/1.1 connection to the upstream and the response read on it, parsed by httptools (llhttp).

llhttp refuses what would let the sidecar and the upstream disagree on where an answer ends: a bad status
line or header, Content-Length beside Transfer-Encoding, two Content-Lengths, a length that is not a number.
This module adds what llhttp leaves to its caller: a cap on the bytes of the head, 1xx heads and chunked
trailers included, enforced as the bytes arrive (llhttp would keep one unfinished line however long it grew);
no body for an answer to HEAD; interim 1xx answers skipped, and refused if they claim content (RFC 9110 §15.2),
so that no byte of theirs joins the final answer; and a connection that carries any byte nobody asked for (a
second answer, a late body, one still waiting in the socket when the connection is next wanted) marked
unusable. Every such failure is an ``UpstreamUnavailable`` and closes the connection, so a desynchronised
connection is never reused. The pool (``upstream_pool.py``) writes requests and decides reuse.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any, cast

import httptools

from mcpguard import UpstreamTimeout, UpstreamUnavailable

__all__ = ["ClosedBeforeAnswer", "UpstreamConnection", "UpstreamResponse"]

# Above this many unread body bytes the socket is no longer read until the consumer drains to a quarter of it.
_HIGH_WATER = 256 * 1024
_LOW_WATER = _HIGH_WATER // 4
# Read and thrown away before closing an idle connection something arrived on, so that the close is orderly.
_DISCARD_BYTES = 64 * 1024


class ClosedBeforeAnswer(UpstreamUnavailable):
    """The upstream closed the connection after the request was written and before any byte of an answer."""


class _Desync(Exception):
    """A byte arrived that no request asked for; raised inside a parser callback to stop parsing."""


class UpstreamConnection(asyncio.Protocol):
    """A transport to the upstream, idle or carrying the one response being read on it."""

    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.response: UpstreamResponse | None = None
        self._drained: asyncio.Future[None] | None = None
        self._fd = -1
        self._waiting = select.poll()
        self._ssl_object: Any = None
        # When the connection last came back to the pool idle (the loop's clock).
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection gives a stream transport; uvloop's does not subclass asyncio.Transport.
        self.transport = cast("asyncio.Transport", transport)
        # Neither asyncio's nor uvloop's stand-in for the socket can recv(), so a MSG_PEEK is out of reach; polling
        # its descriptor costs one syscall and no copy of the socket. A poll object holds no kernel resource.
        self._fd = transport.get_extra_info("socket").fileno()
        self._waiting.register(self._fd, select.POLLIN)
        self._ssl_object = transport.get_extra_info("ssl_object")

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.abort()  # bytes on an idle connection answer nothing we sent: never reuse it
            return
        self.response.feed(data)

    def eof_received(self) -> bool:
        self.closed = True
        if self.response is not None:
            self.response.ended()
        return False  # close the transport: half-open connections are of no use to a client

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response.ended()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def usable(self) -> bool:
        """Whether a request may be written: open, and the upstream has not ended its side."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def quiet(self) -> bool:
        """Whether nothing has arrived unasked on this idle connection, not even bytes the loop has yet to read;
        if something has, the connection is closed."""
        # A loop kept busy has not read a stray answer that reached the socket meanwhile, and the next request
        # written here would take it for its own. Under TLS any pending record counts, a session ticket included.
        if self._waiting.poll(0):  # readable: bytes waiting, or the upstream closed or reset the connection
            # Read first: closed with bytes unread, the socket would reset the connection rather than end it.
            with suppress(OSError):
                os.read(self._fd, _DISCARD_BYTES)
            self.abort()
            return False
        if self._ssl_object is not None and self._ssl_object.pending():  # decrypted, and invisible to poll
            self.abort()
            return False
        return True

    async def write(self, data: bytes) -> bool:
        """Write ``data``, waiting while the upstream reads slower than we write; ``False`` when the answer (or its
        failure) came first, so the rest of the request is not to be sent and the connection not to be reused.

        The wait is bounded by the read timeout: an upstream that neither reads nor answers has not answered in time.
        """
        if not self.usable():
            raise ClosedBeforeAnswer("the upstream MCP server closed the connection")
        assert self.transport is not None  # noqa: S101  # usable() checked it
        self.transport.write(data)
        response = self.response
        if response is not None and response.answered():
            return False
        drained = self._drained
        if drained is None:
            return True
        waits: set[asyncio.Future[None]] = {drained}
        if response is not None:
            waits.add(response.answer_arrived)
        timeout = response.read_timeout if response is not None else None
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if response is not None and response.answered():
            return False
        if not drained.done():
            self.abort()
            raise UpstreamTimeout("the upstream MCP server did not read the request in time")
        return True

    def abort(self) -> None:
        """Close at once, dropping anything unsent: the connection's state can no longer be trusted."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The upstream's answer to one request: status and raw headers once the head is in, then the body."""

    def __init__(
        self,
        connection: UpstreamConnection,
        head_only: bool,
        read_timeout: float,
        done: Callable[[UpstreamConnection, bool], None],
    ) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_type = ""
        self._connection = connection
        self._head_only = head_only
        self._read_timeout = read_timeout
        self._done: Callable[[UpstreamConnection, bool], None] | None = done
        self._parser: Any = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._unfinished = 0
        self._in_trailers = False
        self._body_fed = False
        self._interim = False
        self._started = False
        self._until_close = False
        self._keep_alive = False
        self._complete = False
        self._error: UpstreamUnavailable | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        # Once reading was paused, bytes that came meanwhile may sit where no check before reuse can see them
        # (in the TLS layer's buffer), so such a connection is not reused: rare, as only large answers pause it.
        self._was_paused = False
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter: asyncio.Future[None] | None = None
        # Whether every byte of the request went out before the answer came: an upstream that answered early may
        # read what we never sent as the start of the next request, so only then is the connection reused.
        self.request_sent = False

    @property
    def read_timeout(self) -> float:
        """How long any wait on this answer may take."""
        return self._read_timeout

    @property
    def answer_arrived(self) -> asyncio.Future[None]:
        """Done once the head of the final answer is in, or the answer failed."""
        return self._head

    def answered(self) -> bool:
        """Whether the head of the final answer is in, or the answer failed, already."""
        return self._head.done()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Desync
        # "HTTP/1.1 100 \r\n" and the blank line: charged here, since llhttp reports no status for a head with no
        # reason phrase, and a flood of such 1xx heads would otherwise cost nothing.
        self._count(17)

    def on_status(self, reason: bytes) -> None:
        self._count(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if not self._head.done():  # after the head they are chunked trailers, which we do not relay
            self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue, 103 Early Hints: not the answer; a 101 makes llhttp raise HttpParserUpgrade. llhttp would
            # read a body (and trailers) the 1xx framed, and they would join the final answer.
            if any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self.raw_headers):
                self._fail(UpstreamUnavailable("the upstream MCP server sent an interim answer with content"))
                raise _Desync
            self._interim = True
            self.raw_headers = []
            return
        if status < 100:
            # No status below 100 exists (RFC 9110 §15): llhttp reads one as final, a peer may read it otherwise.
            self._fail(UpstreamUnavailable("the upstream MCP server answered malformed HTTP"))
            raise _Desync
        self.status = status
        framing: dict[bytes, bytes] = {}
        for name, value in self.raw_headers:
            lowered = name.lower()
            if lowered in (b"content-length", b"transfer-encoding", b"content-type"):
                framing[lowered] = value
        if b"content-length" in framing:
            self.content_length = int(framing[b"content-length"])  # llhttp accepted it: digits only
        self.content_type = framing.get(b"content-type", b"").split(b";", 1)[0].strip().lower().decode("latin-1")
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = (
            not self._head_only
            and status not in (204, 304)
            and b"content-length" not in framing
            and not framing.get(b"transfer-encoding", b"").lower().rstrip().endswith(b"chunked")
        )
        self._head.set_result(None)
        if self._head_only:
            # llhttp would wait for the body the length announces; an answer to HEAD has none (RFC 9110 §9.3.2).
            self._complete = True

    def on_chunk_header(self) -> None:
        # What follows is the chunk's data, or the trailers if this was the last chunk: a feed that brings no data
        # (on_body) is all trailers.
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        if self._complete:
            raise _Desync
        self._in_trailers, self._body_fed = False, True
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self._connection.transport is not None:
            self._paused = self._was_paused = True
            self._connection.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._complete:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
            self._wake()

    # fed by the connection

    def feed(self, data: bytes) -> None:
        if not self._started and data[:1] in (b"\r", b"\n"):
            # llhttp skips blank lines before a status line without a word: they are the tail of some other answer,
            # framed otherwise than we read it, so this one is refused.
            self._started = True
            self._fail(UpstreamUnavailable("the upstream MCP server answered malformed HTTP"))
            return
        self._started = True
        in_trailers, self._body_fed = self._in_trailers, False
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(UpstreamUnavailable("the upstream MCP server answered malformed HTTP"))
            return
        # llhttp keeps a header or trailer line until it ends, however long, and reports it only then: a feed that
        # fell wholly inside the head or the trailers is counted whole as it arrives, so one endless line meets the
        # cap too. (Chunk extensions, which llhttp skips without keeping, are not counted.)
        if not self._head.done() or (in_trailers and not self._body_fed and not self._complete):
            self._unfinished += len(data)
            if self._unfinished > self._connection.max_head_bytes:
                self._fail(UpstreamUnavailable("the upstream MCP server sent more header bytes than the cap"))

    def ended(self) -> None:
        """The upstream closed the connection: the end of a body delimited by close, else a broken answer."""
        if self._complete or self._error is not None:
            return
        if self._head.done() and self._until_close:
            self._complete = True
            self._keep_alive = False
            self._wake()
        elif self._started:
            self._fail(UpstreamUnavailable("the upstream MCP server broke off its answer"))
        else:
            self._fail(ClosedBeforeAnswer("the upstream MCP server closed the connection without answering"))

    # read by the consumer

    async def head(self) -> None:
        """Wait for the status line and headers of the final answer."""
        if not self._head.done():
            await self._wait(self._head)
        if self._error is not None and self.status == 0:
            raise self._error

    async def read_some(self) -> bytes:
        """The body bytes that have arrived (waiting for some if none have), ``b""`` once it is complete."""
        while not self._chunks:
            if self._complete:
                return b""  # even if bytes nobody asked for followed: the answer itself is whole
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._wait(self._waiter)
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self._connection.transport is not None:
            self._paused = False
            self._connection.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.read_some():
            parts.append(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        """Whether the body is complete and every byte of it has been read."""
        return self._complete and not self._chunks

    def release(self) -> None:
        """Hand the connection back: to the pool if the answer was read to its end and the connection may carry
        another, else closed. Idempotent."""
        if self._done is None:
            return
        done, self._done = self._done, None
        reusable = (
            self.request_sent
            and self.at_eof()
            and self._keep_alive
            and self._error is None
            and not self._was_paused
            and self._connection.usable()
        )
        # The parser holds us and we hold it: dropping it leaves nothing for the cycle collector.
        self._connection.response, self._parser = None, None
        if not reusable:
            self._connection.abort()
        done(self._connection, reusable)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._connection.max_head_bytes:
            self._fail(UpstreamUnavailable("the upstream MCP server sent more header bytes than the cap"))
            raise _Desync

    def _fail(self, error: UpstreamUnavailable) -> None:
        if self._error is None:
            self._error = error
        self._connection.abort()
        if not self._head.done():
            self._head.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, future: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self._read_timeout):
                await future
        except TimeoutError:
            self._connection.abort()
            raise UpstreamTimeout("the upstream MCP server did not answer in time") from None
