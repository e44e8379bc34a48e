"""The sidecar's own upstream pool against raw servers on 127.0.0.1 that send exactly the bytes each test names."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mcpguard import UpstreamTimeout, UpstreamUnavailable
from sidecar.upstream_pool import UpstreamPool
from tests.conftest import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request off the wire, head and body as framed by Content-Length or chunked encoding."""
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        return head + await reader.readuntil(b"0\r\n\r\n")
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


@dataclass
class Upstream:
    """A raw server answering the n-th request it reads, on whichever connection, with ``answers[n]`` (a callable
    may stall or close instead); once they are used up it closes. Records every connection and request."""

    answers: deque[bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    origin: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                self.requests.append(await read_request(reader))
                if not self.answers:
                    break
                answer = self.answers.popleft()
                if isinstance(answer, bytes):
                    writer.write(answer)
                    await writer.drain()
                else:
                    await answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def upstream(*answers: bytes | Callable[[asyncio.StreamWriter], Awaitable[None]]) -> AsyncIterator[Upstream]:
    server_state = Upstream(deque(answers))
    server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
    server_state.origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield server_state


async def fetch(pool: UpstreamPool, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    response = await pool.request(method, "/mcp", [(b"accept", b"application/json")], body)
    try:
        return response.status, await response.read()
    finally:
        response.release()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


def test_sequential_requests_reuse_one_connection() -> None:
    """Sequential requests travel on one keep-alive connection."""

    async def test() -> None:
        async with upstream(OK, OK, OK) as server:
            pool = UpstreamPool(server.origin)
            assert [await fetch(pool) for _ in range(3)] == [(200, b"ok")] * 3
            await pool.close()
        assert server.connections == 1

    run(test)


@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_connection_paused_for_a_slow_reader_is_not_reused() -> None:
    """An answer large enough to pause reading for a slow reader leaves its connection closed, not pooled: bytes
    that came while reading was paused may sit where the check before reuse cannot see them."""
    big = b"x" * (1024 * 1024)
    large = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big)

    async def test() -> None:
        async with upstream(large, OK, OK) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [], None)
            await asyncio.sleep(0.2)  # the reader lags: the whole answer arrives unread
            assert await response.read() == big
            response.release()
            assert [await fetch(pool) for _ in range(2)] == [(200, b"ok")] * 2
            await pool.close()
        assert server.connections == 2

    run(test)


def test_concurrent_requests_open_connections_up_to_the_limit_then_wait() -> None:
    """Concurrent requests open more connections, never more than the limit; the rest wait for a free one."""

    async def slow(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        writer.write(OK)

    async def test() -> None:
        async with upstream(*[slow] * 6) as server:
            pool = UpstreamPool(server.origin, limit=2)
            answers = await asyncio.gather(*(fetch(pool) for _ in range(6)))
            await pool.close()
        assert answers == [(200, b"ok")] * 6
        assert server.connections == 2

    run(test)


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;name=value\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"hello",
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello until close", b"hello until close"),
    ],
    ids=["content-length", "chunked-extensions-trailers", "until-close"],
)
def test_bodies_framed_every_way_arrive_whole(answer: bytes, body: bytes) -> None:
    """A body framed by Content-Length, by chunks (extensions and trailers ignored) or by close arrives whole."""

    async def test() -> None:
        async with upstream(answer) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool) == (200, body)
            await pool.close()

    run(test)


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n"),
    ],
    ids=["head", "204", "304"],
)
def test_answers_without_body_ignore_their_length(method: str, answer: bytes) -> None:
    """An answer to HEAD, a 204 and a 304 have no body whatever length they declare; the connection is reused."""

    async def test() -> None:
        async with upstream(answer, OK) as server:
            pool = UpstreamPool(server.origin)
            assert (await fetch(pool, method))[1] == b""
            assert await fetch(pool) == (200, b"ok")
            await pool.close()
        assert server.connections == 1

    run(test)


