"""Attacks on the sidecar's own upstream pool: a hostile or buggy upstream sending exact bytes on 127.0.0.1, and
client requests crafted to split or replay what the proxy writes upstream."""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from mcpguard import UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy import ProxySettings, UpstreamProxy
from sidecar.upstream_pool import UpstreamPool
from tests.sidecar.test_upstream_pool import read_request, self_signed

Behaviour = Callable[["Wire", asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


def answer(body: bytes, *extra: bytes) -> bytes:
    """A well-framed 200 carrying ``body``, with ``extra`` header lines."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in extra)
    return head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


def header(request: bytes, name: bytes) -> bytes:
    for line in request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


async def echo(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    """Answer with the request's own x-id, so a misrouted answer shows."""
    writer.write(answer(ident))
    await writer.drain()
    return True


async def hold(reader: asyncio.StreamReader) -> bool:
    """Keep the connection until the client closes it (reading, so its close is seen at once)."""
    with suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return False


def raw(data: bytes, keep: bool = True) -> Behaviour:
    """Send exactly ``data``; then read the next request (keep) or hold until the client closes."""

    async def behaviour(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
        writer.write(data)
        await writer.drain()
        return keep or await hold(reader)

    return behaviour


def closing(data: bytes) -> Behaviour:
    """Send exactly ``data`` and close the connection."""

    async def behaviour(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
        writer.write(data)
        await writer.drain()
        return False

    return behaviour


def then(first: bytes, delay: float, later: bytes) -> Behaviour:
    """Send ``first``, and ``later`` after ``delay`` seconds whatever the client does meanwhile."""

    async def behaviour(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(delay)
        writer.write(later)
        await writer.drain()
        return True

    return behaviour


def trickled(data: bytes, size: int, pause: float) -> Behaviour:
    """Send ``data`` in pieces of ``size`` bytes, ``pause`` seconds apart."""

    async def behaviour(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
        for start in range(0, len(data), size):
            writer.write(data[start : start + size])
            await writer.drain()
            await asyncio.sleep(pause)
        return True

    return behaviour


async def hang_up(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    writer.transport.abort()
    return False


async def stall(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    return await hold(reader)


async def staged(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    """The echo answer in five pieces a few milliseconds apart, so a cancellation can land between any two."""
    data = answer(ident)
    cuts = [0, 9, 17, len(data) - len(ident) - 2, len(data) - len(ident), len(data) - 1, len(data)]
    for start, end in itertools.pairwise(cuts):
        writer.write(data[start:end])
        await writer.drain()
        await asyncio.sleep(0.002)
    return True


async def trickle_forever(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    """An event stream that sends a keep-alive comment every 50 ms until the client leaves."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    with suppress(ConnectionError):
        while not writer.is_closing() and not reader.at_eof():
            writer.write(b"3\r\n:\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
    return False


async def barrier(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
    """Answer 200 only once ``wire.barrier_size`` requests are in at the same time, else 504 after 2 s."""
    wire.arrived += 1
    wire.open_at_barrier = max(wire.open_at_barrier, wire.open)
    if wire.arrived >= wire.barrier_size:
        wire.barrier_full.set()
    try:
        await asyncio.wait_for(wire.barrier_full.wait(), 2)
    except TimeoutError:
        writer.write(b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\n\r\n")
    else:
        writer.write(answer(ident))
    await writer.drain()
    return True


@dataclass
class Wire:
    """A raw upstream that runs, for each request it reads, the behaviour its x-mode header names (the echo by
    default). Counts connections accepted, those open now and the most open at once, and records every request."""

    behaviours: dict[bytes, Behaviour] = field(default_factory=dict)
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    peak: int = 0
    origin: str = ""
    barrier_size: int = 0
    arrived: int = 0
    open_at_barrier: int = 0
    barrier_full: asyncio.Event = field(default_factory=asyncio.Event)

    readers: list[asyncio.StreamReader] = field(default_factory=list)

    @property
    def open(self) -> int:
        """Connections the client has not closed: their reader has seen neither an end nor a reset."""
        return sum(r.exception() is None and not r._eof for r in self.readers)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.readers.append(reader)
        for _ in range(3):  # let a close the client made before this connect be seen first
            await asyncio.sleep(0)
        self.peak = max(self.peak, self.open)
        try:
            while True:
                request = await read_request(reader)
                self.requests.append(request)
                behaviour = self.behaviours.get(header(request, b"x-mode"), echo)
                if not await behaviour(self, reader, writer, header(request, b"x-id")):
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def wire(**behaviours: Behaviour) -> AsyncIterator[Wire]:
    state = Wire({name.replace("_", "-").encode(): b for name, b in behaviours.items()})
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield state


async def fetch(
    pool: UpstreamPool, mode: str = "", ident: str = "", method: str = "GET", body: Any = None
) -> tuple[int, bytes]:
    headers = [(b"x-mode", mode.encode()), (b"x-id", ident.encode())]
    response = await pool.request(method, "/mcp", headers, body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def outcome(attempt: Awaitable[Any], within: float = 5.0) -> Any:
    """What ``attempt`` gave: its value, the name of the error it raised, or that it was still waiting."""
    try:
        return await asyncio.wait_for(attempt, within)
    except (UpstreamUnavailable, UpstreamTimeout) as error:
        return type(error).__name__
    except TimeoutError:
        return f"still waiting after {within} s"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


# Desynchronisation: bytes the upstream sends that no request asked for.


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_second_answer_arriving_while_the_first_is_read_closes_the_connection() -> None:
    """A second answer arriving while the first is still being read never reaches the next request."""

    async def test() -> None:
        first = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"
        smuggled = b"cd" + answer(b"smuggled")
        async with wire(split=then(first, 0.05, smuggled)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"split")])
            assert await response.read() == b"abcd"
            await asyncio.sleep(0.05)
            response.release()
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "late",
    [b"x", b"\r\n", b"tail of a body longer than its length", answer(b"smuggled")],
    ids=["one-byte", "crlf", "long-body", "whole-answer"],
)
def test_late_bytes_on_an_idle_connection_get_it_closed(late: bytes) -> None:
    """Bytes arriving after the answer was read and released (a body longer than its length, a late answer)
    get the idle connection dropped; the next request goes on a new one and gets its own answer."""

    async def test() -> None:
        async with wire(late=then(answer(b"ok"), 0.05, late)) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, "late") == (200, b"ok")
            await asyncio.sleep(0.2)
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


def _late_answer_server(listener: socket.socket, seen: list[bytes]) -> None:
    """Thread: answer request 1, send a stray answer 20 ms later, then echo what the next request asks for."""
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(5)
        for number in range(2):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
            seen.append(data)
            if number == 0:
                connection.sendall(answer(b"1"))
                time.sleep(0.02)
                connection.sendall(answer(b"stale"))
            else:
                connection.sendall(answer(header(data, b"x-id")))


def busy(seconds: float) -> None:
    """CPU work on the event loop's thread (a large tools/list being filtered), not yielding to the loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_stray_answer_waiting_in_the_socket_is_never_taken_for_the_next_request() -> None:
    """An answer nobody asked for that reached the socket while the loop was busy is never handed to the next
    request reusing that connection (it would get another exchange's answer)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    thread = threading.Thread(target=_late_answer_server, args=(listener, seen), daemon=True)
    thread.start()

    async def test() -> None:
        pool = UpstreamPool(f"http://127.0.0.1:{listener.getsockname()[1]}", read_timeout=2)
        assert await fetch(pool, ident="1") == (200, b"1")
        busy(0.2)  # the stray answer lands in the socket buffer meanwhile; the loop has not read it
        second = await outcome(fetch(pool, ident="2"), 3)
        await pool.close()
        assert second != (200, b"stale")

    try:
        run(test)
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_answer_split_into_one_byte_packets_parses_and_the_connection_is_reused() -> None:
    """A head and body sent one byte per packet parse to the same answer and the connection is reused."""

    async def test() -> None:
        data = answer(b"split", b"X-A: 1", b"X-B: two words")
        async with wire(tiny=trickled(data, 1, 0.0005)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"tiny")])
            assert response.raw_headers == [(b"X-A", b"1"), (b"X-B", b"two words"), (b"Content-Length", b"5")]
            assert await response.read() == b"split"
            response.release()
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 1

    run(test)


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_head_cap_holds_across_many_small_packets() -> None:
    """A head over the cap is refused even when each packet is small and each header line short."""

    async def test() -> None:
        lines = [b"X-%d: %s" % (n, b"v" * 40) for n in range(2000)]
        async with wire(big=trickled(answer(b"ok", *lines), 4096, 0)) as server:
            pool = UpstreamPool(server.origin, max_head_bytes=16 * 1024)
            assert await outcome(fetch(pool, "big")) == "UpstreamUnavailable"
            await pool.close()

    run(test)


def _unterminated(prefix: bytes) -> Behaviour:
    """``prefix`` then 4 MB of one line that never ends, then silence until the client leaves."""

    async def behaviour(wire: Wire, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: bytes) -> bool:
        writer.write(prefix)
        for _ in range(64):
            if writer.is_closing():
                break
            writer.write(b"a" * 65536)
            with suppress(ConnectionError):
                await writer.drain()
        return await hold(reader)

    return behaviour


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
@pytest.mark.parametrize(
    "prefix",
    [
        b"HTTP/1.1 200 OK\r\nX-Long: ",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: ",
        b"HTTP/1.1 200 ",
    ],
    ids=["header-value", "trailer-value", "reason-phrase"],
)
def test_one_endless_head_line_is_refused_at_the_cap_not_buffered(prefix: bytes) -> None:
    """A header, trailer or reason line that never ends is refused once it passes the head cap, as it arrives;
    it is not buffered (and re-copied) until its end or the read timeout."""

    async def test() -> None:
        async with wire(endless=_unterminated(prefix)) as server:
            pool = UpstreamPool(server.origin, max_head_bytes=64 * 1024, read_timeout=1.5)
            assert await outcome(fetch(pool, "endless")) == "UpstreamUnavailable"
            await pool.close()

    run(test)


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 100\r\n\r\n", b"HTTP/1.1 103 \r\n\r\n"],
    ids=["with-reason", "no-reason", "empty-reason"],
)
def test_interim_answer_flood_counts_toward_the_head_cap(interim: bytes) -> None:
    """A flood of 1xx answers larger than the head cap is refused, however short each 1xx is."""

    async def test() -> None:
        flood = interim * (4 * 64 * 1024 // len(interim))
        async with wire(flood=raw(flood + answer(b"ok"))) as server:
            pool = UpstreamPool(server.origin, max_head_bytes=64 * 1024)
            assert await outcome(fetch(pool, "flood")) == "UpstreamUnavailable"
            await pool.close()

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 150 Odd\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-From-Interim: 1\r\n\r\n",
    ],
    ids=["content-length", "chunked-with-trailer"],
)
def test_interim_answer_carrying_content_never_joins_the_final_answer(interim: bytes) -> None:
    """A 1xx cannot carry content (RFC 9110 §15.2): one that claims some is refused, or the final answer is
    exactly its own bytes; the 1xx's bytes or trailers never become part of the final answer."""

    async def test() -> None:
        final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        async with wire(interim=raw(interim + final)) as server:
            pool = UpstreamPool(server.origin)

            async def attempt() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
                response = await pool.request("GET", "/mcp", [(b"x-mode", b"interim")])
                try:
                    return response.status, response.raw_headers, await response.read()
                finally:
                    response.release()

            got = await outcome(attempt())
            await pool.close()
        assert got in ("UpstreamUnavailable", (200, [(b"Transfer-Encoding", b"chunked")], b"ok"))

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "final",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n" + answer(b"evil"),
        b"HTTP/1.1 200 OK\r\n\r\n",
    ],
    ids=["then-101", "then-200-until-close"],
)
def test_100_continue_then_a_switch_is_refused(final: bytes) -> None:
    """A 100 Continue followed by a 101 is refused and its bytes never answer a later request; a 100 followed
    by a body read until close leaves the connection unused."""

    async def test() -> None:
        async with wire(interim=raw(b"HTTP/1.1 100 Continue\r\n\r\n" + final, keep=False)) as server:
            pool = UpstreamPool(server.origin, read_timeout=1)
            response = await outcome(pool.request("POST", "/mcp", [(b"x-mode", b"interim")], b"{}"))
            if not isinstance(response, str):
                response.release()  # the until-close body: abandoned
                response = response.status
            assert response == ("UpstreamUnavailable" if b"101" in final else 200)
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX: y\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n\tfolded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Cr: a\rb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Del: a\x7fb\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1 1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nokokokokok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000002\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\n0\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n",
        b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\x00X: y\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=[
        "bare-lf",
        "one-bare-lf",
        "obs-fold-space",
        "obs-fold-tab",
        "nul-in-value",
        "cr-in-value",
        "del-in-value",
        "cl-plus",
        "cl-inner-space",
        "cl-list",
        "cl-hex",
        "cl-underscore",
        "cl-overflow",
        "space-before-colon",
        "te-and-cl",
        "identity-and-cl",
        "chunk-size-overflow",
        "chunk-size-negative",
        "chunk-bare-lf",
        "chunk-data-overrun",
        "chunk-size-space",
        "http-1.2",
        "four-digit-status",
        "nul-name",
    ],
)
def test_malformed_or_ambiguous_framing_is_refused_and_never_reused(head: bytes) -> None:
    """Framing two parsers could read two ways (bare LF, obs-fold, control bytes in values, a Content-Length
    Python's int() would take but HTTP does not, chunk size tricks) is a 502 and its connection is dropped."""

    async def test() -> None:
        async with wire(bad=raw(head)) as server:
            pool = UpstreamPool(server.origin, read_timeout=1)
            assert await outcome(fetch(pool, "bad")) == "UpstreamUnavailable"
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    ("length", "exact"),
    [(b"  2  ", 2), (b"\t2", 2), (b"002", 2), (b"0", 0)],
    ids=["spaces", "tab", "leading-zeros", "zero"],
)
def test_content_length_with_whitespace_or_zeros_frames_exactly(length: bytes, exact: int) -> None:
    """A Content-Length padded with whitespace or leading zeros frames exactly that many bytes, and the next answer
    on the same connection is the next request's."""

    async def test() -> None:
        data = b"HTTP/1.1 200 OK\r\nContent-Length:" + length + b"\r\n\r\n" + b"ok"[:exact]
        async with wire(padded=raw(data)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"padded")])
            assert response.content_length == exact
            assert await response.read() == b"ok"[:exact]
            response.release()
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 1

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_chunked_applied_twice_is_decoded_once_and_the_connection_stays_in_step() -> None:
    """Transfer-Encoding: chunked named twice is refused or frames the body once; the next answer is the next
    request's."""

    async def test() -> None:
        inner = b"2\r\nok\r\n0\r\n\r\n"
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        data += b"%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner)
        async with wire(twice=raw(data)) as server:
            pool = UpstreamPool(server.origin)
            assert await outcome(fetch(pool, "twice")) in ("UpstreamUnavailable", (200, inner))
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "coding", [b"identity", b"gzip", b"xchunked", b"chunked, identity"], ids=["identity", "gzip", "xchunked", "last"]
)
def test_transfer_coding_other_than_final_chunked_reads_until_close(coding: bytes) -> None:
    """A Transfer-Encoding whose last coding is not chunked is never read as chunked: the body runs to the
    close (or the answer is refused) and the connection is never reused."""

    async def test() -> None:
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n" + answer(b"smuggled")
        async with wire(coded=raw(data, keep=False)) as server:
            pool = UpstreamPool(server.origin, read_timeout=1)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"coded")])
            body = await response.read_some()
            response.release()
            assert body.startswith(b"0\r\n\r\n")
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_chunk_extension_flood_is_not_buffered_and_the_body_is_exact() -> None:
    """Megabytes of chunk extensions are skipped without being kept; the body is exactly the chunks' data."""

    async def test() -> None:
        extension = b";" + b"e" * (2 * 1024 * 1024)
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2" + extension + b"\r\nok\r\n0\r\n\r\n"
        async with wire(flood=raw(data)) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, "flood") == (200, b"ok")
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_huge_chunk_size_then_close_is_a_broken_answer() -> None:
    """A chunk announcing 2^64-1 bytes that ends with the connection is a broken answer, not a complete one."""

    async def test() -> None:
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\npartial"
        async with wire(huge=closing(data)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"huge")])
            assert await response.read_some() == b"partial"
            rest = await outcome(response.read_some())
            at_eof = response.at_eof()
            response.release()
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert (rest, at_eof) == ("UpstreamUnavailable", False)
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_trailer_flood_passing_the_head_cap_breaks_the_answer() -> None:
    """Trailers count toward the head cap: a flood of them makes the body read fail, never end cleanly."""

    async def test() -> None:
        trailers = b"".join(b"X-T%d: %s\r\n" % (n, b"t" * 50) for n in range(2000))
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + b"\r\n"
        async with wire(trailers=raw(data)) as server:
            pool = UpstreamPool(server.origin, max_head_bytes=32 * 1024)
            assert await outcome(fetch(pool, "trailers")) == "UpstreamUnavailable"
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_trailers_never_join_the_answers_headers() -> None:
    """Chunked trailers (a Content-Length, a Set-Cookie) never appear among the answer's headers."""

    async def test() -> None:
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nSet-Cookie: s=1\r\nX-T: 1\r\n\r\n"
        async with wire(trailers=raw(data)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"trailers")])
            assert await response.read() == b"ok"
            response.release()
            await pool.close()
        assert response.raw_headers == [(b"Transfer-Encoding", b"chunked")]
        assert response.content_length is None

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
    ids=["head", "204", "304", "head-chunked"],
)
@pytest.mark.parametrize("delay", [0, 0.05], ids=["same-packet", "later-packet"])
def test_body_after_an_answer_that_has_none_never_answers_the_next_request(
    method: str, head: bytes, delay: float
) -> None:
    """Bytes after an answer that has no body (to HEAD, a 204, a 304), in its packet or a later one, get the
    connection dropped and never become the next request's answer."""

    async def test() -> None:
        stray = b"8\r\nsmuggled\r\n0\r\n\r\n" if b"chunked" in head else answer(b"smuggled")
        async with wire(bodyless=then(head, delay, stray) if delay else raw(head + stray)) as server:
            pool = UpstreamPool(server.origin)
            assert (await fetch(pool, "bodyless", method=method))[1] == b""
            await asyncio.sleep(0.15)
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize("read", [0, 1], ids=["unread", "half-read"])
def test_abandoned_answer_closes_the_connection_and_its_rest_reaches_nobody(read: int) -> None:
    """An answer released before its end closes the connection; the rest of its body never reaches the next
    request, even when it looks like an answer."""

    async def test() -> None:
        rest = b"x" * 30 + answer(b"smuggled")
        first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nab" % (2 + len(rest))
        async with wire(partial=then(first, 0.05, rest)) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [(b"x-mode", b"partial")])
            if read:
                assert await response.read_some() == b"ab"
            response.release()
            await asyncio.sleep(0.1)
            assert await fetch(pool, ident="2") == (200, b"2")
            await pool.close()
        assert server.connections == 2

    run(test)


