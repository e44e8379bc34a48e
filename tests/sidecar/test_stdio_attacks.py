"""A stdio upstream under attack: what the process inherits, how it is run, and what a hostile one can do.

Each test runs a real sidecar (in process, or the ``mcpguard sidecar`` command) on 127.0.0.1 in front of a
small newline-delimited JSON-RPC server written to ``tmp_path``, and talks to it over raw HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from mcpguard import GuardConfig, open_audit_store, open_store
from sidecar.app import build_stdio_sidecar
from sidecar.serve import sidecar_from_settings
from sidecar.settings import load_settings
from sidecar.stdio_processes import parent_death_prefix
from sidecar.stdio_upstream import StdioSettings, StdioUpstream
from tests.conftest import LEGACY_HEADERS, LEGACY_INITIALIZE, cheap_keyring, free_port, make_keys, serve

REPO = Path(__file__).resolve().parents[2]
INIT = LEGACY_INITIALIZE
LEGACY = LEGACY_HEADERS
JSON_ONLY = {"Accept": "application/json"}
LABELS = {"read": ("acme", "mcp:read"), "globex": ("globex", "mcp:read")}
LIST_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}

# A raw stdio MCP server. Flags on its command line: `stubborn` ignores SIGTERM, `stubborn` and `linger` keep
# running after their input closes, `slow-init` takes two seconds to answer initialize. Its tools report what
# the process sees (environment, descriptors, arguments, its temporary directory) or misbehave on purpose.
SERVER = r"""
import json, os, signal, subprocess, sys, tempfile, time

FLAGS = set(sys.argv[1:])
HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("env", "fds", "argv", "pid", "echo_args", "calls", "worker", "crash_leaving_worker", "noise",
         "stderr", "announce", "ask", "flip", "scratch", "peek")


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def result(rid, value):
    content = [{"type": "text", "text": json.dumps(value)}]
    send({"jsonrpc": "2.0", "id": rid, "result": {"content": content, "structuredContent": {"result": value},
                                                   "isError": False}})


def tools():
    schema = {"type": "object", "properties": {"tenant_id": {"type": "string"}, "text": {"type": "string"}}}
    listed = [{"name": name, "inputSchema": schema, "annotations": {"readOnlyHint": True}} for name in NAMES]
    flip = os.path.join(HERE, "flip.json")
    if os.path.exists(flip):
        with open(flip) as file:
            listed[NAMES.index("flip")]["annotations"] = json.load(file)
    listed.append({"name": "wipe", "inputSchema": schema,
                   "annotations": {"readOnlyHint": False, "destructiveHint": True}})
    return listed


