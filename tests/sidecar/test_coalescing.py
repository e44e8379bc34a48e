"""The sidecar's HTTP server sends a response's head with its body, and still streams."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sidecar.coalescing import CoalescingHttpToolsProtocol
from tests.conftest import serve

LATE_SECONDS = 0.3
# Lets /stream send its second chunk once the client holds the first.
RELEASE = threading.Event()


class Writes:
    """What reached the connection's socket transport, write by write, with when."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, bytes]] = []

    def of(self, marker: bytes) -> list[tuple[float, bytes]]:
        """The writes of the response whose body holds ``marker``: from its head up to the marker."""
        end = next(i for i, (_, data) in enumerate(self.seen) if marker in data)
        start = max(i for i, (_, data) in enumerate(self.seen[: end + 1]) if data.startswith(b"HTTP/1.1 "))
        return self.seen[start : end + 1]


class RecordingTransport:
    """The socket's own transport, with every write noted on its way through."""

    def __init__(self, transport: Any, writes: Writes) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.seen.append((time.monotonic(), bytes(data)))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def recording(protocol: type[HttpToolsProtocol], writes: Writes) -> type[HttpToolsProtocol]:
    class Recording(protocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(RecordingTransport(transport, writes))

    return Recording


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] == "/small":
        headers.append((b"content-length", b"10"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] == "/late":
        await asyncio.sleep(LATE_SECONDS)
        await send({"type": "http.response.body", "body": b"late body"})
    elif scope["path"] == "/stream":
        await send({"type": "http.response.body", "body": b"first chunk", "more_body": True})
        await asyncio.to_thread(RELEASE.wait, 10)
        await send({"type": "http.response.body", "body": b"second chunk"})
    else:
        await send({"type": "http.response.body", "body": b"small body"})


@pytest.fixture
def served() -> Any:
    writes = Writes()
    with serve(app, http=recording(CoalescingHttpToolsProtocol, writes)) as url:
        yield url, writes


def test_head_and_body_sent_together_leave_in_one_write(served: Any) -> None:
    """A small answer reaches the socket as one write, head and body, on every call of a kept-alive connection."""
    url, writes = served
    with httpx.Client(base_url=url) as client:
        answers = [client.get("/small").text for _ in range(3)]
    assert answers == ["small body"] * 3
    whole = [data for _, data in writes.seen]
    assert len(whole) == 3
    assert all(data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nsmall body") for data in whole)


def test_uvicorn_alone_writes_head_and_body_apart() -> None:
    """The premise: without the coalescing protocol the same answer takes two writes."""
    writes = Writes()
    with serve(app, http=recording(HttpToolsProtocol, writes)) as url:
        assert httpx.get(url + "/small").text == "small body"
    assert len(writes.of(b"small body")) == 2


def test_a_head_waits_for_no_late_body(served: Any) -> None:
    """A head whose body comes later leaves on its own, long before the body."""
    url, writes = served
    assert httpx.get(url + "/late").text == "late body"
    (head_at, head), (body_at, body) = writes.of(b"late body")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert b"late body" in body
    assert body_at - head_at >= LATE_SECONDS * 0.8


def test_a_stream_still_arrives_chunk_by_chunk(served: Any) -> None:
    """The first chunk reaches the client while the app is still holding back the second."""
    url, _ = served
    RELEASE.clear()
    with httpx.stream("GET", url + "/stream", timeout=10) as response:
        chunks = response.iter_bytes()
        assert next(chunks) == b"first chunk"
        RELEASE.set()
        assert b"".join(chunks) == b"second chunk"
