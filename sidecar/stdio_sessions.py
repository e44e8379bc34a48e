"""The processes behind a stdio upstream: one per session, each speaking newline-delimited JSON-RPC.

A process starts in a process group of its own with a minimal environment (never the client's headers or
identity) and a temporary directory of its own (``stdio_processes.py``), its stderr is the sidecar's, and the
whole group is ended (and that directory removed) when the session is deleted, goes idle, the process exits,
or we shut down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcpguard import read_json
from sidecar.stdio_processes import (
    TEMP_ENV,
    discard_temp_dir,
    exited,
    make_temp_dir,
    parent_death_prefix,
    raise_not_started,
    remove_temp_dir,
    signal_group,
    spawn,
)

__all__ = ["Channel", "ChannelItem", "Failure", "Message", "Session", "StdioSessions", "StdioSettings"]

logger = logging.getLogger("mcpguard.sidecar.stdio")

# What a stdio server needs to find its tools, home and locale; nothing else of ours.
_INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TZ", "USER")
# Server messages kept for a GET stream that is not open yet, and queued per stream for a slow client.
_BACKLOG = 256
_MAX_QUEUED = 1024
# How long, once a server has exited, a line it wrote before is waited for (it is normally buffered already).
_EXIT_GRACE = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class StdioSettings:
    """The command to run per session and the limits that bound what sessions may cost.

    ``cwd`` is shared by every session's process (the server's own files live there); ``temp_root`` is where each
    session's private temporary directory is made (``None``: the sidecar's own temporary directory).
    """

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_env: tuple[str, ...] = _INHERITED_ENV
    cwd: str | None = None
    temp_root: str | None = None
    max_sessions: int = 64
    idle_timeout: float = 30 * 60.0
    read_timeout: float = 300.0
    max_message_bytes: int = 16 * 1024 * 1024
    terminate_grace: float = 2.0


@dataclass(frozen=True, slots=True)
class Message:
    """One line the server wrote, on its way to the client."""

    data: bytes
    final: bool  # the response that ends a request's stream


@dataclass(frozen=True, slots=True)
class Failure:
    """Why no (further) answer will come from the server."""

    description: str
    timeout: bool = False


# None: the client went away, or (on a GET stream) the session ended.
ChannelItem = Message | Failure | None


class Channel:
    """Where the messages for one pending request, or for the session's GET stream, are queued."""

    __slots__ = ("queue", "streaming")

    def __init__(self, *, streaming: bool) -> None:
        self.queue: asyncio.Queue[ChannelItem] = asyncio.Queue()
        self.streaming = streaming

    def offer(self, item: ChannelItem) -> None:
        """Queue ``item`` without ever waiting."""
        # The reader must never wait on one slow client, so a stream that falls this far behind loses notifications.
        if isinstance(item, Message) and not item.final and self.queue.qsize() >= _MAX_QUEUED:
            logger.warning("a client is not reading its stream; a server notification was dropped")
            return
        self.queue.put_nowait(item)


class Session:
    """One MCP session: its server process and whoever waits for what that process writes."""

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
        "temp_dir",
        "tenant",
        "write_lock",
    )

    def __init__(
        self,
        session_id: str,
        process: asyncio.subprocess.Process,
        now: float,
        tenant: str | None = None,
        *,
        temp_dir: str,
    ) -> None:
        self.id = session_id
        self.process = process
        self.tenant = tenant
        self.temp_dir = temp_dir  # the process's TMPDIR, removed once its group is gone
        self.pending: dict[str, Channel] = {}  # by request id, oldest first
        self.progress: dict[str, str] = {}  # progress token → request id
        self.listener: Channel | None = None
        self.backlog: deque[bytes] = deque(maxlen=_BACKLOG)
        self.active = 0  # requests and streams being served: a session in use is never idle
        self.last_active = now
        self.ended = False
        self.write_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None

    def is_pending(self, rid: Any) -> bool:
        """Whether a request with this JSON-RPC id still waits for its response."""
        return _key(rid) in self.pending

    @contextlib.contextmanager
    def awaiting(self, rid: Any, token: Any, channel: Channel) -> Iterator[None]:
        """While inside, ``channel`` gets the response to ``rid`` and the progress reported for ``token``."""
        key = _key(rid)
        self.pending[key] = channel
        if token is not None:
            self.progress[_key(token)] = key
        try:
            yield
        finally:
            self.pending.pop(key, None)
            self.progress.pop(_key(token), None)


