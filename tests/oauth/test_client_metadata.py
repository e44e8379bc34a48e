"""Fetching Client ID Metadata Documents over real sockets: validation, caching, and every way to misuse the fetch."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from mcpguard.oauth import ClientMetadataDocument, ClientMetadataError, ClientMetadataFetcher
from tests.oauth.test_public_addresses import StaticResolver

DOC = "/oauth/client.json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Site:
    """A test server on 127.0.0.1: its base URL and how many requests each path received."""

    base: str
    port: int
    hits: Counter[str]

    def url(self, path: str = DOC) -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base + path


@asynccontextmanager
async def serving(routes: Mapping[str, Handler]) -> AsyncIterator[Site]:
    """Serve ``routes`` with aiohttp on a free port of 127.0.0.1, counting every request by path."""
    hits: Counter[str] = Counter()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        hits[request.path] += 1
        handler = routes.get(request.path)
        return web.Response(status=404) if handler is None else await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    # Handlers of requests whose client went away are cancelled, so shutdown never waits on them.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield Site(base=f"http://127.0.0.1:{port}", port=port, hits=hits)
    finally:
        await runner.cleanup()


def own_url(request: web.Request) -> str:
    """The URL the request was sent to, which a valid document names as its client_id."""
    return f"http://{request.host}{request.rel_url}"


def metadata(request: web.Request, **members: Any) -> dict[str, Any]:
    """A valid document for the URL of ``request``, with ``members`` added or replaced."""
    return {
        "client_id": own_url(request),
        "client_name": "Example Assistant",
        "redirect_uris": ["http://127.0.0.1:33418/callback"],
        **members,
    }


def document(
    *, headers: Mapping[str, str] | None = None, content_type: str = "application/json", **members: Any
) -> Handler:
    """A handler answering with a valid document (plus ``members``) and the given headers."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = json.dumps(metadata(request, **members)).encode()
        return web.Response(body=body, headers={"Content-Type": content_type, **(headers or {})})

    return handle


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetcher(**options: Any) -> ClientMetadataFetcher:
    """A fetcher that may reach the local test server, unless ``options`` say otherwise."""
    return ClientMetadataFetcher(**{"allow_http": True, "allow_private": True, **options})


def fetch_all(handler: Handler, paths: list[str], **options: Any) -> tuple[list[ClientMetadataDocument], Counter[str]]:
    """Fetch ``paths`` one after another from a server answering ``handler`` on each; documents and hits."""

    async def go() -> tuple[list[ClientMetadataDocument], Counter[str]]:
        routes = {path: handler for path in paths}
        async with serving(routes) as site, fetcher(**options) as client:
            return [await client.fetch(site.url(path)) for path in paths], site.hits

    return asyncio.run(go())


def refusal(routes: Mapping[str, Handler], path: str = DOC, **options: Any) -> tuple[ClientMetadataError, Site]:
    """The error fetching ``path`` raises, and the server it was fetched from."""

    async def go() -> tuple[ClientMetadataError, Site]:
        async with serving(routes) as site, fetcher(**options) as client:
            with pytest.raises(ClientMetadataError) as refused:
                await client.fetch(site.url(path))
            return refused.value, site

    return asyncio.run(go())


def test_valid_document_fetched_and_validated() -> None:
    """A document served as JSON from its own URL comes back validated, with its fields."""
    (fetched,), hits = fetch_all(document(scope="mcp:read"), [DOC])
    assert fetched.client_id.endswith(DOC)
    assert fetched.client_name == "Example Assistant"
    assert fetched.redirect_uris == ("http://127.0.0.1:33418/callback",)
    assert fetched.grant_types == ("authorization_code", "refresh_token")
    assert fetched.response_types == ("code",)
    assert fetched.token_endpoint_auth_method == "none"
    assert fetched.scope == "mcp:read"
    assert hits[DOC] == 1


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/client-metadata+json"]
)
def test_json_media_types_accepted(content_type: str) -> None:
    """application/json, with parameters or as a more specific +json type, is accepted."""
    (fetched,), _ = fetch_all(document(content_type=content_type), [DOC])
    assert fetched.client_name == "Example Assistant"