# Slots and timeouts.


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_request_waiting_for_a_slot_held_by_a_stream_times_out() -> None:
    """With every connection held by a long-lived stream, a further request fails within the connect timeout
    rather than waiting without limit for a slot (one client's event streams cannot stall everyone else)."""

    async def test() -> None:
        async with wire(stream=trickle_forever) as server:
            pool = UpstreamPool(server.origin, limit=1, connect_timeout=0.3, read_timeout=1)
            stream = await pool.request("GET", "/mcp", [(b"x-mode", b"stream")])
            reader = asyncio.create_task(_drain(stream))
            waited = await outcome(fetch(pool, ident="2"), 2)
            reader.cancel()
            stream.release()
            await pool.close()
        assert waited == "UpstreamTimeout"

    run(test)


async def _drain(response: Any) -> None:
    while await response.read_some():
        pass


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_silent_upstream_times_out_on_the_head_even_while_trickling_it() -> None:
    """A head that never completes times out after the read timeout, even if a byte arrives every 50 ms."""

    async def test() -> None:
        head = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 400
        async with wire(slow=trickled(head, 1, 0.05), silent=stall) as server:
            pool = UpstreamPool(server.origin, read_timeout=0.3)
            for mode in ("slow", "silent"):
                started = time.monotonic()
                assert await outcome(fetch(pool, mode), 3) == "UpstreamTimeout"
                assert time.monotonic() - started < 1.5
            await pool.close()

    run(test)