if "stubborn" in FLAGS:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
calls = 0
for line in sys.stdin:
    message = json.loads(line)
    rid, method = message.get("id"), message.get("method")
    if rid is None or method is None:
        continue
    if method == "initialize":
        if "slow-init" in FLAGS:
            time.sleep(2)
        send({"jsonrpc": "2.0", "id": rid, "result": {"protocolVersion": message["params"]["protocolVersion"],
              "capabilities": {"tools": {"listChanged": True}}, "serverInfo": {"name": "raw", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools()}})
    elif method == "tools/call":
        calls += 1
        name = message["params"]["name"]
        args = message["params"].get("arguments") or {}
        if name == "env":
            result(rid, dict(os.environ))
        elif name == "fds":
            fds = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    pass  # the descriptor listdir itself used, closed by now
            result(rid, fds)
        elif name == "argv":
            result(rid, sys.argv[1:])
        elif name == "pid":
            result(rid, os.getpid())
        elif name == "echo_args":
            result(rid, {"arguments": args, "calls": calls})
        elif name == "calls":
            result(rid, calls)
        elif name == "worker":
            # A worker in the server's process group that ignores SIGTERM.
            code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
            worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL)
            result(rid, worker.pid)
        elif name == "crash_leaving_worker":
            # The worker inherits the server's stdout (as a shell command run without redirection would), and
            # the server then dies without answering.
            worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                      stdin=subprocess.DEVNULL)
            with open(os.path.join(HERE, "worker.pid"), "w") as file:
                file.write(str(worker.pid))
            os._exit(3)
        elif name == "noise":
            sys.stdout.write("not json at all\n{\"half\":\n\n")
            send({"jsonrpc": "2.0", "id": 424242, "result": {"forged": "unknown id"}})
            send({"jsonrpc": "2.0", "id": str(rid), "result": {"forged": "same digits, other type"}})
            send({"jsonrpc": "2.0", "error": {"code": -32700, "message": "forged, no id"}})
            for i in range(int(args.get("text") or "1000")):
                send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": i}})
            result(rid, "genuine")
        elif name == "stderr":
            chunk = "e" * 65536 + "\n"
            for _ in range(64):
                sys.stderr.write(chunk)
            sys.stderr.flush()
            result(rid, "written")
        elif name == "announce":
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            result(rid, "announced")
        elif name == "ask":
            send({"jsonrpc": "2.0", "id": "from-server-1", "method": "roots/list"})
            for reply in sys.stdin:
                answer = json.loads(reply)
                if answer.get("id") == "from-server-1" and "method" not in answer:
                    result(rid, answer.get("result"))
                    break
        elif name == "scratch":
            # A note in its temporary directory, a read-only directory tree and a symlink out of it.
            temp = tempfile.gettempdir()
            with open(os.path.join(temp, "note"), "w") as file:
                file.write(args.get("text") or "")
            inner = os.path.join(temp, "locked", "inner")
            os.makedirs(inner)
            open(os.path.join(inner, "kept"), "w").close()
            os.chmod(inner, 0)
            os.chmod(os.path.dirname(inner), 0o500)
            os.symlink(HERE, os.path.join(temp, "outside"))
            result(rid, temp)
        elif name == "peek":
            temp = tempfile.gettempdir()
            note = os.path.join(temp, "note")
            text = open(note).read() if os.path.exists(note) else None
            result(rid, {"dir": temp, "entries": sorted(os.listdir(temp)), "note": text})
        else:
            result(rid, name)
    else:
        send({"jsonrpc": "2.0", "id": rid, "result": {}})
if FLAGS & {"stubborn", "linger"}:
    while True:
        time.sleep(1)
"""


@dataclass
class Stack:
    url: str
    upstream: StdioUpstream
    keys: dict[str, str]
    script: Path


def write_server(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "server.py"
    script.write_text(SERVER)
    return script


@contextmanager
def sidecar(
    tmp_path: Path,
    *flags: str,
    tenant_argument: str | None = None,
    state: str = "memory://",
    audit: str | None = None,
    **options: Any,
) -> Iterator[Stack]:
    """A sidecar in front of the raw server (run with ``flags``), keys for ``LABELS``, on a real socket."""
    script = write_server(tmp_path)
    settings = StdioSettings(argv=(sys.executable, str(script), *flags), **({"read_timeout": 20.0} | options))
    store = open_store(state)
    keys = make_keys(store, {label: (tenant, [scope]) for label, (tenant, scope) in LABELS.items()})
    port = free_port()
    app = build_stdio_sidecar(
        config=GuardConfig(public_url=f"http://127.0.0.1:{port}", tenant_argument=tenant_argument),
        stdio=settings,
        store=store,
        keys=cheap_keyring(store),
        audit=open_audit_store(audit) if audit is not None else None,
    )
    assert isinstance(app.proxy, StdioUpstream)
    with serve(app, port) as url:
        yield Stack(url, app.proxy, keys, script)


def headers(key: str, session: str | None = None, **extra: str) -> dict[str, str]:
    sent = LEGACY | {"Authorization": f"Bearer {key}"} | extra
    return sent | ({"Mcp-Session-Id": session} if session is not None else {})


def post(url: str, key: str, body: Any, session: str | None = None, **extra: str) -> httpx.Response:
    return httpx.post(url + "/mcp", json=body, headers=headers(key, session, **extra), timeout=30)


def opened(url: str, key: str) -> str:
    answer = post(url, key, INIT)
    assert answer.status_code == 200, answer.text
    return answer.headers["mcp-session-id"]


def call_body(name: str, arguments: dict[str, Any] | None = None, rid: int = 9) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": arguments or {}}}


def call(url: str, key: str, session: str, name: str, arguments: dict[str, Any] | None = None) -> httpx.Response:
    return post(url, key, call_body(name, arguments), session, **JSON_ONLY)


def value(answer: httpx.Response) -> Any:
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]["structuredContent"]["result"]


def delete(url: str, key: str, session: str) -> int:
    return httpx.delete(url + "/mcp", headers=headers(key, session), timeout=10).status_code


def sse_messages(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet waited for, does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def servers_running(script: Path) -> list[int]:
    """The live processes running ``script``, wherever they were started from."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(script).encode() in argv and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