def test_interim_answers_are_skipped() -> None:
    """100 Continue and 103 Early Hints are passed over; the final answer and its headers are returned."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"

    async def test() -> None:
        final = b"HTTP/1.1 201 Created\r\nX-Final: yes\r\nContent-Length: 2\r\n\r\nok"
        async with upstream(interim + final) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("POST", "/mcp", [], b"{}")
            assert response.status == 201
            assert response.raw_headers == [(b"X-Final", b"yes"), (b"Content-Length", b"2")]
            assert await response.read() == b"ok"
            response.release()
            await pool.close()

    run(test)


@pytest.mark.parametrize(
    ("answer", "connections"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 2),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 2),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", 1),
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive"],
)
def test_reuse_follows_the_answers_keep_alive(answer: bytes, connections: int) -> None:
    """Connection: close and a plain HTTP/1.0 answer end the connection; HTTP/1.0 with keep-alive keeps it."""

    async def test() -> None:
        async with upstream(answer, answer) as server:
            pool = UpstreamPool(server.origin)
            assert [await fetch(pool), await fetch(pool)] == [(200, b"ok")] * 2
            await pool.close()
        assert server.connections == connections

    run(test)


def test_connection_closed_while_idle_is_never_written_to() -> None:
    """A pooled connection the upstream closed while idle is dropped; the next request goes on a new one."""

    async def answer_and_close(writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        writer.close()

    async def test() -> None:
        async with upstream(answer_and_close, OK) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            await asyncio.sleep(0.05)  # the upstream closes after its one answer
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            await pool.close()
        assert server.connections == 2
        assert len(server.requests) == 2

    run(test)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


@pytest.mark.threat("T-UPSTREAM-REPLAY")
def test_post_is_not_sent_again_when_closed_before_an_answer() -> None:
    """A POST on a reused connection closed after it was written and before any answer is a 502, sent once."""

    async def test() -> None:
        async with upstream(OK, hang_up) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            with pytest.raises(UpstreamUnavailable):
                await fetch(pool, "POST", b'{"second":1}')
            await pool.close()
        assert sum(b'{"second":1}' in request for request in server.requests) == 1

    run(test)


def test_get_is_sent_once_more_when_closed_before_an_answer() -> None:
    """A GET on a reused connection closed before any answer is sent once more, on a new connection."""

    async def test() -> None:
        async with upstream(OK, hang_up, OK) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool) == (200, b"ok")
            assert await fetch(pool) == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["bad-status", "bad-header", "cl-and-te", "two-cl", "negative-cl", "huge-head", "upgrade"],
)
def test_malformed_answer_refused_and_connection_closed(answer: bytes) -> None:
    """A malformed or ambiguous answer is refused as a 502 and its connection is never reused."""

    async def test() -> None:
        async with upstream(answer, OK) as server:
            pool = UpstreamPool(server.origin)
            with pytest.raises(UpstreamUnavailable):
                await fetch(pool)
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)


@pytest.mark.threat("T-SMUGGLE")
def test_second_answer_to_one_request_closes_the_connection() -> None:
    """Bytes after a complete answer (a second answer nobody asked for) get the connection refused for reuse."""

    async def test() -> None:
        async with upstream(OK + OK, OK) as server:
            pool = UpstreamPool(server.origin)
            assert await fetch(pool) == (200, b"ok")
            assert await fetch(pool) == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)


def test_unreachable_upstreams_fail_clearly() -> None:
    """Nothing listening is UpstreamUnavailable; a connection that never completes its TLS handshake times out."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def test() -> None:
        with pytest.raises(UpstreamUnavailable):
            await fetch(UpstreamPool(f"http://127.0.0.1:{free_port()}"))
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(UpstreamTimeout):
                await fetch(UpstreamPool(f"https://127.0.0.1:{port}", connect_timeout=0.2))

    run(test)


def test_read_timeout_between_chunks() -> None:
    """An upstream that stops sending between chunks gets UpstreamTimeout after the read timeout."""

    async def stall(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await asyncio.sleep(1)

    async def test() -> None:
        async with upstream(stall) as server:
            pool = UpstreamPool(server.origin, read_timeout=0.2)
            response = await pool.request("GET", "/mcp", [])
            assert await response.read_some() == b"ok"
            with pytest.raises(UpstreamTimeout):
                await response.read_some()
            response.release()
            await pool.close()

    run(test)


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    ("method", "target", "header"),
    [
        ("GET", "/mcp", (b"x-a", b"v\r\nX-Injected: 1")),
        ("GET", "/mcp", (b"x-a", b"v\nGET /admin HTTP/1.1")),
        ("GET", "/mcp", (b"x-a", b"v\x00")),
        ("GET", "/mcp", (b"x a", b"v")),
        ("GET", "/mcp", (b"x:a", b"v")),
        ("GET", "/mcp", (b"transfer-encoding", b"chunked")),
        ("GET", "/mcp HTTP/1.1\r\nX: y", (b"x-a", b"v")),
        ("GET /admin", "/mcp", (b"x-a", b"v")),
    ],
    ids=["crlf-value", "lf-value", "nul-value", "space-name", "colon-name", "framing", "target", "method"],
)
def test_injection_refused_before_anything_is_written(method: str, target: str, header: tuple[bytes, bytes]) -> None:
    """A header, target or method that could split the request upstream is refused before any connection."""

    async def test() -> None:
        async with upstream(OK) as server:
            pool = UpstreamPool(server.origin)
            with pytest.raises(ValueError, match="refused"):
                await pool.request(method, target, [header], None)
            await pool.close()
        assert server.connections == 0

    run(test)