async def _barrier_check(pool: UpstreamPool, server: Wire, limit: int) -> None:
    """``limit`` requests at once must all reach the upstream together, on at most ``limit`` connections."""
    server.barrier_size, server.arrived, server.open_at_barrier = limit, 0, 0
    server.barrier_full.clear()
    answers = await asyncio.gather(*(fetch(pool, "barrier", f"b{n}") for n in range(limit)))
    assert answers == [(200, f"b{n}".encode()) for n in range(limit)]
    assert server.open_at_barrier <= limit


async def _one_failure(pool: UpstreamPool, n: int) -> str:
    """Request ``n`` of the leak run: each number fails (or succeeds) its own way."""
    kind = n % 10
    ident = str(n)
    try:
        if kind == 0:
            assert await fetch(pool, ident=ident) == (200, ident.encode())
        elif kind == 1:
            await fetch(pool, "garbage", ident)
        elif kind == 2:
            await fetch(pool, "hang-up", ident, "POST", b"{}")
        elif kind == 3:
            async with asyncio.timeout(0.02):
                await fetch(pool, "stall", ident)
        elif kind == 4:
            (await pool.request("GET", "/mcp", [(b"x-mode", b"partial")])).release()
        elif kind == 5:
            assert await fetch(pool, "extra", ident) == (200, b"ok")
        elif kind == 6:
            assert await fetch(pool, "bodyless", ident, "HEAD") == (200, b"")
        elif kind == 7:
            assert await fetch(pool, "close", ident) == (200, b"ok")
        elif kind == 8:
            async with asyncio.timeout(0.004):
                await fetch(pool, "staged", ident)
        else:
            async with asyncio.timeout(0.01):
                await fetch(pool, "stream", ident)
    except (UpstreamUnavailable, UpstreamTimeout, TimeoutError) as error:
        return type(error).__name__
    return "ok"


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_a_thousand_failures_leak_no_slot_and_no_connection() -> None:
    """After 1000 requests failing every way (malformed, hung up, stalled and cancelled, abandoned, desynchronised,
    cancelled mid-answer), ``limit`` requests still run at once and no more than ``limit`` sockets are ever open."""

    async def test() -> None:
        limit = 8
        behaviours: dict[str, Behaviour] = {
            "garbage": raw(b"HTTP/1.1 2x0 Bad\r\n\r\n", keep=False),
            "hang_up": hang_up,
            "stall": stall,
            "partial": raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", keep=False),
            "extra": raw(answer(b"ok") + answer(b"smuggled")),
            "bodyless": raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            "close": raw(answer(b"ok", b"Connection: close"), keep=False),
            "staged": staged,
            "stream": trickle_forever,
            "barrier": barrier,
        }
        async with wire(**behaviours) as server:
            pool = UpstreamPool(server.origin, limit=limit, read_timeout=2)
            outcomes: dict[str, int] = {}
            for batch in range(0, 1000, 50):
                for result in await asyncio.gather(*(_one_failure(pool, n) for n in range(batch, batch + 50))):
                    outcomes[result] = outcomes.get(result, 0) + 1
            assert server.peak <= limit
            assert outcomes.keys() >= {"ok", "UpstreamUnavailable", "TimeoutError"}
            await _barrier_check(pool, server, limit)
            await asyncio.sleep(0.1)
            assert server.open <= limit
            await pool.close()

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_cancellation_at_every_point_leaks_nothing_and_reuses_nothing_mid_answer() -> None:
    """A caller cancelled at any moment (waiting for a slot, writing, mid-head, mid-body) leaves no slot taken and
    no half-read connection in the pool: every later answer is the one its request asked for."""

    async def test() -> None:
        limit = 3
        async with wire(staged=staged, barrier=barrier) as server:
            pool = UpstreamPool(server.origin, limit=limit)
            results: list[Any] = []

            async def attempt(n: int, delay: float) -> None:
                try:
                    async with asyncio.timeout(delay):
                        results.append((n, await fetch(pool, "staged", str(n))))
                except TimeoutError:
                    results.append((n, "cancelled"))

            for n in range(0, 160, 4):
                delay = n * 0.0002
                await asyncio.gather(*(attempt(n + k, delay) for k in range(4)))  # 4 callers for 3 slots
            completed = [(n, got) for n, got in results if got != "cancelled"]
            assert completed
            assert len(completed) < len(results)
            assert all(got == (200, str(n).encode()) for n, got in completed)
            await _barrier_check(pool, server, limit)
            assert server.peak <= limit
            await pool.close()

    run(test)


