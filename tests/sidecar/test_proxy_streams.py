"""Streaming and framing through the sidecar against an upstream the test controls byte for byte."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, open_store
from sidecar.app import build_sidecar
from sidecar.proxy import ProxySettings
from tests.conftest import cheap_keyring, free_port, make_keys, serve

EVENTS = 5
GAP = 0.15
CAP = 64 * 1024
PIECES = (b'{"jsonrpc":"2.0",', b'"id":1,', b'"result":{}}')
# The MCP call the sidecar forwards for the answers above (only MCP traffic reaches the upstream).
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


@dataclass
class Upstream:
    """GET /mcp: SSE events GAP apart; POST /mcp?pieces: JSON in pieces; any other POST: a body over the cap,
    sized (``?sized``) or chunked; logs every hit."""

    hits: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.hits.append(f"{scope['method']} {scope['path']}")
        while (await receive()).get("more_body"):
            pass
        if scope["method"] == "GET":
            start = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            for index in range(EVENTS):
                data = f'{{"jsonrpc":"2.0","method":"notifications/n","params":{{"i":{index}}}}}'
                event = f"event: message\ndata: {data}\n\n"
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await asyncio.sleep(GAP)
            await send({"type": "http.response.body", "body": b""})
            return
        query = scope.get("query_string", b"")
        if b"pieces" in query:
            # A JSON answer without a length that arrives in pieces GAP apart.
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for piece in PIECES:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(GAP)
            await send({"type": "http.response.body", "body": b""})
            return
        sized = b"sized" in query
        headers = [(b"content-type", b"application/json")]
        if sized:
            headers.append((b"content-length", str(4 * CAP).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(4):
            await send({"type": "http.response.body", "body": b" " * CAP, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Rig:
    direct: str
    sidecar: str
    upstream: Upstream
    key: str


@pytest.fixture(scope="module", params=["aiohttp", "pool"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    upstream = Upstream()
    store = open_store("memory://")
    key = make_keys(store, {"admin": ("acme", ["mcp:admin"])})["admin"]
    with serve(upstream) as direct:
        port = free_port()
        app = build_sidecar(
            config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            proxy=ProxySettings(upstream=f"{direct}/mcp", max_response_bytes=CAP, client=request.param),
            store=store,
            keys=cheap_keyring(store),
        )
        with serve(app, port) as url:
            yield Rig(direct, url, upstream, key)


def arrivals(url: str, headers: dict[str, str]) -> list[float]:
    start = time.monotonic()
    times = []
    with httpx.stream("GET", url + "/mcp", headers=headers, timeout=10) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                times.append(time.monotonic() - start)
    return times


def test_sse_events_arrive_as_direct(rig: Rig) -> None:
    """Each SSE event reaches the client through the sidecar about when it does directly: nothing is buffered."""
    direct = arrivals(rig.direct, {})
    proxied = arrivals(rig.sidecar, {"Authorization": f"Bearer {rig.key}"})
    assert len(direct) == len(proxied) == EVENTS
    # Events are GAP apart at the source; buffering would bunch them up at the end.
    for index in range(1, EVENTS):
        assert proxied[index] - proxied[index - 1] > GAP * 0.5
    assert proxied[-1] - proxied[0] > (direct[-1] - direct[0]) * 0.7
    assert proxied[0] < proxied[-1] - GAP * (EVENTS - 2)


def test_unsized_answer_in_pieces_arrives_whole_and_as_it_comes(rig: Rig) -> None:
    """An answer without a length is relayed piece by piece as the upstream sends it, and arrives complete."""
    start = time.monotonic()
    pieces: list[tuple[float, bytes]] = []
    auth = {"Authorization": f"Bearer {rig.key}"}
    with httpx.stream("POST", rig.sidecar + "/mcp?pieces", json=PING, headers=auth, timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            pieces.append((time.monotonic() - start, chunk))
    assert b"".join(chunk for _, chunk in pieces) == b"".join(PIECES)
    # Waiting for the whole answer would deliver everything at once, at the end.
    assert pieces[-1][0] - pieces[0][0] > GAP * (len(PIECES) - 2)


@pytest.mark.threat("T-BODY-EXHAUST")
def test_oversized_upstream_answer_refused_or_cut(rig: Rig) -> None:
    """An upstream answer over the cap is a 502 when its size is declared, and an aborted stream when not."""
    auth = {"Authorization": f"Bearer {rig.key}"}
    declared = httpx.post(rig.sidecar + "/mcp?sized=1", json=PING, headers=auth)
    assert declared.status_code == 502
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(rig.sidecar + "/mcp", json=PING, headers=auth, timeout=10)


@pytest.mark.threat("T-SMUGGLE")
@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        b"Content-Length: 4\r\nContent-Length: 40\r\n",
    ],
    ids=["cl-and-te", "two-te", "two-cl"],
)
def test_ambiguous_framing_refused_and_not_forwarded(rig: Rig, framing: bytes) -> None:
    """A request framed two ways is refused before the guard, and no smuggled request reaches the upstream."""
    before = list(rig.upstream.hits)
    host = rig.sidecar.removeprefix("http://")
    smuggled = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (
        b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Authorization: Bearer " + rig.key.encode() + b"\r\n" + framing + b"\r\n"
        b"0\r\n\r\n" + smuggled
    )
    hostname, port = host.split(":")
    with socket.create_connection((hostname, int(port)), timeout=5) as conn:
        conn.sendall(request)
        conn.settimeout(2)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.count(b"HTTP/1.1") == 1
    assert rig.upstream.hits == before


@pytest.mark.threat("T-PATH-EVASION")
@pytest.mark.parametrize("path", ["/messages/?session_id=1", "/api/v1/mcp", "/mcp%3F", "/"])
def test_only_mcp_traffic_reaches_the_upstream(rig: Rig, path: str) -> None:
    """A path the guard does not classify as MCP is answered 404 by the sidecar, the upstream never asked."""
    before = list(rig.upstream.hits)
    answer = httpx.post(rig.sidecar + path, json=PING, headers={"Authorization": f"Bearer {rig.key}"})
    assert answer.status_code == 404
    assert rig.upstream.hits == before
