"""Starting and ending a stdio server's process: its surroundings, its temporary directory, and its group.

A server starts in a process group of its own (so its children end with it), holding none of the sidecar's
descriptors, with a private temporary directory that is removed once the group is gone. Where util-linux's
``setpriv`` is installed (Linux), the server is also started with a parent-death signal: if the sidecar is
killed outright, with no chance to end its sessions, the kernel kills each server rather than leave it
running with a tenant's state. (Setting that signal from Python needs code between fork and exec, which is
unsafe in a process with threads; ``setpriv`` sets it in the new process and then runs the server.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Mapping, Sequence
from typing import NoReturn

from mcpguard import UpstreamUnavailable

__all__ = [
    "TEMP_ENV",
    "discard_temp_dir",
    "exited",
    "make_temp_dir",
    "parent_death_prefix",
    "raise_not_started",
    "remove_temp_dir",
    "signal_group",
    "spawn",
]

logger = logging.getLogger("mcpguard.sidecar.stdio")

# Where programs look for their temporary directory: each points at the session's own, whatever else says.
TEMP_ENV = ("TEMP", "TMP", "TMPDIR")
_TEMP_PREFIX = "mcpguard-stdio-"
# A process killed while creating a file may still finish creating it, so removal is tried again briefly.
_REMOVE_ATTEMPTS = 3
_REMOVE_RETRY = 0.1


def parent_death_prefix() -> tuple[str, ...]:
    """The words that start a command with SIGKILL as its parent-death signal, or none where that cannot be done."""
    setpriv = shutil.which("setpriv", path=os.defpath)
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv is not None else ()


async def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None, limit: int, prefix: Sequence[str] = ()
) -> asyncio.subprocess.Process:
    """Start ``argv`` (after ``prefix``) with pipes for stdin and stdout, exactly ``env``, in a group of its own."""
    _keep_descriptors_from_children()
    try:
        return await asyncio.create_subprocess_exec(
            *prefix,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            # Its own group: a terminal's Ctrl-C does not reach it, and its children end with it.
            start_new_session=True,
            limit=limit,
        )
    except OSError as exc:
        raise_not_started(exc)


def raise_not_started(exc: OSError) -> NoReturn:
    """Log why the command could not be started and refuse the session (502)."""
    logger.warning("the upstream command could not be started: %s", exc.strerror or type(exc).__name__)
    raise UpstreamUnavailable("the upstream MCP server command could not be started") from None


def make_temp_dir(root: str | None) -> str:
    """A new directory (mode 0700, ours) in ``root`` (``None``: the default temporary directory)."""
    try:
        return tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=root)
    except OSError as exc:
        # Never fall back to a shared one: that is what would let one tenant's files reach another's server.
        where = root or "the default temporary directory"
        logger.warning("no session directory could be made in %s: %s", where, exc.strerror or type(exc).__name__)
        raise UpstreamUnavailable("no private temporary directory could be made for the upstream MCP server") from None


def _keep_descriptors_from_children() -> None:
    """Mark every open descriptor but the standard three close-on-exec, so no server process inherits one.

    Python opens its own that way, but a launcher or a library may leave some inheritable, and uvloop's
    subprocess_exec ignores ``close_fds``: each tenant's server would hold what the sidecar holds.
    """
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            descriptors = [int(name) for name in os.listdir(listing)]
        except (OSError, ValueError):
            continue
        for fd in descriptors:
            if fd > 2:
                with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                    if os.get_inheritable(fd):
                        os.set_inheritable(fd, False)
        return


async def remove_temp_dir(path: str) -> None:
    """Remove a session's temporary directory once its process group has been killed."""
    for attempt in range(1, _REMOVE_ATTEMPTS + 1):
        try:
            await asyncio.to_thread(_remove_tree, path)
        except FileNotFoundError:
            return
        except (OSError, RecursionError) as exc:
            if attempt == _REMOVE_ATTEMPTS:
                _left_behind(exc)
                return
            await asyncio.sleep(_REMOVE_RETRY)
        else:
            return


def discard_temp_dir(path: str) -> None:
    """Remove the temporary directory of a process that did not start, or say that something of it is left."""
    try:
        _remove_tree(path)
    except FileNotFoundError:
        pass
    except (OSError, RecursionError) as exc:
        _left_behind(exc)


def _left_behind(exc: OSError | RecursionError) -> None:
    # RecursionError: a tree nested deeper than the interpreter recurses.
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    logger.warning("a session's temporary directory could not be removed: %s", reason)


def _remove_tree(root: str) -> None:
    """Remove ``root`` and all it holds without following a symlink, even what a server made read-only."""

    def unlock(path: str) -> None:
        # A directory, not a symlink to one: removing its entries needs it writable and searchable.
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.chmod(path, stat.S_IRWXU)

    if not stat.S_ISDIR(os.lstat(root).st_mode):  # the server put a symlink or a file in its place
        os.unlink(root)
        return
    unlock(root)
    # Top down, so each directory is unlocked before it is listed; a symlink is never descended into.
    for parent, directories, _ in os.walk(root):
        for name in directories:
            unlock(os.path.join(parent, name))
    shutil.rmtree(root)


async def exited(process: asyncio.subprocess.Process, within: float) -> bool:
    """Whether ``process`` exits within ``within`` seconds."""
    try:
        await asyncio.wait_for(process.wait(), within)
    except TimeoutError:
        return False
    return True


def signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``process`` leads, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(process.pid, sig)