# What the pool writes: the Host, replays, injection through the proxy.


@pytest.mark.threat("T-SMUGGLE")
def test_host_header_is_the_origins_authority_once_and_never_its_userinfo() -> None:
    """Exactly one Host goes out, the origin's host and port; userinfo in the origin never reaches the wire and a
    caller's own Host is refused in any case."""

    async def test() -> None:
        async with wire() as server:
            port = server.origin.rsplit(":", 1)[1]
            pool = UpstreamPool(f"http://user:secret-password@127.0.0.1:{port}")
            assert await fetch(pool, ident="1") == (200, b"1")
            for name in (b"Host", b"HOST", b"host"):
                with pytest.raises(ValueError, match="refused"):
                    await pool.request("GET", "/mcp", [(name, b"evil.example")], None)
            await pool.close()
        (request,) = server.requests
        hosts = [line for line in request.split(b"\r\n") if line.lower().startswith(b"host:")]
        assert hosts == [f"Host: 127.0.0.1:{port}".encode()]
        assert b"secret-password" not in request

    run(test)


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"0")],
        [(b"CONTENT-LENGTH", b"5")],
        [(b"Transfer-Encoding", b"chunked")],
        [(b"Connection", b"keep-alive, Content-Length")],
        [(b"Upgrade", b"h2c")],
        [(b"TE", b"trailers")],
        [(b"X-A", b"1\r\n\r\nGET /admin HTTP/1.1")],
        [(b"X-A", b"1\r")],
        [(b"X-A\r\nX-B", b"1")],
        [(b"", b"1")],
        [(b"X-A ", b"1")],
        [(b"X-\xff", b"1")],
    ],
    ids=[
        "cl",
        "cl-upper",
        "te",
        "connection",
        "upgrade",
        "te-trailers",
        "crlf-crlf",
        "bare-cr",
        "crlf-name",
        "empty-name",
        "space-name",
        "non-ascii-name",
    ],
)
def test_pool_refuses_framing_and_split_headers_from_its_caller(headers: list[tuple[bytes, bytes]]) -> None:
    """A framing header (any case) or one that could split the head is refused before any connection is made."""

    async def test() -> None:
        async with wire() as server:
            pool = UpstreamPool(server.origin)
            with pytest.raises(ValueError, match="refused"):
                await pool.request("POST", "/mcp", headers, b"{}")
            await pool.close()
        assert server.connections == 0

    run(test)


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    "target",
    [
        "/mcp?a=1 HTTP/1.1\r\nX: y",
        "/mcp?a=\r\n",
        "/mcp?a=1\tb",
        "/mcp?a=\x00",
        "/mcp?a=\x7f",
        "mcp",
        "/mcp?a=é",
        "/mcp?a=\u2028",
    ],
    ids=["request-line", "crlf", "tab", "nul", "del", "not-origin-form", "latin-1", "line-separator"],
)
def test_pool_refuses_a_target_it_cannot_write_as_given(target: str) -> None:
    """A target with whitespace, control or non-ASCII characters is refused before any connection; it is never
    rewritten into a different target."""

    async def test() -> None:
        async with wire() as server:
            pool = UpstreamPool(server.origin)
            with pytest.raises(ValueError, match="refused"):
                await pool.request("GET", target, [], None)
            await pool.close()
        assert server.requests == []

    run(test)