def test_hostname_resolved_through_the_given_resolver() -> None:
    """A named host is resolved by the injected resolver, and the document is fetched from its answer."""
    resolver = StaticResolver({"client.test": ["127.0.0.1"]})

    async def go() -> tuple[str, ClientMetadataDocument, Counter[str]]:
        async with serving({DOC: document()}) as site, fetcher(resolver=resolver) as client:
            url = f"http://client.test:{site.port}{DOC}"
            return url, await client.fetch(url), site.hits

    url, fetched, hits = asyncio.run(go())
    assert fetched.client_id == url
    assert resolver.asked == ["client.test"]
    assert hits[DOC] == 1


class TestCache:
    """Documents are reused for as long as their server allows, and no longer."""

    def run(self, handler: Handler, steps: list[float], **options: Any) -> list[int]:
        """Fetch the document once per step, advancing the clock by each step first; the hit count after each."""
        clock = Clock()

        async def go() -> list[int]:
            counts = []
            async with serving({DOC: handler}) as site, fetcher(clock=clock, **options) as client:
                for step in steps:
                    clock.now += step
                    await client.fetch(site.url())
                    counts.append(site.hits[DOC])
            return counts

        return asyncio.run(go())

    def test_second_fetch_served_from_cache(self) -> None:
        """Fetching the same client again within its lifetime makes no request."""
        assert self.run(document(), [0, 0, 1]) == [1, 1, 1]

    def test_max_age_honoured(self) -> None:
        """A document is reused until its max-age has passed, then fetched again."""
        handler = document(headers={"Cache-Control": "public, max-age=60"})
        assert self.run(handler, [0, 59.9, 0.1, 30]) == [1, 1, 2, 2]

    def test_max_age_capped_at_max_ttl(self) -> None:
        """A max-age longer than max_ttl is cut to max_ttl."""
        handler = document(headers={"Cache-Control": "max-age=31536000"})
        assert self.run(handler, [0, 999, 1], max_ttl=1000) == [1, 1, 2]

    def test_default_ttl_without_cache_control(self) -> None:
        """A document without Cache-Control is reused for default_ttl."""
        assert self.run(document(), [0, 299, 1], default_ttl=300) == [1, 1, 2]

    @pytest.mark.parametrize(
        "cache_control", ["no-store", "private, no-cache", "max-age=0", "max-age=60, max-age=60", "max-age=1e3"]
    )
    def test_uncacheable_document_fetched_every_time(self, cache_control: str) -> None:
        """no-store, no-cache, a zero max-age and a malformed or repeated max-age all mean no reuse."""
        handler = document(headers={"Cache-Control": cache_control})
        assert self.run(handler, [0, 0, 0]) == [1, 2, 3]

    def test_least_recently_used_evicted(self) -> None:
        """Past cache_max entries, the least recently used document is dropped first."""
        paths = ["/a.json", "/b.json", "/a.json", "/c.json", "/a.json", "/b.json"]
        _, hits = fetch_all(document(), paths, cache_max=2)
        assert hits == Counter({"/a.json": 1, "/b.json": 2, "/c.json": 1})

    def test_failure_not_cached(self) -> None:
        """A refused fetch is tried again next time, so a fixed document works at once."""
        answers = iter([web.Response(status=503), None])

        async def flaky(request: web.Request) -> web.StreamResponse:
            answer = next(answers)
            return answer if answer is not None else await document()(request)

        async def go() -> tuple[str, ClientMetadataDocument, int]:
            async with serving({DOC: flaky}) as site, fetcher() as client:
                with pytest.raises(ClientMetadataError) as refused:
                    await client.fetch(site.url())
                return str(refused.value), await client.fetch(site.url()), site.hits[DOC]

        failure, fetched, hits = asyncio.run(go())
        assert failure == "client_id URL answered HTTP 503 instead of 200"
        assert fetched.client_name == "Example Assistant"
        assert hits == 2

    def test_concurrent_fetches_share_one_request(self) -> None:
        """Ten callers asking for the same uncached client at once cause a single request."""
        entered, release = asyncio.Event(), asyncio.Event()

        async def held(request: web.Request) -> web.StreamResponse:
            entered.set()
            await release.wait()
            return await document()(request)

        async def go() -> tuple[list[ClientMetadataDocument], int]:
            async with serving({DOC: held}) as site, fetcher() as client:
                callers = [asyncio.create_task(client.fetch(site.url())) for _ in range(10)]
                await entered.wait()
                release.set()
                return await asyncio.gather(*callers), site.hits[DOC]

        fetched, hits = asyncio.run(go())
        assert hits == 1
        assert all(each is fetched[0] for each in fetched)