def test_request_bodies_are_framed_by_the_pool() -> None:
    """Bytes go with their Content-Length, a stream goes chunked, and the upstream reads both exactly."""

    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"a":'
        yield b""
        yield b"1}"

    async def test() -> None:
        async with upstream(OK, OK) as server:
            pool = UpstreamPool(server.origin)
            await fetch(pool, "POST", b'{"a":1}')
            response = await pool.request("POST", "/mcp?x=1", [], pieces())
            await response.read()
            response.release()
            await pool.close()
        sized, chunked = server.requests
        assert sized.startswith(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:")
        assert sized.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')
        assert chunked.startswith(b"POST /mcp?x=1 HTTP/1.1\r\n")
        assert chunked.endswith(b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n2\r\n1}\r\n0\r\n\r\n')

    run(test)


def test_failing_body_stream_closes_the_connection() -> None:
    """A request body stream that raises closes the connection and the error reaches the caller."""

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise RuntimeError("client body broke")

    async def test() -> None:
        async with upstream(OK, OK) as server:
            pool = UpstreamPool(server.origin)
            with pytest.raises(RuntimeError, match="client body broke"):
                await pool.request("POST", "/mcp", [], broken())
            assert await fetch(pool) == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)


def test_abandoned_body_closes_the_connection_and_reading_waits_for_the_reader() -> None:
    """A body read while the reader lags stops the socket being read; one left half read closes the connection."""
    big = b"x" * (4 * 1024 * 1024)

    async def test() -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big)
        async with upstream(answer, OK) as server:
            pool = UpstreamPool(server.origin)
            response = await pool.request("GET", "/mcp", [])
            await asyncio.sleep(0.2)
            transport = response._connection.transport  # the reader lags: is the socket still being read?
            assert transport is not None
            assert not transport.is_reading()
            assert len(await response.read_some()) < len(big)
            response.release()
            assert await fetch(pool) == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP address or a DNS name) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alternative = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alternative]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_verifies_the_upstream_certificate(tmp_path: Path) -> None:
    """Over https a self-signed upstream is refused by default and answers with a context that trusts it."""
    cert, key = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def test() -> None:
        state = Upstream(deque([OK, OK]))
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=served)
        async with server:
            origin = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            with pytest.raises(UpstreamUnavailable):
                await fetch(UpstreamPool(origin))
            pool = UpstreamPool(origin, ssl_context=ssl.create_default_context(cafile=cert))
            assert [await fetch(pool), await fetch(pool)] == [(200, b"ok")] * 2
            await pool.close()

    run(test)


def _early_answer_server(
    answer: bytes, *, close: bool
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server that reads only the head of each request, answers at once and never reads the body."""
    state = {"connections": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if close:
                return
            await asyncio.sleep(30)  # holds the connection open without reading a byte more
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    handle.state = state  # type: ignore[attr-defined]
    return handle


@pytest.mark.parametrize("close", [False, True], ids=["kept-open", "closed"])
@pytest.mark.parametrize("streamed", [False, True], ids=["bytes", "stream"])
@pytest.mark.threat("T-RESPONSE-DESYNC")
def test_an_answer_before_the_request_body_is_read_is_relayed_and_its_connection_closed(
    close: bool, streamed: bool
) -> None:
    """An upstream that refuses a large body before reading it: the refusal reaches the caller (no hang waiting to
    write what nobody reads), the rest of the body is never sent, and the connection is not reused, since the
    upstream would take the unsent rest for the start of the next request."""
    refusal = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\n\r\nbig"
    chunk = b"x" * (1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield chunk

    async def test() -> None:
        handle = _early_answer_server(refusal, close=close)
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            pool = UpstreamPool(origin, read_timeout=5)
            body = chunks() if streamed else chunk * 16
            async with asyncio.timeout(10):
                response = await pool.request("POST", "/mcp", [], body)
                assert (response.status, await response.read()) == (413, b"big")
                response.release()
                assert pool._idle == []
                response = await pool.request("POST", "/mcp", [], b"{}")
                assert response.status == 413
                response.release()
            await pool.close()
        assert handle.state["connections"] == 2  # type: ignore[attr-defined]

    run(test)


@pytest.mark.threat("T-UPSTREAM-EXHAUST")
def test_an_upstream_that_reads_nothing_and_answers_nothing_times_out() -> None:
    """Writing to an upstream that stopped reading waits at most the read timeout, then fails as a timeout."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)
        writer.close()

    async def test() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1024)
        origin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            pool = UpstreamPool(origin, read_timeout=0.5)
            async with asyncio.timeout(10):
                with pytest.raises(UpstreamTimeout):
                    await pool.request("POST", "/mcp", [], b"x" * (32 * 1024 * 1024))
            await pool.close()

    run(test)


@pytest.mark.threat("T-UPSTREAM-REPLAY")
def test_a_connection_idle_past_the_idle_timeout_is_not_reused() -> None:
    """A connection idle longer than ``idle_timeout`` is closed rather than written to: the upstream may be closing
    it at that very moment, and a POST written then could be neither answered nor retried."""

    async def test() -> None:
        async with upstream(OK, OK, OK) as server:
            pool = UpstreamPool(server.origin, idle_timeout=0.2)
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")  # at once: the same connection
            await asyncio.sleep(0.4)
            assert await fetch(pool, "POST", b"{}") == (200, b"ok")
            await pool.close()
        assert server.connections == 2

    run(test)