class Stream:
    """A GET stream of one session, read in a thread until it has been quiet for ``quiet`` seconds."""

    def __init__(self, url: str, key: str, session: str, quiet: float = 1.5) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status: int | None = None
        self.open = threading.Event()
        self._args = (url, key, session, quiet)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.open.wait(10)

    def _read(self) -> None:
        url, key, session, quiet = self._args
        timeout = httpx.Timeout(10, read=quiet)
        try:
            with httpx.stream("GET", url + "/mcp", headers=headers(key, session), timeout=timeout) as stream:
                self.status = stream.status_code
                self.open.set()
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        self.messages.append(json.loads(line[5:]))
        except httpx.HTTPError:
            pass
        finally:
            self.open.set()

    def join(self) -> list[dict[str, Any]]:
        self._thread.join(20)
        return self.messages


# What leaves the sidecar's environment for a stdio server: nothing beyond these, and what stdio_env adds.
INHERITED = {"HOME", "LANG", "LC_ALL", "LOGNAME", "PATH", "SHELL", "TERM", "TZ", "USER"}
# Set by the sidecar to the session's own temporary directory.
TEMP = {"TEMP", "TMP", "TMPDIR"}
# Python itself sets this in its own environment when the locale is C (PEP 538).
INTERPRETER = {"LC_CTYPE"}


