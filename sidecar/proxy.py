"""Forwarding to the upstream MCP server: one connection pool, bodies streamed both ways.

The guard has already decided by the time a request gets here; this module only moves bytes. The
client's credentials, cookies and hop-by-hop headers never reach the upstream; the upstream's own
credentials are injected; responses (SSE included) are relayed chunk by chunk, never buffered.
The pool is aiohttp's pooled session, or with ``client="pool"`` the sidecar's own (``upstream_pool.py``);
both answer through one relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args
from urllib.parse import urlsplit

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from mcpguard import UpstreamTimeout, UpstreamUnavailable
from sidecar.upstream_pool import UpstreamPool

__all__ = ["UPSTREAM_CLIENTS", "ProxySettings", "UpstreamClient", "UpstreamProxy"]

logger = logging.getLogger("mcpguard.sidecar.proxy")

# RFC 9110 §7.6.1 connection-specific fields, plus what we rewrite or must not pass on.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NEVER_UPSTREAM = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"authorization",
    b"cookie",
    # We filter answers (tools/list) as plain JSON, so the upstream must not compress them.
    b"accept-encoding",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
}
_NEVER_DOWNSTREAM = _HOP_BY_HOP | {b"content-length"}
# Answers of known length up to this size are read whole and sent in one piece.
_WHOLE_BODY_BYTES = 1024 * 1024


# How to forward: aiohttp's pooled session, or the sidecar's own HTTP/1.1 pool (``upstream_pool.py``).
UpstreamClient = Literal["aiohttp", "pool"]
UPSTREAM_CLIENTS: tuple[UpstreamClient, ...] = get_args(UpstreamClient)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """Where and how to forward."""

    upstream: str
    mcp_path: str = "/mcp"
    inject_headers: Mapping[str, str] = field(default_factory=dict)
    drop_headers: frozenset[str] = frozenset()
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_response_bytes: int = 256 * 1024 * 1024
    pool_size: int = 256
    client: UpstreamClient = "pool"


class _Answer(Protocol):
    """An upstream answer as the relay reads it, whichever client fetched it; reads raise the guard's errors."""

    @property
    def status(self) -> int: ...
    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content_type(self) -> str: ...
    async def read(self) -> bytes: ...
    async def read_some(self) -> bytes: ...
    def at_eof(self) -> bool: ...
    def release(self) -> None: ...


