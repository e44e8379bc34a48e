"""Client ID Metadata Documents as MCP 2025-11-25 uses them: fetch the document an https ``client_id`` names
(draft-ietf-oauth-client-id-metadata-document), never following redirects, then check and cache it.

Whoever starts an authorization chooses that URL, so every fetch is handled as a possible server-side
request forgery: see ``mcpguard.oauth.public_addresses``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import unquote, urlsplit

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver

from mcpguard.oauth.client_metadata_document import ClientMetadataDocument, ClientMetadataError, parse_document
from mcpguard.oauth.public_addresses import NonPublicAddress, PublicAddressResolver, is_public_address

__all__ = ["ClientMetadataDocument", "ClientMetadataError", "ClientMetadataFetcher"]

_MAX_URL_LENGTH = 2000
# RFC 3986 characters only: no spaces, controls, backslashes or raw non-ASCII that parsers disagree on.
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
# Letters, digits and hyphens, labels of at most 63 characters (RFC 1123); longer ones fail IDNA encoding
# inside getaddrinfo with an error aiohttp does not expect from a resolver.
_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?")
_MAX_HOST_LENGTH = 253
# WHATWG URL parsing reads a host whose last label is a number as IPv4 (127.1, 0x7f.1, 2130706433).
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_DIGITS = re.compile(r"[0-9]+")
_NOT_PUBLIC = "client_id host does not resolve to a public address"
_REQUEST_HEADERS = {
    "Accept": "application/json",
    # Compressed bodies are refused rather than inflated: the size cap then bounds what is held in memory.
    "Accept-Encoding": "identity",
    "User-Agent": "mcpguard (client metadata)",
}


@dataclass(frozen=True, slots=True)
class _Entry:
    document: ClientMetadataDocument
    expires: float


class ClientMetadataFetcher:
    """Fetches, validates and caches Client ID Metadata Documents, refusing URLs that reach internal networks.

    ``allow_private`` lets the fetch reach loopback and private addresses and ``allow_http`` accepts
    ``http`` client ids; both exist for tests and closed deployments. ``resolver`` is the DNS resolver
    whose answers are checked (aiohttp's default when omitted). Each fetch takes at most ``timeout``
    seconds and reads at most ``max_bytes`` of body. A document is cached for its ``Cache-Control:
    max-age`` (at most ``max_ttl``), for ``default_ttl`` when it has none, and not at all under
    ``no-store`` or ``no-cache``; at most ``cache_max`` documents are kept, least recently used evicted.
    Failures are not cached, so a client whose document is fixed (or whose host recovers) works at once;
    concurrent fetches of one URL share a request, and how often a caller may trigger fetches is the
    endpoint rate limit's business.
    """

    __slots__ = (
        "_allow_http",
        "_allow_private",
        "_cache",
        "_cache_max",
        "_clock",
        "_closed",
        "_default_ttl",
        "_guard",
        "_inflight",
        "_max_bytes",
        "_max_ttl",
        "_resolver",
        "_session",
        "_timeout",
    )

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allow_http: bool = False,
        timeout: float = 5.0,
        max_bytes: int = 5120,
        cache_max: int = 1000,
        default_ttl: float = 300.0,
        max_ttl: float = 86400.0,
        resolver: AbstractResolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problems = []
        if not timeout > 0:
            problems.append("timeout must be positive")
        if max_bytes < 1:
            problems.append("max_bytes must be at least 1")
        if cache_max < 0:
            problems.append("cache_max must not be negative")
        if not 0 <= default_ttl <= max_ttl:
            problems.append("default_ttl must be between 0 and max_ttl")
        if problems:
            raise ValueError("; ".join(problems))
        self._allow_private = allow_private
        self._allow_http = allow_http
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._cache_max = cache_max
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._resolver = resolver
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[ClientMetadataDocument]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._guard: PublicAddressResolver | None = None
        self._closed = False

    async def fetch(self, client_id: str) -> ClientMetadataDocument:
        """The validated document ``client_id`` names; raises ``ClientMetadataError`` when it is refused."""
        if self._closed:
            raise RuntimeError("the client metadata fetcher is closed")
        url = _client_id_url(client_id, allow_http=self._allow_http, allow_private=self._allow_private)
        cached = self._cached(client_id)
        if cached is not None:
            return cached
        task = self._inflight.get(client_id)
        if task is None:
            task = asyncio.create_task(self._load(client_id, url))
            self._inflight[client_id] = task
            task.add_done_callback(functools.partial(self._settled, client_id))
        # Shielded: one caller giving up must not cancel the request the others are waiting for.
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Let fetches under way finish (each is bounded by the timeout), then release the session and resolver."""
        self._closed = True
        # Not cancelled: their callers would see a CancelledError they did not ask for.
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._guard is not None:
            await self._guard.close()

    async def __aenter__(self) -> ClientMetadataFetcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _cached(self, client_id: str) -> ClientMetadataDocument | None:
        entry = self._cache.get(client_id)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            del self._cache[client_id]
            return None
        self._cache.move_to_end(client_id)
        return entry.document

    def _remember(self, client_id: str, document: ClientMetadataDocument, ttl: float) -> None:
        if ttl <= 0 or self._cache_max == 0:
            return
        self._cache[client_id] = _Entry(document=document, expires=self._clock() + ttl)
        self._cache.move_to_end(client_id)
        while len(self._cache) > self._cache_max:
            self._cache.popitem(last=False)

    def _settled(self, client_id: str, task: asyncio.Task[ClientMetadataDocument]) -> None:
        if self._inflight.get(client_id) is task:
            del self._inflight[client_id]
        if not task.cancelled():
            # Marks the failure as seen even when every caller gave up before it came.
            task.exception()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            resolver: AbstractResolver | None = self._resolver
            if not self._allow_private:
                owned = resolver is None
                self._guard = PublicAddressResolver(resolver or aiohttp.DefaultResolver(), owns=owned)
                resolver = self._guard
            # No DNS cache: every connection asks the guarded resolver again.
            connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers=_REQUEST_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                # Proxy settings from the environment would move the connection (and the check) elsewhere.
                trust_env=False,
            )
        return self._session

    async def _load(self, client_id: str, url: yarl.URL) -> ClientMetadataDocument:
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http().get(url, allow_redirects=False) as response:
                    self._check_response(response)
                    body = await self._read_capped(response)
                    ttl = _cache_lifetime(response.headers.getall("Cache-Control", []), self._default_ttl)
        except TimeoutError:
            raise ClientMetadataError(f"client_id URL did not answer within {self._timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            # One answer for "no such host" and "internal host", so the endpoint is no oracle for internal DNS.
            if isinstance(exc.os_error, NonPublicAddress | socket.gaierror):
                raise ClientMetadataError(_NOT_PUBLIC) from None
            raise ClientMetadataError("client_id URL could not be reached") from None
        except aiohttp.ClientError:
            raise ClientMetadataError("client_id URL could not be fetched") from None
        document = parse_document(body, client_id)
        self._remember(client_id, document, min(ttl, self._max_ttl))
        return document

    def _check_response(self, response: aiohttp.ClientResponse) -> None:
        if 300 <= response.status < 400:
            raise ClientMetadataError("client_id URL answered with a redirect, and redirects are not followed")
        if response.status != 200:
            raise ClientMetadataError(f"client_id URL answered HTTP {response.status} instead of 200")
        content_type = response.content_type
        if content_type != "application/json" and not (
            content_type.startswith("application/") and content_type.endswith("+json")
        ):
            raise ClientMetadataError("client metadata document is not served as application/json")
        if response.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            raise ClientMetadataError("client metadata document must not be content-encoded")
        if response.content_length is not None and response.content_length > self._max_bytes:
            raise self._too_large()

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        # One byte past the cap is enough to know it is exceeded; nothing beyond it is read.
        while chunk := await response.content.read(self._max_bytes + 1 - len(body)):
            body += chunk
            if len(body) > self._max_bytes:
                response.close()
                raise self._too_large()
        return bytes(body)

    def _too_large(self) -> ClientMetadataError:
        return ClientMetadataError(f"client metadata document is larger than {self._max_bytes} bytes")


def _client_id_url(client_id: str, *, allow_http: bool, allow_private: bool) -> yarl.URL:
    """``client_id`` as the URL to fetch, once it passes the draft's rules and the address policy."""
    if len(client_id) > _MAX_URL_LENGTH or not _URI_CHARACTERS.fullmatch(client_id):
        raise ClientMetadataError(f"client_id must be a URL of at most {_MAX_URL_LENGTH} RFC 3986 characters")
    parts = urlsplit(client_id)
    if parts.scheme != "https" and not (allow_http and parts.scheme == "http"):
        raise ClientMetadataError("client_id URL must use https")
    if "#" in client_id:
        raise ClientMetadataError("client_id URL must not have a fragment")
    if "@" in parts.netloc:
        raise ClientMetadataError("client_id URL must not carry a user name or password")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        raise ClientMetadataError("client_id URL port must be a number from 1 to 65535 when given")
    if parts.path in ("", "/"):
        raise ClientMetadataError("client_id URL must have a path")
    if any(unquote(segment) in (".", "..") for segment in parts.path.split("/")):
        raise ClientMetadataError("client_id URL must not have . or .. path segments")
    _check_host(parts.hostname or "", allow_private=allow_private)
    return yarl.URL(client_id, encoded=True)


def _check_host(host: str, *, allow_private: bool) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        last_label = host.rstrip(".").rsplit(".", 1)[-1]
        if len(host) > _MAX_HOST_LENGTH or not _HOST_NAME.fullmatch(host) or _NUMERIC_LABEL.fullmatch(last_label):
            raise ClientMetadataError("client_id URL host must be a DNS name or an IP address") from None
        return
    # aiohttp connects to an IP literal without asking the resolver, so the literal is checked here.
    if not allow_private and not is_public_address(address):
        raise ClientMetadataError(_NOT_PUBLIC)


def _cache_lifetime(cache_control: list[str], default: float) -> float:
    """Seconds a response may be reused per its ``Cache-Control`` lines (RFC 9111); 0 means not at all."""
    ages: list[str] = []
    for line in cache_control:
        for directive in line.split(","):
            name, _, argument = directive.partition("=")
            name = name.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0.0
            if name == "max-age":
                ages.append(argument.strip().strip('"'))
    if not ages:
        return default
    # RFC 9111 §4.2.1: a malformed or repeated max-age makes the response stale.
    if len(ages) > 1 or not _DIGITS.fullmatch(ages[0]):
        return 0.0
    return float(int(ages[0]))