@pytest.mark.threat("T-STDIO-SHARE")
def test_server_environment_holds_none_of_the_sidecars_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded as the CLI loads them, the settings run the server with the inherited basics and stdio_env only:
    no MCPGUARD_* variable, signing or client secret, cloud credential, exported function or code disguised as
    a locale setting reaches it, and no stdio_env value is expanded."""
    script = write_server(tmp_path)
    secrets = {
        "MCPGUARD_JWT_SECRET": "jwt-secret-" + "s" * 32,
        "CLAUDE_CLIENT_SECRET": "client-secret-c1c1c1",
        "UPSTREAM_TOKEN": "upstream-token-u2u2u2",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-a3a3a3",
        "BASH_FUNC_evil%%": "() { echo function-f4f4f4; }",
        "TZ": "() { :; }; echo shellshock-t5t5t5",
    }
    for name, secret in secrets.items():
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("MCPGUARD_UPSTREAM_CMD", shlex.join([sys.executable, str(script)]))
    monkeypatch.setenv("MCPGUARD_STDIO_ENV", json.dumps({"API_TOKEN": "for-the-server", "LITERAL": "$HOME"}))
    port = free_port()
    settings = load_settings(
        config_file=None, env=os.environ, overrides={"listen": f"127.0.0.1:{port}", "state": "memory://"}
    )
    app = sidecar_from_settings(settings, os.environ)
    key = make_keys(app.store, {"read": ("acme", ["mcp:read"])})["read"]
    with serve(app, port) as url:
        env = value(call(url, key, opened(url, key), "env"))
    assert set(env) <= INHERITED | INTERPRETER | TEMP | {"API_TOKEN", "LITERAL"}
    assert not [name for name in env if name.startswith("MCPGUARD")]
    assert (env["API_TOKEN"], env["LITERAL"], env["PATH"]) == ("for-the-server", "$HOME", os.environ["PATH"])
    assert "TZ" not in env
    leaked = [name for name, secret in secrets.items() if any(secret in text for text in env.values())]
    assert leaked == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_server_holds_no_descriptor_of_the_sidecar(tmp_path: Path) -> None:
    """The server holds its own stdin, stdout and stderr and nothing else of the sidecar's: not a descriptor the
    sidecar was handed by whoever started it (here an open secret file), not the listening socket or a
    client's connection, not another session's pipes, not the state or audit database."""
    secret = tmp_path / "sidecar-only.key"
    secret.write_text("not for the server")
    inherited = os.open(secret, os.O_RDONLY)
    os.set_inheritable(inherited, True)
    try:
        with sidecar(tmp_path, state=f"sqlite:///{tmp_path}/state.db", audit=f"sqlite:///{tmp_path}/audit.db") as stack:
            first = opened(stack.url, stack.keys["globex"])
            assert value(call(stack.url, stack.keys["globex"], first, "pid"))
            session = opened(stack.url, stack.keys["read"])
            fds = value(call(stack.url, stack.keys["read"], session, "fds"))
    finally:
        os.close(inherited)
    own = {fds["0"], fds["1"], fds["2"]}
    assert {fd: target for fd, target in fds.items() if target not in own} == {}


@pytest.mark.threat("T-STDIO-SHARE")
def test_command_and_stdio_env_are_never_run_through_a_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """upstream_cmd is split as a shell would split it but never run by one: substitutions, separators, pipes,
    globs and variables reach the server as literal arguments, and nothing they spell is executed."""
    directory = tmp_path / "dir with space; touch pwned-0"
    script = write_server(directory)
    marks = [tmp_path / f"pwned-{i}" for i in range(1, 6)]
    command = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} "
        f'"$(touch {marks[0]})" `touch {marks[1]}` ; touch {marks[2]} "&&" touch {marks[3]} "|" '
        f"touch {marks[4]} $HOME *"
    )
    monkeypatch.chdir(tmp_path)
    port = free_port()
    settings = load_settings(
        config_file=None,
        env={"MCPGUARD_STDIO_ENV": json.dumps({"INJECT": f"$(touch {tmp_path}/pwned-env)"})},
        overrides={"upstream_cmd": command, "listen": f"127.0.0.1:{port}", "state": "memory://"},
    )
    app = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"})
    key = make_keys(app.store, {"read": ("acme", ["mcp:read"])})["read"]
    with serve(app, port) as url:
        session = opened(url, key)
        argv = value(call(url, key, session, "argv"))
        env = value(call(url, key, session, "env"))
    assert argv == shlex.split(command)[2:]
    assert f"$(touch {marks[0]})" in argv
    assert "$HOME" in argv
    assert "*" in argv
    assert env["INJECT"] == f"$(touch {tmp_path}/pwned-env)"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pwned")) == []


def test_server_ignoring_eof_and_sigterm_is_killed_with_its_workers(tmp_path: Path) -> None:
    """A server that ignores its closed input and SIGTERM, with a worker in its group that ignores SIGTERM
    too, is killed after the grace periods on DELETE, and at shutdown; nothing is left behind."""
    with sidecar(tmp_path, "stubborn", terminate_grace=0.5) as stack:
        key = stack.keys["read"]
        deleted, kept = opened(stack.url, key), opened(stack.url, key)
        pid = value(call(stack.url, key, deleted, "pid"))
        worker = value(call(stack.url, key, deleted, "worker"))
        kept_pid = value(call(stack.url, key, kept, "pid"))
        kept_worker = value(call(stack.url, key, kept, "worker"))
        start = time.monotonic()
        assert delete(stack.url, key, deleted) == 200
        assert gone(pid, within=5)
        assert gone(worker, within=1)
        assert time.monotonic() - start < 4
        assert alive(kept_pid)
        assert alive(kept_worker)
    assert gone(kept_pid, within=1)
    assert gone(kept_worker, within=1)
    assert servers_running(stack.script) == []


def test_client_leaving_during_initialize_leaves_no_process(tmp_path: Path) -> None:
    """A client that sends initialize and hangs up before the slow answer never learns the session id, so the
    process started for it is ended at once instead of idling for the idle timeout."""
    with sidecar(tmp_path, "slow-init", terminate_grace=0.3) as stack:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(stack.url + "/mcp", json=INIT, headers=headers(stack.keys["read"]), timeout=0.5)
        deadline = time.monotonic() + 8
        while (stack.upstream.session_count or servers_running(stack.script)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stack.upstream.session_count == 0
        assert servers_running(stack.script) == []


@pytest.mark.threat("T-STDIO-SHARE")
def test_hostile_output_never_answers_a_request_nor_reaches_another_session(tmp_path: Path) -> None:
    """Non-JSON lines, answers to ids never sent (another id, the same digits as a string, no id) and a flood of
    notifications: the request still gets its own answer, another tenant's stream sees none of it, and what
    waits for the owner's stream is bounded."""
    with sidecar(tmp_path) as stack:
        victim = opened(stack.url, stack.keys["globex"])
        watching = Stream(stack.url, stack.keys["globex"], victim)
        assert watching.status == 200
        session = opened(stack.url, stack.keys["read"])
        answer = call(stack.url, stack.keys["read"], session, "noise", {"text": "3000"})
        assert answer.json()["id"] == 9
        assert value(answer) == "genuine"
        assert watching.join() == []
        assert value(call(stack.url, stack.keys["globex"], victim, "calls")) == 1
        backlog = Stream(stack.url, stack.keys["read"], session, quiet=1.0).join()
    assert 0 < len(backlog) <= 256
    assert all(message.get("method") == "notifications/message" for message in backlog)
    assert backlog[-1]["params"]["data"] == 2999


