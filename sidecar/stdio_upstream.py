"""A stdio MCP server behind the guard: each 2025-11-25 Streamable HTTP session gets its own process.

The process speaks newline-delimited JSON-RPC on stdin/stdout; its stderr is the sidecar's. It starts
in a process group of its own with a minimal environment (never the client's headers or identity), and
the whole group is ended when the session is deleted, goes idle, the process exits, or we shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from mcpguard import UpstreamTimeout, UpstreamUnavailable, asgi_exchange, send_json, state_of

__all__ = ["StdioSettings", "StdioUpstream"]

logger = logging.getLogger("mcpguard.sidecar.stdio")

# What a stdio server needs to find its tools, home, locale and temporary files; nothing else of ours.
_INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TMPDIR", "TZ", "USER")
# The versions a bridged session can speak; a 2026-07-28 client is told to open one of these instead.
_HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
_UNSUPPORTED_PROTOCOL_VERSION = -32022
_PARSE_ERROR = -32700
_INVALID_REQUEST = -32600
_INTERNAL_ERROR = -32603
_SESSION = b"mcp-session-id"
# Server messages kept for a GET stream that is not open yet, and queued per stream for a slow client.
_BACKLOG = 256
_MAX_QUEUED = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class StdioSettings:
    """The command to run per session and the limits that bound what sessions may cost."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_env: tuple[str, ...] = _INHERITED_ENV
    cwd: str | None = None
    max_sessions: int = 64
    idle_timeout: float = 30 * 60.0
    read_timeout: float = 300.0
    max_message_bytes: int = 16 * 1024 * 1024
    terminate_grace: float = 2.0


@dataclass(frozen=True, slots=True)
class _Message:
    data: bytes
    final: bool  # the response that ends a request's stream


@dataclass(frozen=True, slots=True)
class _Failure:
    description: str
    timeout: bool = False


# None: the client went away, or (on a GET stream) the session ended.
_Item = _Message | _Failure | None


class _Channel:
    """Where the messages for one pending request, or for the session's GET stream, are queued."""

    __slots__ = ("queue", "streaming")

    def __init__(self, *, streaming: bool) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.streaming = streaming

    def offer(self, item: _Item) -> None:
        # The reader must never wait on one slow client, so a stream that falls this far behind loses notifications.
        if isinstance(item, _Message) and not item.final and self.queue.qsize() >= _MAX_QUEUED:
            logger.warning("a client is not reading its stream; a server notification was dropped")
            return
        self.queue.put_nowait(item)


class _Session:
    __slots__ = (
        "active",
        "backlog",
        "ended",
        "id",
        "last_active",
        "listener",
        "pending",
        "process",
        "progress",
        "reader",
        "write_lock",
    )

    def __init__(self, session_id: str, process: asyncio.subprocess.Process, now: float) -> None:
        self.id = session_id
        self.process = process
        self.pending: dict[str, _Channel] = {}  # by request id, oldest first
        self.progress: dict[str, str] = {}  # progress token → request id
        self.listener: _Channel | None = None
        self.backlog: deque[bytes] = deque(maxlen=_BACKLOG)
        self.active = 0  # requests and streams being served: a session in use is never idle
        self.last_active = now
        self.ended = False
        self.write_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None