def _scope(query: bytes, headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": query,
        "headers": headers,
        "client": ("192.0.2.7", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def _through_proxy(
    origin: str, scope: dict[str, Any], inject: dict[str, str] | None = None, body: bytes = b"{}"
) -> list[Message]:
    proxy = UpstreamProxy(
        ProxySettings(upstream=origin + "/mcp", client="pool", inject_headers=inject or {}, read_timeout=2)
    )
    await proxy.start()
    sent: list[Message] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await proxy(scope, receive, send)
    finally:
        await proxy.close()
    return sent


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    ("query", "headers", "inject"),
    [
        (b"", [(b"x-client", b"v\r\nX-Injected: 1")], {}),
        (b"", [(b"x-client", b"v\nContent-Length: 50")], {}),
        (b"", [(b"x-client\r\nx-injected", b"1")], {}),
        (b"", [(b"x-client", b"v\x00")], {}),
        (b"", [], {"X-Upstream-Key": "k\r\nX-Injected: 1"}),
        (b"", [], {"X-Upstream-Key\r\nX-Injected": "1"}),
        (b"a=1 HTTP/1.1\r\nX-Injected: 1", [], {}),
        (b"a=1\r\n\r\nGET /admin", [], {}),
        (b"a=1 b", [], {}),
        (b"a=\xc3\xa9", [], {}),
        (b"a=\xff", [], {}),
    ],
    ids=[
        "client-crlf",
        "client-lf",
        "client-name-crlf",
        "client-nul",
        "inject-crlf",
        "inject-name-crlf",
        "query-request-line",
        "query-second-request",
        "query-space",
        "query-utf8",
        "query-latin-1",
    ],
)
def test_no_path_through_the_proxy_splits_or_rewrites_the_upstream_request(
    query: bytes, headers: list[tuple[bytes, bytes]], inject: dict[str, str]
) -> None:
    """Whatever the client's headers, the injected upstream headers or the query string hold (CR, LF, NUL, spaces,
    non-ASCII), the proxy never writes a request the upstream could split, nor one rewritten from what it got."""

    async def test() -> None:
        async with wire() as server:
            with pytest.raises(ValueError, match="refused"):
                await _through_proxy(server.origin, _scope(query, [(b"x-id", b"1"), *headers]), inject)
        assert server.requests == []

    run(test)


@pytest.mark.threat("T-SMUGGLE")
def test_client_framing_headers_never_reach_the_upstream_through_the_proxy() -> None:
    """A client's Content-Length, Transfer-Encoding, Connection, Upgrade, TE and Host are dropped: the upstream
    reads exactly one Host and the pool's own Content-Length for the body it was given."""

    async def test() -> None:
        client_headers = [
            (b"host", b"evil.example"),
            (b"content-length", b"100"),
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"keep-alive, x-id"),
            (b"upgrade", b"h2c"),
            (b"te", b"trailers"),
            (b"x-id", b"7"),
        ]
        async with wire() as server:
            sent = await _through_proxy(server.origin, _scope(b"q=1", client_headers), body=b'{"a":1}')
        (request,) = server.requests
        lines = request.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert lines[0] == b"post /mcp?q=1 http/1.1"
        assert [line for line in lines if line.startswith(b"host:")] == [b"host: " + server.origin[7:].encode()]
        assert [line for line in lines if line.startswith((b"content-length:", b"transfer-encoding:"))] == [
            b"content-length: 7"
        ]
        assert not [line for line in lines if line.startswith((b"connection:", b"upgrade:", b"te:"))]
        assert request.endswith(b'\r\n\r\n{"a":1}')
        assert sent[0]["status"] == 200
        assert sent[-1]["body"] == b"7"

    run(test)