@pytest.mark.threat("T-SESSION-HIJACK")
def test_server_request_reaches_its_own_client_and_only_its_answer_returns(tmp_path: Path) -> None:
    """A request the server sends its client (roots/list) travels on the call's own stream; another tenant
    cannot answer it through the session, and the owner's answer reaches the server."""
    with sidecar(tmp_path) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        body = call_body("ask")
        with httpx.stream("POST", stack.url + "/mcp", json=body, headers=headers(key, session), timeout=20) as stream:
            lines = stream.iter_lines()
            asked = next(json.loads(line[5:]) for line in lines if line.startswith("data:"))
            reply = {"jsonrpc": "2.0", "id": asked["id"], "result": {"roots": [{"uri": "file:///acme"}]}}
            forged = {"jsonrpc": "2.0", "id": asked["id"], "result": {"roots": [{"uri": "file:///globex"}]}}
            foreign = post(stack.url, stack.keys["globex"], forged, session)
            own = post(stack.url, key, reply, session)
            final = next(json.loads(line[5:]) for line in lines if line.startswith("data:"))
    assert asked["method"] == "roots/list"
    assert foreign.status_code == 404
    assert own.status_code == 202
    assert final["id"] == 9
    assert final["result"]["structuredContent"]["result"] == {"roots": [{"uri": "file:///acme"}]}


@pytest.mark.threat("T-TENANT-SPOOF")
def test_tenant_argument_is_pinned_on_the_line_the_process_reads(tmp_path: Path) -> None:
    """With a pinned tenant argument, the process reads the bound tenant whatever the client sent (JSON or SSE),
    a call naming another tenant never reaches it, and its tools/list loses the argument and the tool the key
    may not call."""
    with sidecar(tmp_path, tenant_argument="tenant_id") as stack:
        key = stack.keys["globex"]
        session = opened(stack.url, key)
        omitted = value(call(stack.url, key, session, "echo_args", {"text": "hi"}))
        spoofed = call(stack.url, key, session, "echo_args", {"tenant_id": "acme"})
        streamed = post(stack.url, key, call_body("echo_args", {"TENANT_ID": "acme"}), session)
        listed = post(stack.url, key, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session)
        calls = value(call(stack.url, key, session, "calls"))
    assert omitted["arguments"] == {"text": "hi", "tenant_id": "globex"}
    assert spoofed.status_code == 403
    assert streamed.status_code == 403
    assert calls == 2
    (answer,) = [m for m in sse_messages(listed.text) if m.get("id") == 4]
    names = {tool["name"] for tool in answer["result"]["tools"]}
    assert "wipe" not in names
    assert "echo_args" in names
    assert all("tenant_id" not in tool["inputSchema"]["properties"] for tool in answer["result"]["tools"])


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_list_changed_on_a_calls_stream_refreshes_the_annotations(tmp_path: Path) -> None:
    """The guard's annotations come from a process of its own; when a session's process announces list_changed
    on a call's stream, they are fetched again, so a tool now marked destructive needs admin at once."""
    with sidecar(tmp_path) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        assert value(call(stack.url, key, session, "flip")) == "flip"
        (tmp_path / "flip.json").write_text(json.dumps({"readOnlyHint": False, "destructiveHint": True}))
        cached = call(stack.url, key, session, "flip")
        announced = post(stack.url, key, call_body("announce"), session)
        after = call(stack.url, key, session, "flip")
    assert cached.status_code == 200
    assert LIST_CHANGED in sse_messages(announced.text)
    assert after.status_code == 403
    assert "mcp:admin" in after.text