class _AiohttpAnswer:
    """An aiohttp response seen as an ``_Answer``."""

    __slots__ = ("_response", "content_length", "content_type", "raw_headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.raw_headers = response.raw_headers
        self.content_length = response.content_length
        self.content_type = response.content_type

    async def read(self) -> bytes:
        return await _answer(self._response.read())

    async def read_some(self) -> bytes:
        return await _answer(self._response.content.readany())

    def at_eof(self) -> bool:
        return self._response.content.at_eof()

    def release(self) -> None:
        self._response.release()


class UpstreamProxy:
    """The app behind the guard in the sidecar: forwards each request to the upstream."""

    def __init__(self, settings: ProxySettings) -> None:
        parts = urlsplit(settings.upstream)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._upstream_mcp_path = parts.path or "/"
        self._mcp_url = URL(self._origin + self._upstream_mcp_path)
        self.settings = settings
        self._inject = [(k.lower().encode(), v.encode("latin-1")) for k, v in settings.inject_headers.items()]
        self._drop = _NEVER_UPSTREAM | {h.lower().encode() for h in settings.drop_headers}
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client session (opened at startup)."""
        if self._session is None:
            raise RuntimeError("the proxy is not started")
        return self._session

    async def start(self) -> None:
        """Open the connection pool."""
        settings = self.settings
        if settings.client == "pool" and self._pool is None:
            self._pool = UpstreamPool(
                self._origin,
                limit=settings.pool_size,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
            )
        if settings.client == "aiohttp" and self._session is None:
            connector = aiohttp.TCPConnector(limit=settings.pool_size, ttl_dns_cache=300)
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def upstream_url(self, scope: Scope) -> URL:
        """The upstream URL for this request: the guard's MCP endpoints all map to the upstream's (only MCP traffic
        is forwarded), the query string passed on as the client wrote it."""
        query = scope.get("query_string", b"")
        if not query:
            return self._mcp_url  # parsed once: the hot path
        return URL(f"{self._mcp_url}?{query.decode('latin-1')}", encoded=True)

    def _headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        headers = [(name, value) for name, value in scope["headers"] if name not in self._drop]
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
        headers.extend(self._inject)
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = await _request_body(scope, receive)
        response = await self._send(scope["method"], scope, self._headers(scope), body)
        try:
            await self._relay(response, scope["method"], receive, send)
        finally:
            response.release()

    async def _send(
        self, method: str, scope: Scope, headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes] | None
    ) -> _Answer:
        if self._pool is not None:
            query = scope.get("query_string", b"")
            target = self._upstream_mcp_path + ("?" + query.decode("latin-1") if query else "")
            return await self._pool.request(method, target, headers, body)
        try:
            response = await self.session.request(
                method,
                self.upstream_url(scope),
                headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
                data=body,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        except TimeoutError:
            raise UpstreamTimeout("the upstream MCP server did not answer in time") from None
        except aiohttp.ClientError as exc:
            logger.warning("upstream unavailable: %s", type(exc).__name__)
            raise UpstreamUnavailable("the upstream MCP server could not be reached") from None
        return _AiohttpAnswer(response)

    async def _relay(self, response: _Answer, method: str, receive: Receive, send: Send) -> None:
        headers = [
            (name.lower(), value) for name, value in response.raw_headers if name.lower() not in _NEVER_DOWNSTREAM
        ]
        status, length = response.status, response.content_length
        if status < 200 or status in (204, 304) or method == "HEAD":
            # No body follows (RFC 9110 §6.4.1). A HEAD's Content-Length is what a GET would carry, and uvicorn sends
            # it as given; on a 204 or 304 uvicorn would wait for the body it announces and break the connection.
            if length is not None and method == "HEAD" and status not in (204, 304):
                headers.append((b"content-length", str(length).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        limit = self.settings.max_response_bytes
        if length is not None and length > limit:
            raise UpstreamUnavailable("the upstream answer is larger than the response cap")
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        if length is not None and length <= _WHOLE_BODY_BYTES:
            # A small answer of known size: one read and one send, no stream to watch.
            body = await response.read()
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        first = b""
        if response.content_type != "text/event-stream":
            # A JSON answer without a length usually arrives whole in one read, and then there is no stream to watch.
            first = await response.read_some()
            if len(first) > limit:
                raise UpstreamUnavailable("the upstream answer passed the response cap")
            if response.at_eof():
                await send({"type": "http.response.body", "body": first})
                return
        await _stream(response, receive, send, limit, first)

    async def reachable(self) -> bool:
        """Readiness: whether the upstream gives any HTTP answer to a HEAD of its MCP endpoint."""
        try:
            if self._pool is not None:
                answer = await self._pool.request("HEAD", self._upstream_mcp_path, [], None)
                answer.release()
            else:
                async with self.session.head(self.settings.upstream):
                    pass
        except (UpstreamUnavailable, UpstreamTimeout, aiohttp.ClientError, TimeoutError, RuntimeError):
            return False
        return True

    async def exchange(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One exchange with the upstream MCP endpoint, with the upstream's credentials (an ``Exchange``)."""
        sent = {k: v for k, v in headers.items() if k.lower() != "host"} | dict(self.settings.inject_headers)
        if self._pool is not None:
            framed = [
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in sent.items()
                if k.lower().encode("latin-1") not in _HOP_BY_HOP | {b"content-length"}
            ]
            answer = await self._pool.request(method, self._upstream_mcp_path, framed, body or None)
            try:
                data = await answer.read()
            finally:
                answer.release()
            seen = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in answer.raw_headers}
            return answer.status, seen, data
        try:
            async with self.session.request(
                method, self._origin + self._upstream_mcp_path, headers=sent, data=body or None
            ) as response:
                data = await response.read()
                return response.status, {k.lower(): v for k, v in response.headers.items()}, data
        except TimeoutError:
            raise UpstreamTimeout("the upstream MCP server did not answer in time") from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable("the upstream MCP server could not be reached") from None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _answer(reading: Awaitable[bytes]) -> bytes:
    """What ``reading`` gets of the upstream's answer, its failures in the guard's terms."""
    try:
        return await reading
    except TimeoutError:
        raise UpstreamTimeout("the upstream MCP server did not finish its answer in time") from None
    except aiohttp.ClientError:
        raise UpstreamUnavailable("the upstream MCP server broke off its answer") from None


async def _stream(response: _Answer, receive: Receive, send: Send, limit: int, first: bytes) -> None:
    """Relay a body of unknown or large size chunk by chunk, after the ``first`` bytes already read; a client
    that leaves ends the upstream stream."""
    relay = asyncio.current_task()
    client_gone = False

    async def watch() -> None:
        nonlocal client_gone
        while (await receive())["type"] != "http.disconnect":
            pass
        client_gone = True
        if relay is not None:
            relay.cancel()

    watcher = asyncio.create_task(watch())
    size = len(first)
    try:
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        while chunk := await _broken_off(response.read_some(), size):
            size += len(chunk)
            if size > limit:
                # Aborting the connection (rather than ending the body) tells the client it is incomplete.
                raise UpstreamUnavailable("the upstream answer passed the response cap")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except asyncio.CancelledError:
        if not client_gone:
            raise
        return
    finally:
        watcher.cancel()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _broken_off(reading: Awaitable[bytes], size: int) -> bytes:
    """The next piece of a relayed stream; once the client has part of an answer, any failure is a break."""
    try:
        return await reading
    except (UpstreamUnavailable, UpstreamTimeout):
        logger.warning("upstream stream broke off after %d bytes", size)
        raise UpstreamUnavailable("the upstream MCP server broke off its answer") from None


async def _request_body(scope: Scope, receive: Receive) -> bytes | AsyncIterator[bytes] | None:
    """The whole body when it came in one piece (always, for guarded MCP POSTs), else a stream."""
    if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") and not _declares_body(scope):
        return None
    first: Message = await receive()
    if first["type"] == "http.disconnect":
        return None
    if not first.get("more_body", False):
        body: bytes = first.get("body", b"")
        return body

    async def stream() -> AsyncIterator[bytes]:
        yield first.get("body", b"")
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    return stream()


def _declares_body(scope: Scope) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])
