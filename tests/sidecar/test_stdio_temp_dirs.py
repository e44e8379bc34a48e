"""Each stdio session's process has a temporary directory of its own, made before it starts and removed with it.

The sidecars here run the raw server of ``test_stdio_attacks`` with ``temp_root`` in the test's own directory,
so what is made and what is left there can be seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from sidecar.stdio_upstream import StdioSettings
from tests.sidecar.test_stdio_attacks import INIT, call, delete, gone, opened, post, servers_running, sidecar, value
from tests.sidecar.test_stdio_upstream import stdio_sidecar

TEMP_ENV = ("TEMP", "TMP", "TMPDIR")


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "temp"
    root.mkdir()
    return root


def removed(path: Path, within: float = 5.0) -> bool:
    """Whether ``path`` is gone, polling for up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while os.path.lexists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.threat("T-STDIO-SHARE")
def test_two_tenants_never_share_a_temp_dir(tmp_path: Path) -> None:
    """TMPDIR, TMP and TEMP name one directory per process (mode 0700, ours, under temp_root, whatever stdio_env
    says), and a file one tenant's server leaves there is not in the other tenant's."""
    root = make_root(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    with sidecar(tmp_path, temp_root=str(root), env={"TMPDIR": str(shared), "TEMP": str(shared)}) as stack:
        acme, globex = stack.keys["read"], stack.keys["globex"]
        sessions = {acme: opened(stack.url, acme), globex: opened(stack.url, globex)}
        envs = [value(call(stack.url, key, session, "env")) for key, session in sessions.items()]
        dirs = [Path(env["TMPDIR"]) for env in envs]
        modes = [(stat.S_IMODE(d.lstat().st_mode), d.lstat().st_uid, d.is_symlink()) for d in dirs]
        written = value(call(stack.url, acme, sessions[acme], "scratch", {"text": "acme only"}))
        own = value(call(stack.url, acme, sessions[acme], "peek"))
        other = value(call(stack.url, globex, sessions[globex], "peek"))
    assert [{env[name] for name in TEMP_ENV} for env in envs] == [{str(d)} for d in dirs]
    assert dirs[0] != dirs[1]
    assert [d.parent for d in dirs] == [root, root]
    assert modes == [(0o700, os.getuid(), False)] * 2
    assert written == str(dirs[0])
    assert (own["dir"], own["note"]) == (str(dirs[0]), "acme only")
    assert other == {"dir": str(dirs[1]), "entries": [], "note": None}
    assert list(shared.iterdir()) == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_temp_dir_removed_on_delete_and_at_shutdown(tmp_path: Path) -> None:
    """A deleted session's directory goes at once, read-only subdirectories and all, without following a symlink
    out of it; the others' stay until shutdown, which removes every one."""
    root = make_root(tmp_path)
    with sidecar(tmp_path, temp_root=str(root)) as stack:
        key = stack.keys["read"]
        deleted, kept = opened(stack.url, key), opened(stack.url, key)
        deleted_dir = Path(value(call(stack.url, key, deleted, "scratch", {"text": "gone"})))
        kept_dir = Path(value(call(stack.url, key, kept, "scratch", {"text": "kept"})))
        assert delete(stack.url, key, deleted) == 200
        assert removed(deleted_dir)
        assert kept_dir.is_dir()
    assert stack.script.is_file()
    assert list(root.iterdir()) == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_temp_dir_removed_when_the_process_exits(tmp_path: Path) -> None:
    """A server that dies by itself (leaving a worker in its group) loses its directory with its session."""
    root = make_root(tmp_path)
    with sidecar(tmp_path, temp_root=str(root), read_timeout=3.0) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        temp = Path(value(call(stack.url, key, session, "scratch")))
        answer = call(stack.url, key, session, "crash_leaving_worker")
        worker = int((tmp_path / "worker.pid").read_text())
        try:
            assert answer.status_code == 502
            assert gone(worker, within=3)
            assert removed(temp)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    assert list(root.iterdir()) == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_temp_dir_removed_when_the_session_idles(tmp_path: Path) -> None:
    """A session reaped as idle loses its directory with its process, while the sidecar runs on."""
    root = make_root(tmp_path)
    with sidecar(tmp_path, temp_root=str(root), idle_timeout=1.0) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        temp = Path(value(call(stack.url, key, session, "scratch")))
        assert removed(temp)
        assert call(stack.url, key, session, "pid").status_code == 404
        assert list(root.iterdir()) == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_no_session_without_a_temp_dir_of_its_own(tmp_path: Path) -> None:
    """When the directory cannot be made, initialize fails with a 502 that says so, and no process starts (it
    would otherwise share whatever temporary directory it found)."""
    with sidecar(tmp_path, temp_root=str(tmp_path / "missing")) as stack:
        answer = post(stack.url, stack.keys["read"], INIT)
        running = servers_running(stack.script)
        count = stack.upstream.session_count
    assert answer.status_code == 502
    assert (
        answer.json()["error"]["message"] == "no private temporary directory could be made for the upstream MCP server"
    )
    assert "mcp-session-id" not in answer.headers
    assert (running, count) == ([], 0)


@pytest.mark.threat("T-STDIO-SHARE")
def test_temp_dir_of_a_command_that_cannot_start_is_removed(tmp_path: Path) -> None:
    """A command that cannot be run leaves no directory behind."""
    root = make_root(tmp_path)
    settings = StdioSettings(argv=("/nonexistent/mcp-server",), temp_root=str(root))
    with stdio_sidecar(settings, {"read": ("acme", "mcp:read")}) as running:
        answer = post(running.url, running.keys["read"], INIT)
        left = list(root.iterdir())
    assert answer.status_code == 502
    assert answer.json()["error"]["message"] == "the upstream MCP server command could not be started"
    assert left == []