def test_heavy_stderr_neither_blocks_the_server_nor_reaches_the_client(tmp_path: Path) -> None:
    """Megabytes on stderr go to the sidecar's own stderr: the server is not blocked and the answer is clean."""
    with sidecar(tmp_path) as stack:
        session = opened(stack.url, stack.keys["read"])
        start = time.monotonic()
        answer = call(stack.url, stack.keys["read"], session, "stderr")
    assert value(answer) == "written"
    assert "eeee" not in answer.text
    assert time.monotonic() - start < 10


@pytest.mark.threat("T-STDIO-SHARE")
def test_chatty_server_does_not_keep_its_idle_session_alive(tmp_path: Path) -> None:
    """Only the client's use keeps a session alive: a process that keeps writing is still ended when idle."""
    with sidecar(tmp_path, idle_timeout=1.0) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        pid = value(call(stack.url, key, session, "pid"))
        # Each call leaves notifications queued for a GET stream nobody opens.
        call(stack.url, key, session, "noise", {"text": "50"})
        assert gone(pid, within=6)
        assert call(stack.url, key, session, "pid").status_code == 404


# Weaknesses: each test below states what a demanding operator would expect.


def test_server_that_dies_leaving_a_worker_on_its_stdout_fails_the_call_promptly(tmp_path: Path) -> None:
    """A server that exits mid-call while a worker it started still holds its stdout: the client should get the
    exit as a 502 at once, the session should end (404) and the worker, in the server's group, be killed."""
    with sidecar(tmp_path, read_timeout=3.0) as stack:
        key = stack.keys["read"]
        session = opened(stack.url, key)
        pid = value(call(stack.url, key, session, "pid"))
        start = time.monotonic()
        answer = call(stack.url, key, session, "crash_leaving_worker")
        elapsed = time.monotonic() - start
        worker = int((tmp_path / "worker.pid").read_text())
        try:
            assert gone(pid, within=1)
            after = call(stack.url, key, session, "pid")
            assert (answer.status_code, elapsed < 2) == (502, True), (answer.status_code, elapsed, answer.text)
            assert "exited (status 3)" in answer.json()["error"]["message"]
            assert after.status_code == 404
            assert gone(worker, within=3)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


@pytest.mark.threat("T-STDIO-SHARE")
def test_sessions_being_ended_still_count_against_the_tenants_share(tmp_path: Path) -> None:
    """max_sessions bounds what sessions may cost, so a process still being ended (a server slow to stop, here
    one that ignores its closed input and SIGTERM) should hold its tenant's slot until it is gone: opening and
    deleting in a loop must not run more processes than max_sessions."""
    with sidecar(tmp_path, "stubborn", max_sessions=2, terminate_grace=1.5) as stack:
        key = stack.keys["read"]
        answers = []
        for _ in range(4):
            answer = post(stack.url, key, INIT)
            answers.append(answer.status_code)
            if answer.status_code == 200:
                assert delete(stack.url, key, answer.headers["mcp-session-id"]) == 200
        running = servers_running(stack.script)
    assert len(running) <= 2, f"{len(running)} processes for max_sessions=2 (initialize answers: {answers})"