class StdioUpstream:
    """The app behind the guard for a stdio upstream: one process per MCP session, bridged over HTTP."""

    def __init__(self, settings: StdioSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.argv:
            raise ValueError("StdioSettings.argv must name a command")
        self.settings = settings
        self._clock = clock
        self._env = {
            name: value
            for name in settings.inherit_env
            # Exported shell functions are code, not configuration.
            if (value := os.environ.get(name)) is not None and not value.startswith("()")
        } | dict(settings.env)
        self._sessions: dict[str, _Session] = {}
        self._starting = 0
        self._ending: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._exchange = asgi_exchange(self._serve, "/mcp")

    @property
    def session_count(self) -> int:
        """How many sessions (and so processes) are live."""
        return len(self._sessions)

    @property
    def pids(self) -> tuple[int, ...]:
        """The process ids of the live sessions' servers."""
        return tuple(session.process.pid for session in list(self._sessions.values()))

    def command_available(self) -> bool:
        """Whether the command's executable exists and may be run."""
        return shutil.which(self.settings.argv[0], path=self._env.get("PATH")) is not None

    async def exchange(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One exchange with the MCP endpoint in process, as a trusted internal caller (an ``Exchange``)."""
        return await self._exchange(method, headers, body)

    async def close(self) -> None:
        """End every session and wait until each process group is gone."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for session in list(self._sessions.values()):
            self._end(session, _Failure("the sidecar is shutting down"))
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            is_mcp = state_of(scope).is_mcp
        except KeyError:
            is_mcp = False
        if not is_mcp:
            # Only the MCP endpoint is bridged: anything else would reach a process undecided by method.
            await send_json(send, 404, {"error": "not_found", "error_description": "no such endpoint"})
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.lower(), value)
        method = scope["method"]
        raw_session = headers.get(_SESSION)
        if method == "POST":
            await self._post(headers, receive, send)
            return
        if method not in ("GET", "DELETE"):
            await _error(send, 405, None, "use POST, GET or DELETE", reason="method_not_allowed")
            return
        if raw_session is None:
            await _error(send, 400, None, "Bad Request: Missing session ID")
            return
        session = self._sessions.get(raw_session.decode("latin-1"))
        if session is None:
            await _session_not_found(send, None)
        elif method == "DELETE":
            self._end(session, _Failure("the session was ended"))
            await _answer(send, 200, b"", session.id)
        elif b"text/event-stream" not in headers.get(b"accept", b"").lower():
            await _error(send, 406, None, "Not Acceptable: accept text/event-stream")
        elif session.listener is not None:
            await _error(send, 409, None, "Conflict: one GET stream per session")
        else:
            await self._listen(session, receive, send)

    async def _post(self, headers: dict[bytes, bytes], receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive, self.settings.max_message_bytes)
        except _ClientGone:
            return
        if body is None:
            await _error(send, 413, None, "the message is larger than the limit", reason="request_too_large")
            return
        try:
            message = json.loads(body)
        except ValueError:
            await _error(send, 400, None, "Parse error: the body is not JSON", code=_PARSE_ERROR)
            return
        if not isinstance(message, dict):
            await _error(send, 400, None, "expected one JSON-RPC message")
            return
        rid = message.get("id")
        is_request = isinstance(message.get("method"), str) and "id" in message
        # Raw CR and LF can only be insignificant whitespace in valid JSON; removed, the message is one line.
        line = body.replace(b"\r", b"").replace(b"\n", b"")
        accept = headers.get(b"accept", b"").lower()
        accepts_sse = b"text/event-stream" in accept
        raw_session = headers.get(_SESSION)
        if raw_session is None:
            if is_request and message["method"] == "initialize":
                # Its answer is one message, so JSON unless the client can only read a stream.
                only_sse = accepts_sse and b"application/json" not in accept and b"*/*" not in accept
                await self._initialize(rid, line, only_sse, receive, send)
            else:
                await _no_session(send, rid, headers.get(b"mcp-protocol-version"))
            return
        session = self._sessions.get(raw_session.decode("latin-1"))
        if session is None:
            await _session_not_found(send, rid)
            return
        if message.get("method") == "initialize":
            await _error(send, 400, rid, "initialize opens a new session")
            return
        with self._in_use(session):
            if is_request:
                await self._request(session, message, line, accepts_sse, receive, send)
            elif await self._write(session, line):
                await _answer(send, 202, b"", session.id)
            else:
                raise UpstreamUnavailable("the upstream MCP server is no longer running")

    async def _initialize(self, rid: Any, line: bytes, sse: bool, receive: Receive, send: Send) -> None:
        if len(self._sessions) + self._starting >= self.settings.max_sessions:
            await _error(
                send, 503, rid, "too many open sessions", code=_INTERNAL_ERROR, reason="temporarily_unavailable"
            )
            return
        self._starting += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *self.settings.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self.settings.cwd,
                # Its own group: a terminal's Ctrl-C does not reach it, and its children end with it.
                start_new_session=True,
                limit=self.settings.max_message_bytes,
            )
        except OSError as exc:
            logger.warning("the upstream command could not be started: %s", exc.strerror or type(exc).__name__)
            raise UpstreamUnavailable("the upstream MCP server command could not be started") from None
        finally:
            self._starting -= 1
        session = _Session(secrets.token_hex(16), process, self._clock())
        self._sessions[session.id] = session
        session.reader = asyncio.create_task(self._read(session))
        self._start_reaper()
        with self._in_use(session):
            async with self._sent(session, rid, None, line, _Channel(streaming=False), receive) as channel:
                item = await self._next(session, rid, channel, cancellable=False)
        if not isinstance(item, _Message):
            # Nobody can use a session whose opening failed or whose client left before learning its id.
            self._end(session, _Failure("the session was not opened"))
            if item is None:
                return
            if item.timeout:
                raise UpstreamTimeout(item.description)
            raise UpstreamUnavailable(item.description)
        if "error" in json.loads(item.data):
            self._end(session, _Failure("the server refused to initialize"))
            await _answer(send, 200, item.data, None, sse=sse)
            return
        await _answer(send, 200, item.data, session.id, sse=sse)

    async def _request(
        self, session: _Session, message: dict[str, Any], line: bytes, sse: bool, receive: Receive, send: Send
    ) -> None:
        """Send one request; its response comes as JSON, or as a stream with what the server sends meanwhile."""
        rid = message["id"]
        if _key(rid) in session.pending:
            await _error(send, 409, rid, "a request with this id is still pending")
            return
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        async with self._sent(session, rid, token, line, _Channel(streaming=sse), receive) as channel:
            if not sse:
                item = await self._next(session, rid, channel)
                if isinstance(item, _Message):
                    await _answer(send, 200, item.data, session.id)
                elif isinstance(item, _Failure):
                    await send_json(send, 504 if item.timeout else 502, _failure_body(rid, item))
                return
            await send({"type": "http.response.start", "status": 200, "headers": _sse_headers(session.id)})
            while isinstance(item := await self._next(session, rid, channel), _Message):
                await send({"type": "http.response.body", "body": _event(item.data), "more_body": not item.final})
                if item.final:
                    return
            if isinstance(item, _Failure):
                data = json.dumps(_failure_body(rid, item), separators=(",", ":")).encode()
                await send({"type": "http.response.body", "body": _event(data), "more_body": False})

    @contextlib.asynccontextmanager
    async def _sent(
        self, session: _Session, rid: Any, token: Any, line: bytes, channel: _Channel, receive: Receive
    ) -> AsyncIterator[_Channel]:
        """While the request is pending, ``channel`` gets its messages, and ``None`` if the client leaves."""
        key = _key(rid)
        session.pending[key] = channel
        if token is not None:
            session.progress[_key(token)] = key
        watcher = asyncio.create_task(_watch_disconnect(receive, channel))
        try:
            # A failed write ends the session, and so queues the failure for this request.
            await self._write(session, line)
            yield channel
        finally:
            watcher.cancel()
            session.pending.pop(key, None)
            session.progress.pop(_key(token), None)

    @contextlib.contextmanager
    def _in_use(self, session: _Session) -> Iterator[None]:
        session.active += 1
        try:
            yield
        finally:
            session.active -= 1
            session.last_active = self._clock()

    async def _listen(self, session: _Session, receive: Receive, send: Send) -> None:
        """The session's GET stream: server messages that belong to no pending request."""
        channel = _Channel(streaming=True)
        session.listener = channel
        while session.backlog:
            channel.offer(_Message(session.backlog.popleft(), final=False))
        watcher = asyncio.create_task(_watch_disconnect(receive, channel))
        try:
            with self._in_use(session):
                await send({"type": "http.response.start", "status": 200, "headers": _sse_headers(session.id)})
                while isinstance(item := await channel.queue.get(), _Message):
                    await send({"type": "http.response.body", "body": _event(item.data), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if session.listener is channel:
                session.listener = None

    async def _next(self, session: _Session, rid: Any, channel: _Channel, *, cancellable: bool = True) -> _Item:
        try:
            item = await asyncio.wait_for(channel.queue.get(), self.settings.read_timeout)
        except TimeoutError:
            item = _Failure("the upstream MCP server did not answer in time", timeout=True)
        if cancellable and (item is None or (isinstance(item, _Failure) and item.timeout)):
            # Nobody waits for the answer any more: tell the server, so it can stop working on it.
            note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid}}
            await self._write(session, json.dumps(note, separators=(",", ":")).encode())
        return item

    async def _write(self, session: _Session, line: bytes) -> bool:
        stdin = session.process.stdin
        if session.ended or stdin is None:
            return False
        try:
            async with session.write_lock, asyncio.timeout(self.settings.read_timeout):
                stdin.write(line + b"\n")
                await stdin.drain()
        except TimeoutError:
            self._end(session, _Failure("the upstream MCP server stopped reading its input"))
            return False
        except ConnectionError:
            # Usually the process has exited: the reader then ends the session with its exit status.
            if not await _exited(session.process, 1.0):
                self._end(session, _Failure("the upstream MCP server closed its input"))
            return False
        return True

    async def _read(self, session: _Session) -> None:
        """Route every message the process writes, until it closes its output."""
        stdout = session.process.stdout
        failure = _Failure("the upstream MCP server closed its output")
        try:
            while stdout is not None:
                try:
                    line = await stdout.readline()
                except ValueError:
                    failure = _Failure("the upstream MCP server sent a message larger than the limit")
                    return
                if not line:
                    break
                self._route(session, line.replace(b"\r", b"").strip())
            try:
                status = await asyncio.wait_for(session.process.wait(), 1.0)
            except TimeoutError:
                return
            failure = _Failure(f"the upstream MCP server exited (status {status})")
        finally:
            self._end(session, failure)

    def _route(self, session: _Session, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            logger.warning("the upstream MCP server wrote a line that is not JSON; ignored")
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method is None:
            channel = session.pending.get(_key(message.get("id")))
            if channel is not None:
                channel.offer(_Message(line, final=True))
            return
        channel = None
        if method == "notifications/progress" and isinstance(params := message.get("params"), dict):
            request = session.progress.get(_key(params.get("progressToken")))
            channel = session.pending.get(request) if request is not None else None
        if channel is None or not channel.streaming:
            # Stdio carries no request context: what comes while a request streams most likely belongs to it.
            channel = next((c for c in session.pending.values() if c.streaming), None)
        if channel is not None:
            channel.offer(_Message(line, final=False))
        elif session.listener is not None:
            session.listener.offer(_Message(line, final=False))
        else:
            session.backlog.append(line)

    def _end(self, session: _Session, failure: _Failure) -> None:
        """Forget the session at once (404 from now on), fail what waits on it, and reap its processes."""
        if session.ended:
            return
        session.ended = True
        self._sessions.pop(session.id, None)
        for channel in session.pending.values():
            channel.offer(failure)
        if session.listener is not None:
            session.listener.offer(None)
        task = asyncio.create_task(self._terminate(session))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _terminate(self, session: _Session) -> None:
        process, grace = session.process, self.settings.terminate_grace
        if process.returncode is None:
            # The MCP stdio shutdown: close its input, then SIGTERM, then SIGKILL, each after a grace period.
            if process.stdin is not None:
                process.stdin.close()
            if not await _exited(process, grace):
                _signal_group(process, signal.SIGTERM)
                if not await _exited(process, grace):
                    _signal_group(process, signal.SIGKILL)
                    await process.wait()
        # Whatever the server started shares its group and must not outlive the session.
        _signal_group(process, signal.SIGKILL)
        if session.reader is not None:
            session.reader.cancel()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 30.0))
            now = self._clock()
            for session in list(self._sessions.values()):
                if session.active == 0 and now - session.last_active >= timeout:
                    self._end(session, _Failure("the session was idle too long"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start_reaper()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _key(value: Any) -> str:
    """A JSON-RPC id (or progress token) as a dict key that keeps 1 and "1" apart."""
    return json.dumps(value)


async def _exited(process: asyncio.subprocess.Process, within: float) -> bool:
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        return False
    return True


def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(process.pid, sig)


async def _watch_disconnect(receive: Receive, channel: _Channel) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    channel.queue.put_nowait(None)


class _ClientGone(Exception):
    pass


async def _read_body(receive: Receive, cap: int) -> bytes | None:
    """The whole request body, or ``None`` past ``cap``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _event(data: bytes) -> bytes:
    return b"event: message\r\ndata: " + data + b"\r\n\r\n"


def _sse_headers(session_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache, no-transform"),
        (_SESSION, session_id.encode()),
    ]


async def _answer(send: Send, status: int, message: bytes, session_id: str | None, *, sse: bool = False) -> None:
    """A complete answer: one message (as JSON, or as a one-event stream) or, for ``b""``, no body."""
    body = _event(message) if sse and message else message
    headers = [(b"content-length", str(len(body)).encode())]
    if message:
        headers.append((b"content-type", b"text/event-stream" if sse else b"application/json"))
    if session_id is not None:
        headers.append((_SESSION, session_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _failure_body(rid: Any, failure: _Failure) -> dict[str, Any]:
    reason = "gateway_timeout" if failure.timeout else "bad_gateway"
    error = {"code": _INTERNAL_ERROR, "message": failure.description, "data": {"error": reason}}
    return {"jsonrpc": "2.0", "id": rid, "error": error}


async def _error(
    send: Send, status: int, rid: Any, message: str, *, code: int = _INVALID_REQUEST, reason: str = "invalid_request"
) -> None:
    error = {"code": code, "message": message, "data": {"error": reason}}
    await send_json(send, status, {"jsonrpc": "2.0", "id": rid, "error": error})


async def _session_not_found(send: Send, rid: Any) -> None:
    await _error(send, 404, rid, "Session not found", reason="session_not_found")


async def _no_session(send: Send, rid: Any, version: bytes | None) -> None:
    """A request outside any session: only the handshake era is served, so say how to open one."""
    requested = version.decode("latin-1") if version is not None else None
    if requested is None or requested in _HANDSHAKE_VERSIONS:
        await _error(send, 400, rid, "Bad Request: Missing session ID")
        return
    # This code with handshake versions in `supported` is what makes a client fall back to initialize.
    error = {
        "code": _UNSUPPORTED_PROTOCOL_VERSION,
        "message": "Unsupported protocol version: open a 2025-11-25 session with initialize",
        "data": {"supported": list(_HANDSHAKE_VERSIONS), "requested": requested},
    }
    await send_json(send, 400, {"jsonrpc": "2.0", "id": rid, "error": error})