# Replays: what is sent again when a connection breaks.


def _count(server: Wire, marker: bytes) -> int:
    return sum(marker in request for request in server.requests)


@pytest.mark.threat("T-UPSTREAM-REPLAY")
@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH", "GET"])
@pytest.mark.parametrize(
    "breaks",
    [b"HTTP/1.1 200 O", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"HTTP/1.1 100 Continue\r\n\r\n", b"\r\n"],
    ids=["mid-status", "mid-head", "after-interim", "blank-line"],
)
def test_nothing_is_sent_twice_once_the_upstream_began_answering(method: str, breaks: bytes) -> None:
    """A reused connection closed after part of an answer (even only a 100 Continue) is a 502 and the request,
    whatever its method, went out once: the upstream may have acted on it."""

    async def test() -> None:
        async with wire(breaks=closing(breaks)) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, ident="warm") == (200, b"warm")
            body = b'{"replay-marker":1}'

            async def attempt() -> None:
                response = await pool.request(method, "/mcp", [(b"x-mode", b"breaks")], body)
                try:
                    await response.read()
                finally:
                    response.release()

            assert await outcome(attempt()) == "UpstreamUnavailable"
            await pool.close()
        assert _count(server, b"replay-marker") == 1

    run(test)


@pytest.mark.threat("T-UPSTREAM-REPLAY")
@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("streamed", [False, True], ids=["bytes", "stream"])
def test_unsafe_methods_are_never_sent_again_after_a_silent_close(method: str, streamed: bool) -> None:
    """A state-changing request on a reused connection closed without any answer is a 502, written once, whether
    its body was bytes or a stream."""

    async def test() -> None:
        async with wire(hang_up=hang_up) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, ident="warm") == (200, b"warm")

            async def body() -> AsyncIterator[bytes]:
                yield b'{"replay-marker":1}'

            payload = body() if streamed else b'{"replay-marker":1}'
            assert await outcome(fetch(pool, "hang-up", method=method, body=payload)) == "UpstreamUnavailable"
            await pool.close()
        assert _count(server, b"replay-marker") == 1

    run(test)