def test_close_lets_a_fetch_under_way_finish() -> None:
    """Closing while a fetch is under way waits for it, and its caller still gets the document."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        entered.set()
        await release.wait()
        return await document()(request)

    async def go() -> ClientMetadataDocument:
        async with serving({DOC: held}) as site:
            client = fetcher()
            caller = asyncio.create_task(client.fetch(site.url()))
            await entered.wait()
            closing = asyncio.create_task(client.close())
            await asyncio.sleep(0)
            assert not closing.done()
            release.set()
            await closing
            return await caller

    assert asyncio.run(go()).client_name == "Example Assistant"


def test_closed_fetcher_cannot_fetch() -> None:
    """After close() the fetcher raises instead of opening a new session; closing twice is harmless."""

    async def go() -> None:
        client = fetcher()
        await client.close()
        await client.close()
        await client.fetch("http://127.0.0.1:9/oauth/client.json")

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(go())


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"max_bytes": 0}, {"cache_max": -1}, {"default_ttl": 100, "max_ttl": 10}, {"default_ttl": -1}],
)
def test_unusable_settings_fail_construction(options: dict[str, Any]) -> None:
    """A zero timeout or size cap, a negative cache, or a default lifetime past the maximum is refused."""
    with pytest.raises(ValueError, match="must"):
        ClientMetadataFetcher(**options)


@pytest.mark.threat("T-CIMD-SSRF")
class TestRefused:
    """With default settings nothing internal is reachable, and every response rule holds."""

    @pytest.mark.parametrize(
        ("client_id", "rule"),
        [
            ("http://client.example/oauth/client.json", "must use https"),
            ("ftp://client.example/oauth/client.json", "must use https"),
            ("file:///etc/passwd", "must use https"),
            ("https://client.example", "must have a path"),
            ("https://client.example/", "must have a path"),
            ("https://client.example/oauth/client.json#x", "fragment"),
            ("https://client.example/oauth/client.json#", "fragment"),
            ("https://user@client.example/oauth/client.json", "user name or password"),
            ("https://user:pw@client.example/oauth/client.json", "user name or password"),
            ("https://client.example@127.0.0.1/oauth/client.json", "user name or password"),
            ("https://client.example/oauth/../admin", r"\. or \.\. path segments"),
            ("https://client.example/./client.json", r"\. or \.\. path segments"),
            ("https://client.example/oauth/%2e%2E/admin", r"\. or \.\. path segments"),
            ("https://client.example:/oauth/client.json", "port"),
            ("https://client.example:0/oauth/client.json", "port"),
            ("https://client.example:65536/oauth/client.json", "port"),
            ("https://client.example:https/oauth/client.json", "port"),
            ("https://2130706433/oauth/client.json", "DNS name or an IP address"),
            ("https://127.1/oauth/client.json", "DNS name or an IP address"),
            ("https://0x7f.0.0.1/oauth/client.json", "DNS name or an IP address"),
            ("https://017700000001/oauth/client.json", "DNS name or an IP address"),
            ("https://client_example.test/oauth/client.json", "DNS name or an IP address"),
            ("https:///oauth/client.json", "DNS name or an IP address"),
            ("https://" + "a" * 64 + ".example/oauth/client.json", "DNS name or an IP address"),
            ("https://" + "a." * 127 + "example/oauth/client.json", "DNS name or an IP address"),
            ("https://-client.example/oauth/client.json", "DNS name or an IP address"),
            ("https://client.example/oauth/client json", "RFC 3986"),
            ("https://client.example\\@127.0.0.1/oauth/client.json", "RFC 3986"),
            ("https://clïent.example/oauth/client.json", "RFC 3986"),
            ("https://client.example/" + "a" * 2000, "RFC 3986"),
        ],
    )
    def test_malformed_client_id_refused(self, client_id: str, rule: str) -> None:
        """The draft's URL rules: https, a path, no fragment, no user info, no dot segments, a sane host and port."""

        async def go() -> None:
            async with ClientMetadataFetcher() as client:
                await client.fetch(client_id)

        with pytest.raises(ClientMetadataError, match=rule):
            asyncio.run(go())

    @pytest.mark.parametrize(
        "host",
        [
            "127.0.0.1",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "192.168.0.10",
            "100.64.0.1",
            "0.0.0.0",
            "[::]",
            "[::ffff:127.0.0.1]",
            "[::ffff:a9fe:a9fe]",
            "[64:ff9b::7f00:1]",
            "[fe80::1%25eth0]",
            "[fd00::1]",
        ],
    )
    def test_internal_address_literal_refused(self, host: str) -> None:
        """A client_id naming an internal address directly is refused before any connection."""

        async def go() -> None:
            async with ClientMetadataFetcher(timeout=30) as client:
                await client.fetch(f"https://{host}/oauth/client.json")

        with pytest.raises(ClientMetadataError, match="does not resolve to a public address"):
            asyncio.run(go())

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
    def test_loopback_server_refused_without_a_request(self, host: str) -> None:
        """A live server on loopback, named by address or by a name resolving there, never sees a request."""

        async def go() -> tuple[str, Counter[str]]:
            async with serving({DOC: document()}) as site, fetcher(allow_private=False) as client:
                with pytest.raises(ClientMetadataError) as refused:
                    await client.fetch(f"http://{host}:{site.port}{DOC}")
                return str(refused.value), site.hits

        description, hits = asyncio.run(go())
        assert description == "client_id host does not resolve to a public address"
        assert sum(hits.values()) == 0

    @pytest.mark.parametrize("answer", [["127.0.0.1"], ["93.184.215.14", "127.0.0.1"], ["::ffff:127.0.0.1"]])
    def test_rebound_dns_answer_refused_at_connect(self, answer: list[str]) -> None:
        """A name whose DNS answer points inside is refused by the connection's own resolver: no request is made."""
        resolver = StaticResolver({"rebind.test": answer})

        async def go() -> tuple[str, Counter[str]]:
            async with serving({DOC: document()}) as site, fetcher(allow_private=False, resolver=resolver) as client:
                with pytest.raises(ClientMetadataError) as refused:
                    await client.fetch(f"http://rebind.test:{site.port}{DOC}")
                return str(refused.value), site.hits

        description, hits = asyncio.run(go())
        assert description == "client_id host does not resolve to a public address"
        assert resolver.asked == ["rebind.test"]
        assert sum(hits.values()) == 0

    def test_unknown_host_answered_like_an_internal_one(self) -> None:
        """A name that does not resolve gets the same description, so refusals do not map internal DNS."""
        resolver = StaticResolver({})

        async def go() -> None:
            async with fetcher(allow_private=False, resolver=resolver) as client:
                await client.fetch("https://nowhere.test/oauth/client.json")

        with pytest.raises(ClientMetadataError, match=r"^client_id host does not resolve to a public address$"):
            asyncio.run(go())

    @pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
    def test_redirect_refused_even_to_an_allowed_place(self, status: int) -> None:
        """A redirect is never followed, even to a valid document on the same server."""

        async def moved(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": DOC})

        error, site = refusal({"/old.json": moved, DOC: document()}, "/old.json")
        assert "redirect" in str(error)
        assert site.hits == Counter({"/old.json": 1})

    @pytest.mark.parametrize("status", [201, 204, 404, 500])
    def test_status_other_than_200_refused(self, status: int) -> None:
        """Only 200 OK carries a document."""

        async def answer(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, content_type="application/json", text="{}")

        error, _ = refusal({DOC: answer})
        assert str(error) == f"client_id URL answered HTTP {status} instead of 200"

    @pytest.mark.parametrize("content_type", ["text/html", "text/plain", "application/javascript", "application/jsonx"])
    def test_wrong_content_type_refused(self, content_type: str) -> None:
        """A valid document served as anything but JSON is refused."""
        error, _ = refusal({DOC: document(content_type=content_type)})
        assert str(error) == "client metadata document is not served as application/json"

    def test_compressed_body_refused(self) -> None:
        """A content-encoded body is refused rather than inflated past the size cap."""

        async def gzipped(request: web.Request) -> web.StreamResponse:
            body = gzip.compress(json.dumps(metadata(request)).encode())
            return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

        error, _ = refusal({DOC: gzipped})
        assert str(error) == "client metadata document must not be content-encoded"

    def test_oversized_body_with_content_length_refused(self) -> None:
        """A body whose Content-Length exceeds max_bytes is refused."""
        error, _ = refusal({DOC: document(padding="x" * 6000)})
        assert str(error) == "client metadata document is larger than 5120 bytes"

    def test_oversized_chunked_body_refused_without_reading_on(self) -> None:
        """A chunked body that never ends is cut off just past max_bytes, long before the timeout."""

        async def endless(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b'{"padding": "')
            # Bounded only as a backstop: the client is expected to hang up after about 1 KiB.
            for _ in range(1_000_000):
                await response.write(b"x" * 256)
            return response

        error, _ = refusal({DOC: endless}, max_bytes=1024, timeout=20)
        assert str(error) == "client metadata document is larger than 1024 bytes"

    @pytest.mark.parametrize(("cap", "accepted"), [(1000, True), (999, False)])
    def test_size_cap_is_inclusive(self, cap: int, accepted: bool) -> None:
        """A document of exactly max_bytes is read; one byte more is refused."""

        async def thousand_bytes(request: web.Request) -> web.StreamResponse:
            unpadded = len(json.dumps(metadata(request, padding="")).encode())
            body = json.dumps(metadata(request, padding="x" * (1000 - unpadded))).encode()
            assert len(body) == 1000
            return web.Response(body=body, content_type="application/json")

        if accepted:
            (fetched,), _ = fetch_all(thousand_bytes, [DOC], max_bytes=cap)
            assert fetched.client_name == "Example Assistant"
        else:
            error, _ = refusal({DOC: thousand_bytes}, max_bytes=cap)
            assert str(error) == "client metadata document is larger than 999 bytes"

    def test_slow_server_refused_after_timeout(self) -> None:
        """A server that never answers is given up on after the timeout."""

        async def silent(request: web.Request) -> web.StreamResponse:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        error, _ = refusal({DOC: silent}, timeout=0.2)
        assert str(error) == "client_id URL did not answer within 0.2 s"

    def test_trickled_body_refused_after_timeout(self) -> None:
        """The timeout bounds the whole fetch, so a body sent a byte at a time cannot hold it open."""

        async def trickle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for byte in json.dumps(metadata(request)).encode():
                await response.write(bytes([byte]))
                await asyncio.sleep(0.02)
            return response

        error, _ = refusal({DOC: trickle}, timeout=0.3)
        assert str(error) == "client_id URL did not answer within 0.3 s"

    @pytest.mark.parametrize(
        ("spoof", "rule"),
        [
            (lambda url: {"client_id": url + "/"}, "does not equal the URL"),
            (lambda url: {"client_id": url.replace("/oauth/", "/OAuth/")}, "does not equal the URL"),
            (lambda url: {"client_id": "https://trusted.example/oauth/client.json"}, "does not equal the URL"),
            (lambda url: {"client_secret": "s3cret"}, "must not carry a client secret"),
            (lambda url: {"redirect_uris": ["https://client.example/cb#frag"]}, "redirect URI"),
            (lambda url: {"redirect_uris": ["http://client.example/cb"]}, "redirect URI"),
        ],
        ids=["trailing-slash", "case", "other-client", "secret", "fragment", "http-not-loopback"],
    )
    def test_spoofed_document_refused(self, spoof: Callable[[str], dict[str, Any]], rule: str) -> None:
        """The document rules apply to what comes over the wire: exact client_id, no secret, safe redirects."""

        async def spoofed(request: web.Request) -> web.StreamResponse:
            return web.json_response(metadata(request, **spoof(own_url(request))))

        error, _ = refusal({DOC: spoofed})
        assert rule in str(error)

    def test_user_info_refused_even_when_everything_is_allowed(self) -> None:
        """The URL rules hold when http and private addresses are allowed: user info never reaches the server."""

        async def go() -> tuple[str, Counter[str]]:
            async with serving({DOC: document()}) as site, fetcher() as client:
                with pytest.raises(ClientMetadataError) as refused:
                    await client.fetch(f"http://user@127.0.0.1:{site.port}{DOC}")
                return str(refused.value), site.hits

        description, hits = asyncio.run(go())
        assert description == "client_id URL must not carry a user name or password"
        assert sum(hits.values()) == 0
