"""An HTTP/1.1 client connection pool to one upstream origin, on ``asyncio.Protocol`` and httptools.

It writes each request itself, refusing before any byte goes out a method, target or header that could
split into a second request upstream (CR, LF or NUL in a value, a name that is not a token), a method or target
it could not write as given (any non-ASCII character: it is never re-encoded into another target), and framing
headers from the caller (the pool frames the body: ``Content-Length`` for bytes, chunked for a stream).
A connection goes back to the pool only when its answer was read to the end, the answer allows keep-alive
and nothing unexpected arrived; any other ending closes it (``upstream_connection.py`` parses answers). An idle
connection with a byte waiting in its socket, unread yet by a busy loop, is closed rather than reused.
A request waits for a free connection at most the connect timeout, then gets ``UpstreamTimeout``.

Retries: a pooled connection the upstream has closed while idle is never written to. If a reused connection
is closed after the request went out and before any byte of an answer (the upstream timed it out just then),
a GET, HEAD or OPTIONS with a body in memory is sent once more on a new connection; any other method gets
``UpstreamUnavailable``, since the upstream may have acted on it (RFC 9110 §9.2.2 allows retrying only what
is idempotent, and an MCP POST or DELETE changes state).

Idle connections: one idle for ``idle_timeout`` (4 s by default, under the 5 s after which uvicorn, which
most Python MCP servers run on, closes an idle connection) is closed instead of reused, so that a request is
not written just as the upstream closes the connection, when a POST could be neither answered nor retried.

An upstream may answer before it has read the whole request (a refusal of a large body): the rest of the
request is then not sent, the answer is relayed, and the connection is closed afterwards, since the
upstream could read the unsent rest as the start of another request. Waiting for the upstream to read the
request is bounded by the read timeout.

Deliberately not here: HTTP/2, proxies, redirects, decompression, cookies, more than one origin.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

from mcpguard import UpstreamTimeout, UpstreamUnavailable
from sidecar.upstream_connection import ClosedBeforeAnswer, UpstreamConnection, UpstreamResponse

__all__ = ["UpstreamPool", "UpstreamResponse"]

# RFC 9110 §5.6.2 token, for methods and header names.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field values may hold anything but the bytes that end a line or a C string on the other side.
_VALUE = re.compile(rb"[^\r\n\x00]*")
# An origin-form target: visible ASCII only, so no space can end it and no line break can follow it.
_TARGET = re.compile(rb"/[!-~]*")
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"te"})
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_EXPECTS_BODY = frozenset({"POST", "PUT", "PATCH"})
# Written in one piece with the head below this size; a larger body is not copied to join it.
_JOIN_BYTES = 64 * 1024
_UNSAFE_TARGET = "refused to write a request with an unsafe method or target"

Body = bytes | AsyncIterator[bytes] | None


class UpstreamPool:
    """Keep-alive connections to ``origin`` (``http://host:port`` or ``https://…``), at most ``limit`` at once;
    a request beyond the limit waits for a connection to come free."""

    def __init__(
        self,
        origin: str,
        *,
        limit: int = 256,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
        max_head_bytes: int = 64 * 1024,
        idle_timeout: float = 4.0,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the upstream origin must be an http or https URL")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        self._host_line = b"\r\nHost: " + parts.netloc.rpartition("@")[2].encode("idna") + b"\r\n"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_head_bytes = max_head_bytes
        self._idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()

    async def request(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: Body = None
    ) -> UpstreamResponse:
        """Send one request and return once the head of the final answer is in; the caller reads the body and
        must ``release()`` the response. Raises ``ValueError`` for a request that is unsafe to write."""
        head = self._head(method, target, headers, body)
        if self._slots.locked():
            # Every connection is taken, perhaps by event streams that last for hours: waiting is bounded, so they
            # cannot stall every other request. (A free slot is taken without arming a timer.)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamTimeout("no connection to the upstream MCP server came free in time") from None
        else:
            await self._slots.acquire()
        try:
            return await self._exchange(method, head, body)
        except BaseException:
            self._slots.release()
            raise

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for connection in self._open:
            connection.abort()
        self._open.clear()
        self._idle.clear()

    def _head(self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: Body) -> bytes:
        try:
            verb, path = method.encode("ascii"), target.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(_UNSAFE_TARGET) from None
        if not _TOKEN.fullmatch(verb) or not _TARGET.fullmatch(path):
            raise ValueError(_UNSAFE_TARGET)
        lines = [verb, b" ", path, b" HTTP/1.1", self._host_line]
        for name, value in headers:
            if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value) or name.lower() in _FRAMING:
                raise ValueError("refused to write a request with an unsafe or framing header")
            lines += (name, b": ", value, b"\r\n")
        if isinstance(body, bytes):
            if body or method in _EXPECTS_BODY:
                lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
        elif body is not None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif method in _EXPECTS_BODY:
            lines.append(b"Content-Length: 0\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _exchange(self, method: str, head: bytes, body: Body) -> UpstreamResponse:
        connection = self._reuse()
        reused = connection is not None
        while True:
            if connection is None:
                connection = await self._connect()
            response = UpstreamResponse(connection, method == "HEAD", self._read_timeout, self._done)
            connection.response = response
            try:
                try:
                    response.request_sent = await _send(connection, head, body)
                except ClosedBeforeAnswer:
                    if not response.answered():
                        raise
                    # It answered, then closed before reading the rest of the request: the answer stands.
                await response.head()
            except ClosedBeforeAnswer:
                self._forget(connection)
                if reused and method in _RETRYABLE and not isinstance(body, AsyncIterator):
                    connection, reused = None, False
                    continue
                raise UpstreamUnavailable("the upstream MCP server closed the connection without answering") from None
            except BaseException:
                self._forget(connection)
                raise
            return response

    def _reuse(self) -> UpstreamConnection | None:
        idle = self._idle
        # Idle the longest first, in the order they came back: those idle too long are closed, never written to.
        expired_before = asyncio.get_running_loop().time() - self._idle_timeout
        while idle and idle[0].idle_since <= expired_before:
            self._forget(idle.pop(0))
        while idle:
            connection = idle.pop()  # the most recently used is the least likely to have been timed out
            if connection.usable() and connection.quiet():
                return connection
            self._forget(connection)
        return None

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self._max_head_bytes),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("the upstream MCP server did not accept a connection in time") from None
        except OSError:  # refused, unreachable, and every TLS failure (ssl.SSLError is an OSError)
            raise UpstreamUnavailable("the upstream MCP server could not be reached") from None
        self._open.add(connection)
        return connection

    def _done(self, connection: UpstreamConnection, reusable: bool) -> None:
        if reusable:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            self._open.discard(connection)
        self._slots.release()

    def _forget(self, connection: UpstreamConnection) -> None:
        connection.response = None
        connection.abort()
        self._open.discard(connection)


async def _send(connection: UpstreamConnection, head: bytes, body: Body) -> bool:
    """Write the request; ``False`` when the upstream answered before all of it went out (the rest is not sent)."""
    if body is None:
        return await connection.write(head)
    if isinstance(body, bytes):
        if len(body) <= _JOIN_BYTES:
            return await connection.write(head + body)
        return await connection.write(head) and await connection.write(body)
    if not await connection.write(head):
        return False
    async for chunk in body:
        # An empty chunk would read as the last one.
        if chunk and not await connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk)):
            return False
    return await connection.write(b"0\r\n\r\n")