@pytest.mark.threat("T-UPSTREAM-REPLAY")
def test_safe_retry_happens_once_and_only_for_a_reused_connection() -> None:
    """A GET closed silently on a fresh connection is not retried; on a reused one it is sent once more and, if
    that closes too, it is a 502 after exactly two sends."""

    async def test() -> None:
        async with wire(hang_up=hang_up) as server:
            pool = UpstreamPool(server.origin)
            assert await outcome(fetch(pool, "hang-up", "fresh")) == "UpstreamUnavailable"
            assert _count(server, b"x-id: fresh") == 1
            assert await fetch(pool, ident="warm") == (200, b"warm")
            assert await outcome(fetch(pool, "hang-up", "reused")) == "UpstreamUnavailable"
            await pool.close()
        assert _count(server, b"x-id: reused") == 2

    run(test)


# TLS.


@pytest.mark.threat("T-UPSTREAM-SPOOF")
def test_tls_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    """A trusted certificate naming another host is refused before any request byte; the same certificate is
    accepted when the origin names its host."""
    cert, key = self_signed(tmp_path, "localhost")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def test() -> None:
        state = Wire()
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=served)
        async with server:
            port = server.sockets[0].getsockname()[1]
            trusting = ssl.create_default_context(cafile=cert)
            mismatched = UpstreamPool(f"https://127.0.0.1:{port}", ssl_context=trusting)
            assert await outcome(fetch(mismatched, ident="1")) == "UpstreamUnavailable"
            assert state.requests == []
            matching = UpstreamPool(f"https://localhost:{port}", ssl_context=trusting)
            assert await fetch(matching, ident="2") == (200, b"2")
            await matching.close()
        assert len(state.requests) == 1

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 OK\r\nContent-Length: 2\r\n\r\nok",
        b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["status-000", "status-099", "crlf-first", "lf-first"],
)
def test_an_answer_a_strict_parser_refuses_is_refused(answer: bytes) -> None:
    """llhttp reads a status below 100 as a final answer and skips blank lines before a status line; h11 refuses
    both. Either is the sign of an upstream framing its answers otherwise than we read them: refused, not relayed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
            await asyncio.sleep(1)
        writer.close()

    async def test() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            pool = UpstreamPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", read_timeout=5)
            with pytest.raises(UpstreamUnavailable):
                await pool.request("GET", "/mcp", [], None)
            await pool.close()

    asyncio.run(test())