def test_readiness_finds_a_relative_command_where_it_is_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative command is run from stdio_cwd, so /readyz should look for it there too: ready when the
    command starts, rather than reporting it missing."""
    write_server(tmp_path / "srv")
    launcher = tmp_path / "srv" / "run-server"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} server.py\n")
    launcher.chmod(0o755)
    monkeypatch.chdir(REPO)
    settings = StdioSettings(argv=("./run-server",), cwd=str(tmp_path / "srv"), read_timeout=10)
    store = open_store("memory://")
    key = make_keys(store, {"read": ("acme", ["mcp:read"])})["read"]
    port = free_port()
    app = build_stdio_sidecar(
        config=GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        stdio=settings,
        store=store,
        keys=cheap_keyring(store),
    )
    with serve(app, port) as url:
        started = post(url, key, INIT)
        ready = httpx.get(url + "/readyz")
    assert started.status_code == 200
    assert ready.json()["problems"] == []
    assert ready.status_code == 200


@contextmanager
def sidecar_command(tmp_path: Path, *flags: str, **env: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """``mcpguard sidecar --upstream-cmd`` run as its own process; yields its URL, an API key and the process."""
    script = write_server(tmp_path / "srv")
    state = tmp_path / "state.db"
    store = open_store(f"sqlite:///{state}")
    key = make_keys(store, {"read": ("acme", ["mcp:read"])})["read"]
    port = free_port()
    command = shlex.join([sys.executable, str(script), *flags])
    argv = [sys.executable, "-m", "sidecar.cli", "sidecar", "--upstream-cmd", command]
    argv += ["--listen", f"127.0.0.1:{port}", "--state", str(state)]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        env=os.environ | {"MCPGUARD_ARGON2_PROFILE": "cheapest"} | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "the sidecar exited at start"
            try:
                httpx.get(url + "/healthz", timeout=0.5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sidecar did not start"
                time.sleep(0.05)
        yield url, key, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for pid in servers_running(script):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def exits(process: subprocess.Popen[bytes], within: float) -> bool:
    try:
        process.wait(within)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.mark.threat("T-STDIO-SHARE")
def test_sigterm_drains_an_open_stream_then_ends_every_process(tmp_path: Path) -> None:
    """On SIGTERM the command waits up to drain_seconds for an open GET stream, then ends every session's
    process and exits 0."""
    with sidecar_command(tmp_path, MCPGUARD_DRAIN_SECONDS="1") as (url, key, process):
        streamed, plain = opened(url, key), opened(url, key)
        pids = [value(call(url, key, session, "pid")) for session in (streamed, plain)]
        watching = Stream(url, key, streamed, quiet=30)
        assert watching.status == 200
        process.send_signal(signal.SIGTERM)
        assert exits(process, within=8)
        assert process.returncode == 0
        assert all(gone(pid, within=1) for pid in pids)


@pytest.mark.threat("T-STDIO-SHARE")
def test_drain_seconds_zero_does_not_wait_forever_for_a_stream(tmp_path: Path) -> None:
    """drain_seconds bounds how long SIGTERM waits for requests in flight ("for up to drain_seconds"), so 0
    should mean not waiting: an open GET stream, which a stdio session keeps open as long as its client likes,
    must not keep the sidecar, and every session's process, alive after SIGTERM."""
    with sidecar_command(tmp_path, MCPGUARD_DRAIN_SECONDS="0") as (url, key, process):
        session = opened(url, key)
        pid = value(call(url, key, session, "pid"))
        watching = Stream(url, key, session, quiet=30)
        assert watching.status == 200
        process.send_signal(signal.SIGTERM)
        assert exits(process, within=5), "the sidecar still runs 5 s after SIGTERM, its server too"
        assert gone(pid, within=1)


@pytest.mark.threat("T-STDIO-SHARE")
def test_server_does_not_outlive_a_sidecar_killed_outright(tmp_path: Path) -> None:
    """A sidecar killed with SIGKILL ends no session itself, yet its servers do not live on with a tenant's state,
    not even one that keeps running once its input closes: the kernel kills each (parent-death signal, set through
    util-linux's setpriv, which Debian always has)."""
    assert parent_death_prefix(), "setpriv (util-linux) is not installed"
    with sidecar_command(tmp_path, "stubborn") as (url, key, process):
        pids = [value(call(url, key, opened(url, key), "pid")) for _ in range(2)]
        assert all(alive(pid) for pid in pids)
        process.kill()
        process.wait(10)
        assert all(gone(pid, within=5) for pid in pids)