class StdioSessions:
    """The live sessions of a stdio upstream: starts their processes, routes their output, and ends them."""

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
        # Resolved once: a server outlives a sidecar killed outright only where this is empty.
        self._prefix = parent_death_prefix()
        self._sessions: dict[str, Session] = {}
        # Processes being started, by the tenant they are for.
        self._starting_for: collections.Counter[str | None] = collections.Counter()
        self._ending_for: collections.Counter[str | None] = collections.Counter()
        self._ending: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        """How many sessions (and so processes) are live."""
        return len(self._sessions)

    @property
    def pids(self) -> tuple[int, ...]:
        """The process ids of the live sessions' servers."""
        return tuple(session.process.pid for session in list(self._sessions.values()))

    def command_available(self) -> bool:
        """Whether the command's executable exists and may be run (a relative path from where it is started)."""
        command = self.settings.argv[0]
        if os.sep in command and not os.path.isabs(command) and self.settings.cwd is not None:
            command = os.path.join(self.settings.cwd, command)
        return shutil.which(command, path=self._env.get("PATH")) is not None

    def get(self, session_id: str) -> Session | None:
        """The live session with this id, if any."""
        return self._sessions.get(session_id)

    async def start(self, tenant: str | None = None) -> Session | None:
        """A new session with a process of its own, or ``None`` when ``max_sessions`` are live already, or when
        ``tenant`` holds half of them: one tenant opening sessions cannot leave the others none."""
        # A process still being stopped (a server slow to exit) holds its place until it is gone.
        if len(self._sessions) + self._starting_for.total() + self._ending_for.total() >= self.settings.max_sessions:
            return None
        if tenant is not None:
            held = sum(1 for session in self._sessions.values() if session.tenant == tenant)
            if held + self._starting_for[tenant] + self._ending_for[tenant] >= max(1, self.settings.max_sessions // 2):
                return None
        if self._prefix and not self.command_available():
            # Started through setpriv, a missing command would only show as setpriv's exit status.
            raise_not_started(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
        self._starting_for[tenant] += 1
        try:
            temp_dir = make_temp_dir(self.settings.temp_root)
            try:
                process = await spawn(
                    self.settings.argv,
                    env=self._env | dict.fromkeys(TEMP_ENV, temp_dir),
                    cwd=self.settings.cwd,
                    limit=self.settings.max_message_bytes,
                    prefix=self._prefix,
                )
            except BaseException:
                discard_temp_dir(temp_dir)
                raise
        finally:
            self._starting_for[tenant] -= 1
            if not self._starting_for[tenant]:
                del self._starting_for[tenant]
        session = Session(secrets.token_hex(16), process, self._clock(), tenant, temp_dir=temp_dir)
        self._sessions[session.id] = session
        session.reader = asyncio.create_task(self._read(session))
        self.start_reaper()
        return session

    @contextlib.contextmanager
    def in_use(self, session: Session) -> Iterator[None]:
        """While inside, the session is being served and so is never reaped as idle."""
        session.active += 1
        try:
            yield
        finally:
            session.active -= 1
            session.last_active = self._clock()

    async def write(self, session: Session, line: bytes) -> bool:
        """Send one message line to the session's process; ``False`` (and the session ends) if it cannot be."""
        stdin = session.process.stdin
        if session.ended or stdin is None:
            return False
        try:
            async with session.write_lock, asyncio.timeout(self.settings.read_timeout):
                stdin.write(line + b"\n")
                await stdin.drain()
        except TimeoutError:
            self.end(session, Failure("the upstream MCP server stopped reading its input"))
            return False
        except (ConnectionError, RuntimeError):
            # Usually the process has exited (uvloop says so with a RuntimeError on its closed pipe): the reader then
            # ends the session with its exit status.
            if not await exited(session.process, 1.0):
                self.end(session, Failure("the upstream MCP server closed its input"))
            return False
        return True

    def end(self, session: Session, failure: Failure) -> None:
        """Forget the session at once (404 from now on), fail what waits on it, and reap its processes."""
        if session.ended:
            return
        session.ended = True
        self._sessions.pop(session.id, None)
        for channel in session.pending.values():
            channel.offer(failure)
        if session.listener is not None:
            session.listener.offer(None)
        self._ending_for[session.tenant] += 1
        task = asyncio.create_task(self._terminate(session))
        self._ending.add(task)
        task.add_done_callback(lambda done: self._ended(done, session.tenant))

    def _ended(self, task: asyncio.Task[None], tenant: str | None) -> None:
        self._ending.discard(task)
        self._ending_for[tenant] -= 1
        if not self._ending_for[tenant]:
            del self._ending_for[tenant]

    def start_reaper(self) -> None:
        """Make sure idle sessions are being looked for."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_idle())

    async def close(self) -> None:
        """End every session and wait until each process group is gone."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for session in list(self._sessions.values()):
            self.end(session, Failure("the sidecar is shutting down"))
        while self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)

    async def _read(self, session: Session) -> None:
        """Route every message the process writes, until it closes its output or exits.

        A process can exit with its output still open (a child it started holds it): the session then ends with
        the process, once what it wrote before exiting has been read.
        """
        stdout = session.process.stdout
        failure = Failure("the upstream MCP server closed its output")
        exited = asyncio.ensure_future(session.process.wait())
        reading: asyncio.Future[bytes] | None = None
        try:
            while stdout is not None:
                reading = asyncio.ensure_future(stdout.readline())
                await asyncio.wait((reading, exited), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    # What it wrote before exiting is buffered already; a line still missing after this is a child's.
                    await asyncio.wait((reading,), timeout=_EXIT_GRACE)
                    if not reading.done():
                        break
                try:
                    line = reading.result()
                except ValueError:
                    failure = Failure("the upstream MCP server sent a message larger than the limit")
                    return
                if not line:
                    break
                self._route(session, line.replace(b"\r", b"").strip())
            try:
                status = await asyncio.wait_for(asyncio.shield(exited), 1.0)
            except TimeoutError:
                return
            failure = Failure(f"the upstream MCP server exited (status {status})")
        finally:
            if reading is not None:
                reading.cancel()
            exited.cancel()
            self.end(session, failure)

    def _route(self, session: Session, line: bytes) -> None:
        try:
            message = read_json(line)
        except ValueError:
            logger.warning("the upstream MCP server wrote a line that is not JSON; ignored")
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method is None:
            channel = session.pending.get(_key(message.get("id")))
            if channel is not None:
                channel.offer(Message(line, final=True))
            return
        channel = None
        if method == "notifications/progress" and isinstance(params := message.get("params"), dict):
            request = session.progress.get(_key(params.get("progressToken")))
            channel = session.pending.get(request) if request is not None else None
        if channel is None or not channel.streaming:
            # Stdio carries no request context: what comes while a request streams most likely belongs to it.
            channel = next((c for c in session.pending.values() if c.streaming), None)
        if channel is not None:
            channel.offer(Message(line, final=False))
        elif session.listener is not None:
            session.listener.offer(Message(line, final=False))
        else:
            session.backlog.append(line)

    async def _terminate(self, session: Session) -> None:
        process, grace = session.process, self.settings.terminate_grace
        if process.returncode is None:
            # The MCP stdio shutdown: close its input, then SIGTERM, then SIGKILL, each after a grace period.
            if process.stdin is not None:
                process.stdin.close()
            if not await exited(process, grace):
                signal_group(process, signal.SIGTERM)
                if not await exited(process, grace):
                    signal_group(process, signal.SIGKILL)
                    await process.wait()
        # Whatever the server started shares its group and must not outlive the session.
        signal_group(process, signal.SIGKILL)
        if session.reader is not None:
            session.reader.cancel()
        await remove_temp_dir(session.temp_dir)

    async def _reap_idle(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 30.0))
            now = self._clock()
            for session in list(self._sessions.values()):
                if session.active == 0 and now - session.last_active >= timeout:
                    self.end(session, Failure("the session was idle too long"))


def _key(value: Any) -> str:
    """A JSON-RPC id (or progress token) as a dict key that keeps 1 and "1" apart."""
    return json.dumps(value)
