"""Attacks on the operator commands, the sidecar's settings and the guard's telemetry.

The commands run through the real entry point (in process, or as a real process where the process matters),
the guard serves on a real socket on 127.0.0.1, and spans and metrics are read from the OpenTelemetry SDK's
in-memory exporter and reader.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.types import Receive, Scope, Send

from mcpguard import (
    GuardConfig,
    MCPGuard,
    RateLimits,
    open_audit_store,
    open_store,
)
from sidecar.cli import main
from sidecar.serve import sidecar_from_settings
from sidecar.settings import SettingsError, load_settings
from tests.conftest import answer_lifespan, cheap_keyring, free_port, make_keys, read_body, serve
from tests.conftest import run_cli as run
from tests.test_guard import RecordingApp, list_tools
from tests.test_telemetry import exported_span, in_memory_telemetry, metric_points

REPO = Path(__file__).resolve().parents[1]
CANARY = "canary-3f81c0d94b2e"
PASSWORD = "Canary-Passw0rd-7d2e"
# Letters, digits and underscores only, as many real tokens are (GitHub, Stripe, hex secrets).
PASTED_TOKEN = "ghp_Canary7Qm2X9vLk4T8pR3nW6yB1zH5jD0sF"
UPSTREAM = "http://127.0.0.1:9/mcp"
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
# The most characters any client-chosen value may keep in a span or metric attribute (the audit trail's bound).
ATTRIBUTE_LIMIT = 256


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI process: cheap argon2 and no state or audit from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPGUARD_")}
    return env | {"MCPGUARD_ARGON2_PROFILE": "cheapest", "PYTHONPATH": str(REPO)} | extra


def json_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    """``mcpguard audit query --json ARGV``: one object per printed line."""
    status, out, err = run(capsys, *argv, "--json")
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Operator commands: secrets on the command line and in output
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attempt",
    [
        ["--password", PASSWORD],
        [f"--password={PASSWORD}"],
        ["--pass", PASSWORD],
        [f"--pass={PASSWORD}"],
    ],
    ids=["separate", "equals", "abbreviated", "abbreviated-equals"],
)
def test_password_typed_on_the_command_line_is_not_echoed(
    capsys: pytest.CaptureFixture[str], state: str, attempt: list[str]
) -> None:
    """A password given as an option is not taken, and the usage error does not print it back either.

    The README promises passwords are only prompted for or piped in; a password typed after --password
    must not then be copied into the terminal, CI logs or a support ticket by the error message.
    """
    with pytest.raises(SystemExit) as exited:
        main(["--state", state, "users", "add", "--email", "a@acme.test", "--tenant", "acme", *attempt])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert PASSWORD not in err, err


def test_misplaced_database_url_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    """An audit URL holding a password, put before the command by mistake, is not printed back in the usage error."""
    url = f"postgresql://mcpguard:{CANARY}@127.0.0.1:5432/mcpguard_test"
    with pytest.raises(SystemExit) as exited:
        main(["--audit", url, "audit", "query"])
    assert exited.value.code == 2
    assert CANARY not in capsys.readouterr().err


@pytest.mark.threat("T-KEY-LEAK")
def test_key_secret_is_printed_by_create_and_nowhere_else(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, state: str, tmp_path: Path
) -> None:
    """After create, no listing, revocation, audit query, error message or log record shows the key or its secret."""
    caplog.set_level(logging.DEBUG)
    status, out, _ = run(capsys, "--state", state, "keys", "create", "--tenant", "acme", "--name", "ci", "--json")
    assert status == 0
    created = json.loads(out)
    key, key_id = created["key"], created["key_id"]
    secret = key.split("_", 2)[2]
    assert len(secret) >= 32
    seen: list[str] = []

    def watch(*argv: str) -> int:
        status, out, err = run(capsys, *argv)
        seen.append(out + err)
        return status

    assert watch("--state", state, "keys", "list", "--tenant", "acme") == 0
    assert watch("--state", state, "keys", "list", "--tenant", "acme", "--json") == 0
    assert watch("--state", state, "keys", "revoke", key) == 1  # the whole key pasted instead of its id
    assert watch("--state", state, "keys", "revoke", key_id) == 0
    assert watch("--state", state, "keys", "revoke", key_id) == 0  # again: the first revocation stands
    assert watch("--state", state, "audit", "query") == 0
    assert watch("--state", state, "audit", "query", "--json") == 0
    assert watch("--state", str(tmp_path / "missing" / "s.db"), "keys", "revoke", key) == 1
    assert watch("--state", state, "keys", "revoke", key_id, "--audit", str(tmp_path / "no" / "a.db")) == 1

    async def present_it() -> None:
        store = open_store(f"sqlite:///{state}")
        ring = cheap_keyring(store)
        try:
            with pytest.raises(Exception, match="revoked"):
                await ring.verify(key)
        finally:
            await ring.aclose()
            await store.close()

    asyncio.run(present_it())
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert key_id in logged  # the logs do name the key, by its id
    for text in [*seen, logged]:
        assert key not in text
        assert secret not in text


def test_state_and_audit_files_are_owner_only_under_a_permissive_umask(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With umask 000 the state file, a separate audit file and their -wal and -shm files are still 0600."""
    state, trail = tmp_path / "state.db", tmp_path / "trail.db"
    previous = os.umask(0)
    try:
        created = json.loads(run(capsys, "--state", str(state), "keys", "create", "--tenant", "acme", "--json")[1])
        status, _, err = run(capsys, "--state", str(state), "keys", "revoke", created["key_id"], "--audit", str(trail))
        assert status == 0, err
        store = open_store(f"sqlite:///{state}")
        audit = open_audit_store(f"sqlite:///{trail}")
        try:
            asyncio.run(store.list_keys("acme"))
            files = sorted(tmp_path.iterdir())
            names = {path.name for path in files}
            assert {"state.db-wal", "state.db-shm", "trail.db-wal", "trail.db-shm"} <= names, names
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
        finally:
            asyncio.run(store.close())
            asyncio.run(audit.close())
    finally:
        os.umask(previous)
    assert modes == dict.fromkeys(modes, 0o600), {name: oct(mode) for name, mode in modes.items()}


# ---------------------------------------------------------------------------------------------------------------
# Operator commands: malformed names and where the state is
# ---------------------------------------------------------------------------------------------------------------

BAD_TENANTS = {
    "ansi-escape": "ac\x1b[31mme",
    "newline": "acme\nglobex",
    "space": "ac me",
    "comma": "acme,globex",
    "nul": "acme\x00",
    "too-long": "a" * 129,
}


@pytest.mark.parametrize("tenant", list(BAD_TENANTS.values()), ids=list(BAD_TENANTS))
def test_users_add_holds_tenants_to_the_rule_keys_follow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str, tenant: str
) -> None:
    """A tenant name `keys create` does not accept is not accepted by `users add` either.

    The tenant of a user becomes the tenant of every token they approve, which the guard hands the upstream
    in X-MCPGuard-Tenant; and `users list` prints it as is, so an escape sequence or newline in it reaches
    the operator's terminal.
    """
    status, out, err = run(capsys, "--state", state, "keys", "create", "--tenant", tenant)
    assert (status, out) == (1, "")
    assert "tenant" in err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    status, out, err = run(
        capsys, "--state", state, "users", "add", "--email", "a@acme.test", "--tenant", tenant, "--password-stdin"
    )
    assert (status, out) == (1, ""), out
    assert err.startswith("mcpguard: error: ")
    assert "tenant" in err
    assert json.loads(run(capsys, "--state", state, "users", "list", "--json")[1]) == []


BAD_EMAILS = {
    "newline-with-a-fake-row": "eve@acme.test\nu_fake0000000  admin@acme.test  active  acme",
    "ansi-escape": "eve@acme.test\x1b[2K\x1b[1A",
    "nul": "eve@acme.test\x00admin",
    "carriage-return": "eve@acme.test\radmin@acme.test",
}


@pytest.mark.parametrize("email", list(BAD_EMAILS.values()), ids=list(BAD_EMAILS))
def test_users_add_takes_no_control_characters_in_an_email(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str, email: str
) -> None:
    """An email with control characters is an error: stored, it would print as extra rows in `users list`."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    status, _, err = run(
        capsys, "--state", state, "users", "add", "--email", email, "--tenant", "acme", "--password-stdin"
    )
    listed = run(capsys, "--state", state, "users", "list")[1]
    assert status == 1, listed
    assert "email" in err
    assert len(listed.splitlines()) == 1  # the header alone


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--tenant", "ac\x1b[31mme"),
        ("--tenant", "acme\x00"),
        ("--name", "ci\x1b[2J"),
        ("--name", "ci\nkey id:  forged"),
        ("--name", "n" * 10_000),
    ],
    ids=["tenant-ansi", "tenant-nul", "name-ansi", "name-newline", "name-huge"],
)
def test_keys_create_turns_down_control_characters_cleanly(
    capsys: pytest.CaptureFixture[str], state: str, flag: str, value: str
) -> None:
    """Escapes, NUL, newlines and huge values in a key's tenant or name are one error line, exit 1, no key made."""
    args = {"--tenant": "acme", "--name": "ci"} | {flag: value}
    status, out, err = run(capsys, "--state", state, "keys", "create", *[x for kv in args.items() for x in kv])
    assert (status, out) == (1, "")
    assert err.startswith("mcpguard: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "\x1b" not in err
    assert json.loads(run(capsys, "--state", state, "keys", "list", "--tenant", "acme", "--json")[1]) == []


def test_state_naming_a_file_that_is_no_database_leaves_it_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--state on a text file or a directory is one error line; the file is not changed, quoted or joined by others."""
    notes = tmp_path / "notes.txt"
    notes.write_text(f"AWS_SECRET_ACCESS_KEY={CANARY}\n", encoding="utf-8")
    notes.chmod(0o644)
    before = notes.read_bytes()
    for target in (notes, tmp_path):
        for command in (["keys", "create", "--tenant", "acme"], ["keys", "list", "--tenant", "acme"]):
            status, out, err = run(capsys, "--state", str(target), *command)
            assert (status, out) == (1, "")
            assert err.startswith("mcpguard: error: storage unavailable"), err
            assert CANARY not in err
            assert "Traceback" not in err
    assert notes.read_bytes() == before
    assert stat.S_IMODE(notes.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://mcpguard:{CANARY}@127.0.0.1:1/mcpguard_test",
        f"postgresql://no_such_role:{CANARY}@127.0.0.1:5432/mcpguard_test",
        f"postgresql://mcpguard:{CANARY}%ZZ@127.0.0.1:5432/mcpguard_test",
        f"postgresql://mcpguard:{CANARY}@127.0.0.1:notaport/mcpguard_test",
    ],
    ids=["closed-port", "unknown-role", "bad-percent-escape", "bad-port"],
)
def test_audit_database_password_never_reaches_the_operator(
    capsys: pytest.CaptureFixture[str], state: str, url: str
) -> None:
    """A PostgreSQL audit URL that cannot be used is reported without its password, by query and by revoke."""
    status, out, err = run(capsys, "--state", state, "audit", "query", "--audit", url)
    assert status == 1
    assert err.startswith("mcpguard: error: ")
    assert CANARY not in out + err
    assert "Traceback" not in err
    created = json.loads(run(capsys, "--state", state, "keys", "create", "--tenant", "acme", "--json")[1])
    status, out, err = run(capsys, "--state", state, "keys", "revoke", created["key_id"], "--audit", url)
    assert status == 1
    assert out.startswith(f"revoked key {created['key_id']}")
    assert CANARY not in out + err
    assert "Traceback" not in err


def test_cli_writes_and_reads_the_audit_trail_the_sidecar_is_configured_with(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With MCPGUARD_AUDIT set, as the sidecar reads it, `keys revoke` records there and `audit query` reads there.

    Otherwise an operator who configured the sidecar's trail by environment finds their revocations in the
    state file, where neither the sidecar's audit API nor a reviewer of that trail looks, and `audit query`
    shows a trail that is not the sidecar's.
    """
    state, trail = tmp_path / "state.db", tmp_path / "trail.db"
    monkeypatch.setenv("MCPGUARD_STATE", str(state))
    monkeypatch.setenv("MCPGUARD_AUDIT", f"sqlite:///{trail}")
    settings = load_settings(config_file=None, env=os.environ, overrides={"upstream": UPSTREAM})
    assert settings.audit_url == f"sqlite:///{trail}"  # where the sidecar keeps its trail
    created = json.loads(run(capsys, "keys", "create", "--tenant", "acme", "--json")[1])
    assert run(capsys, "keys", "revoke", created["key_id"])[0] == 0
    queried = json_lines(capsys, "audit", "query")
    assert [call["path"] for call in queried] == ["mcpguard keys revoke"]

    async def sidecar_trail() -> list[dict[str, Any]]:
        from mcpguard import AuditQuery

        store = open_audit_store(f"sqlite:///{trail}")
        try:
            return (await store.query(AuditQuery(tenant="acme", limit=10))).calls
        finally:
            await store.close()

    assert [call["credential_id"] for call in asyncio.run(sidecar_trail())] == [created["key_id"]]


def test_quickstart_key_does_not_stay_valid_in_the_state_after_the_demo(tmp_path: Path) -> None:
    """The demo key quickstart prints expires or is revoked: the state file is the sidecar's default one too.

    quickstart writes to --state, else $MCPGUARD_STATE, else ./mcpguard.db, the same file a production sidecar
    uses by default; a read/write key of tenant "demo" that never expires would keep working there.
    """
    state = tmp_path / "mcpguard.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "--state", str(state), "quickstart", "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
        cwd=tmp_path,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        printed = ""
        while "Press Ctrl+C" not in printed and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            printed += line
        assert re.search(r"key\s+:\s+mk_\w+", printed), printed
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    listed = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--state", str(state), "keys", "list", "--tenant", "demo", "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
        check=True,
        timeout=30,
    )
    [key] = json.loads(listed.stdout)
    assert key["revoked_at"] is not None or key["expires_at"] is not None, key


# ---------------------------------------------------------------------------------------------------------------
# What a client writes into the audit trail, as the operator's commands show it
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Trailed:
    url: str
    keys: dict[str, str]
    state: str

    def post(self, body: bytes | dict[str, Any], label: str | None = None, **headers: str) -> httpx.Response:
        sent = {**MCP_HEADERS, **headers}
        if label is not None:
            sent["Authorization"] = f"Bearer {self.keys[label]}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(self.url + "/mcp", content=content, headers=sent)


@pytest.fixture
def trailed(tmp_path: Path) -> Iterator[Trailed]:
    """A guard keeping its keys and its audit trail in one SQLite state file, as the sidecar does."""
    state = str(tmp_path / "state.db")
    store = open_store(f"sqlite:///{state}")
    keys = make_keys(store, {"read": ("acme", ["mcp:read"])})
    audit = open_audit_store(f"sqlite:///{state}")
    port = free_port()
    guard = MCPGuard(
        RecordingApp(),
        GuardConfig(public_url=f"http://127.0.0.1:{port}"),
        keys=cheap_keyring(store),
        tool_lister=list_tools,
        audit=audit,
        failed_auth_limit="10000/minute",
    )
    try:
        with serve(guard, port) as url:
            yield Trailed(url, keys, state)
    finally:
        asyncio.run(audit.close())
        asyncio.run(store.close())


def wait_for_calls(capsys: pytest.CaptureFixture[str], state: str, count: int) -> list[dict[str, Any]]:
    """The trail's calls once at least ``count`` are recorded (entries of refusals are committed lazily)."""
    deadline = time.monotonic() + 5
    while True:
        calls = json_lines(capsys, "--state", state, "audit", "query")
        if len(calls) >= count or time.monotonic() > deadline:
            return calls
        time.sleep(0.05)


def test_client_chosen_names_cannot_fake_lines_of_audit_query(
    trailed: Trailed, capsys: pytest.CaptureFixture[str]
) -> None:
    """Method, tool and path are the client's to choose: `audit query` prints one inert line per call all the same.

    A newline in a method would print as a second, made-up call (allowed, another tenant); an escape sequence
    would be run by the operator's terminal (clear the screen, retitle the window, hide what follows).
    """
    fake_row = "ping\n2099-01-01T00:00:00+00:00  acme  key:admin  POST  tools/call  drop_tool  200  allowed"
    assert trailed.post({"jsonrpc": "2.0", "id": 1, "method": fake_row}).status_code == 401
    assert trailed.post({"jsonrpc": "2.0", "id": 2, "method": "\x1b]0;owned\x07\x1b[2J"}).status_code == 401
    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "read\x1b[8m", "arguments": {}}}
    assert trailed.post(call, "read").status_code == 403
    assert httpx.get(trailed.url + "/%1B%5B2J%0Afake").status_code == 401
    calls = wait_for_calls(capsys, trailed.state, 4)
    assert len(calls) == 4
    status, out, _ = run(capsys, "--state", trailed.state, "audit", "query")
    assert status == 0
    assert len(out.splitlines()) == len(calls), out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), repr(out)


@pytest.mark.threat("T-AUDIT-GAP")
def test_lone_surrogate_in_a_method_still_leaves_an_audit_entry(
    trailed: Trailed, capsys: pytest.CaptureFixture[str]
) -> None:
    """A method spelled with a lone UTF-16 surrogate (valid JSON escape, no UTF-8) is refused as no text, and the
    refusal is recorded like any other.

    The JSON parser turns "\\ud800" into a string SQLite cannot encode; the entry, and the batch it is
    committed with, must not be lost because of it.
    """
    assert trailed.post(b'{"jsonrpc":"2.0","id":1,"method":"\\ud800hidden"}').status_code == 400
    time.sleep(0.2)  # a commit of its own for the marker call
    assert trailed.post({"jsonrpc": "2.0", "id": 2, "method": "marker"}).status_code == 401
    calls = wait_for_calls(capsys, trailed.state, 2)
    assert [c["rpc_method"] for c in calls if c["rpc_method"] == "marker"] == ["marker"]
    assert len(calls) == 2, [c["rpc_method"] for c in calls]


@pytest.mark.threat("T-AUDIT-GAP")
def test_lone_surrogate_call_does_not_fail_other_callers(trailed: Trailed) -> None:
    """An anonymous request with a lone-surrogate method does not turn the next tenant's call into a 503."""
    statuses = []
    with httpx.Client() as client:
        for _ in range(5):
            poisoned = b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}'
            client.post(trailed.url + "/mcp", content=poisoned, headers=MCP_HEADERS)
            ping = client.post(
                trailed.url + "/mcp",
                json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
                headers={**MCP_HEADERS, "Authorization": f"Bearer {trailed.keys['read']}"},
            )
            statuses.append(ping.status_code)
            time.sleep(0.1)
    assert statuses == [200] * 5


# ---------------------------------------------------------------------------------------------------------------
# Sidecar settings
# ---------------------------------------------------------------------------------------------------------------


def test_sidecar_command_reports_every_problem_at_once_and_no_secret() -> None:
    """`mcpguard sidecar` with five bad settings prints all five, exits 1, and quotes no credential they carry."""
    env = cli_env(
        MCPGUARD_UPSTREAM=f"http://user:{CANARY}@127.0.0.1:9000/mcp",
        MCPGUARD_AUDIT=f"postgresql://u:{CANARY}@db/mcp x",
        MCPGUARD_OTLP_ENDPOINT=f"http://collector:4318/?token={CANARY}",
        MCPGUARD_UPSTREAM_HEADERS=json.dumps({"X-Api-Key": f"{CANARY}\r\nX-Evil: 1"}),
        MCPGUARD_LISTEN="0.0.0.0:8080",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "sidecar"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert [p.split(":")[0].removeprefix("  - ") for p in problems] == [
        "MCPGUARD_UPSTREAM",
        "MCPGUARD_LISTEN",
        "MCPGUARD_UPSTREAM_HEADERS",
        "MCPGUARD_AUDIT",
        "MCPGUARD_OTLP_ENDPOINT",
    ], result.stderr
    assert CANARY not in result.stderr
    assert "Traceback" not in result.stderr


def test_oversized_refresh_lifetime_is_reported_with_the_other_problems() -> None:
    """A refresh lifetime past what a timedelta holds is one more problem in the list, not an OverflowError."""
    env = {
        "MCPGUARD_OAUTH": "true",
        "MCPGUARD_OAUTH_REFRESH_DAYS": "1e12",
        "MCPGUARD_CONNECT_TIMEOUT": "-1",
        "MCPGUARD_JWT_SECRET": "s" * 40,
    }
    with pytest.raises(SettingsError) as info:
        load_settings(config_file=None, env=env, overrides={"upstream": UPSTREAM})
    named = [problem.split(":")[0] for problem in info.value.problems]
    assert named == ["MCPGUARD_CONNECT_TIMEOUT", "MCPGUARD_OAUTH_REFRESH_DAYS"], info.value.problems


@pytest.mark.parametrize("days", ["1e12", "1000000"], ids=["past-timedelta", "past-year-one"])
def test_long_audit_retention_is_a_problem_or_works(days: str) -> None:
    """A retention meant as "keep for ever" is refused at start-up, or the sidecar answers its first call normally.

    It is never an exception when the sidecar is assembled (a traceback from `mcpguard sidecar`), nor a
    500 on the first call after start and once an hour after, when retention computes a cutoff before year 1.
    """
    port = free_port()
    env = {"MCPGUARD_AUDIT_RETENTION_DAYS": days, "MCPGUARD_STATE": "memory://", "MCPGUARD_ARGON2_PROFILE": "cheapest"}
    overrides = {"upstream": UPSTREAM, "listen": f"127.0.0.1:{port}"}
    problem = None
    try:
        app = sidecar_from_settings(load_settings(config_file=None, env=env, overrides=overrides), env)
    except SettingsError as error:
        problem = str(error)
    except Exception as error:  # what `mcpguard sidecar` would print as a traceback
        pytest.fail(f"assembling the sidecar raised {type(error).__name__}: {error}")
    if problem is not None:
        assert "audit_retention_days" in problem.lower()
        return
    with serve(app, port) as url:
        first = httpx.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=MCP_HEADERS)
    assert first.status_code == 401


def _upstream_bearer(name: str) -> None:
    settings = load_settings(config_file=None, env={}, overrides={"upstream": UPSTREAM, "upstream_bearer_env": name})
    settings.upstream_credentials({})


def _assertion_secret(name: str) -> None:
    settings = load_settings(config_file=None, env={}, overrides={"upstream": UPSTREAM, "assertion_secret_env": name})
    settings.assertion_key({})


def _jwt_secret(name: str) -> None:
    overrides = {"upstream": UPSTREAM, "oauth": True, "jwt_secret_env": name, "state": "memory://"}
    load_settings(config_file=None, env={}, overrides=overrides).oauth_signing_key({})


def _client_secret(name: str) -> None:
    client = {"client_id": "claude", "redirect_uris": ["https://claude.example/cb"], "client_secret_env": name}
    overrides = {"upstream": UPSTREAM, "oauth": True, "jwt_secret_env": "JWT", "oauth_clients": [client]}
    load_settings(config_file=None, env={}, overrides=overrides).oauth_settings({})


@pytest.mark.parametrize(
    "use",
    [_upstream_bearer, _assertion_secret, _jwt_secret, _client_secret],
    ids=["upstream_bearer_env", "assertion_secret_env", "jwt_secret_env", "client_secret_env"],
)
def test_token_pasted_where_a_variable_name_belongs_is_not_echoed(use: Callable[[str], None]) -> None:
    """A secret put in a *_env setting (which names a variable) is not quoted back when that variable is missing.

    The settings already refuse such a paste without echoing it when it is not shaped like a variable name;
    a token of letters, digits and underscores passes that check and must not then be printed instead.
    """
    with pytest.raises(SettingsError) as info:
        use(PASTED_TOKEN)
    assert PASTED_TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [f"https://admin:{CANARY}@mcp.example.test", f"htps://admin:{CANARY}@mcp.example.test"],
    ids=["https-with-userinfo", "misspelt-scheme"],
)
def test_public_url_with_credentials_is_a_problem_that_does_not_quote_them(url: str) -> None:
    """public_url is advertised to every client (metadata, challenges): one carrying a password is refused, unquoted."""
    with pytest.raises(SettingsError) as info:
        load_settings(config_file=None, env={"MCPGUARD_PUBLIC_URL": url}, overrides={"upstream": UPSTREAM})
    assert any(problem.startswith("MCPGUARD_PUBLIC_URL: ") for problem in info.value.problems)
    assert CANARY not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------------------------


class AnsweringApp:
    """Answers every MCP call with a result holding the canary; ``x-answer: error`` or ``sse`` change the shape."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        request = json.loads(body) if body else {}
        shape = dict(scope["headers"]).get(b"x-answer", b"json")
        if shape == b"error":
            answer: dict[str, Any] = {"error": {"code": -32000, "message": f"failed on {CANARY}", "data": CANARY}}
        else:
            answer = {"result": {"content": [{"type": "text", "text": CANARY}], "structuredContent": {"k": CANARY}}}
        payload = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), **answer}).encode()
        if shape == b"sse":
            headers = [(b"content-type", b"text/event-stream"), (b"x-upstream-secret", CANARY.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"event: message\ndata: " + payload + b"\n\n"})
            return
        headers = [(b"content-type", b"application/json"), (b"set-cookie", f"s={CANARY}".encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


@dataclass
class Observed:
    url: str
    keys: dict[str, str]
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def headers(self, label: str | None, **extra: str) -> dict[str, str]:
        sent = {**MCP_HEADERS, **extra}
        if label is not None:
            sent["Authorization"] = f"Bearer {self.keys[label]}"
        return sent

    def span(self, matches: Callable[[ReadableSpan], bool]) -> ReadableSpan:
        return exported_span(self.spans, matches)

    def by_id(self, request_id: str) -> ReadableSpan:
        return self.span(lambda s: (s.attributes or {}).get("jsonrpc.request.id") == request_id)

    def series(self) -> set[tuple[str, frozenset[tuple[str, Any]]]]:
        """Every metric series so far, as (metric name, attributes)."""
        names = ("mcp.server.operation.duration", "mcpguard.decisions")
        return {(name, frozenset((p.attributes or {}).items())) for name in names for p in self.points(name)}

    def points(self, name: str) -> list[Any]:
        return metric_points(self.reader, name)


def observed_guard(app: Any, **options: Any) -> Iterator[Observed]:
    store = open_store("memory://")
    keys = make_keys(store, {"read": ("acme", ["mcp:read"]), "admin": ("acme", ["mcp:admin"])})
    port = free_port()
    with in_memory_telemetry() as (telemetry, spans, reader):
        guard = MCPGuard(
            app,
            GuardConfig(public_url=f"http://127.0.0.1:{port}"),
            keys=cheap_keyring(store),
            tool_lister=list_tools,
            telemetry=telemetry,
            **options,
        )
        with serve(guard, port) as url:
            yield Observed(url, keys, spans, reader)


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    """A guard with telemetry and limits high enough that no test here trips them."""
    yield from observed_guard(
        AnsweringApp(), rate_limits=RateLimits(per_tenant="100000/minute"), failed_auth_limit="100000/minute"
    )


def utf8(text: str) -> bool:
    """Whether ``text`` is a string OTLP can carry (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def string_attributes(span: ReadableSpan) -> dict[str, str]:
    return {k: v for k, v in (span.attributes or {}).items() if isinstance(v, str)}


@pytest.mark.parametrize(
    ("label", "with_id"),
    [(None, True), ("read", False)],
    ids=["anonymous-requests", "read-key-notifications"],
)
@pytest.mark.threat("T-TELEMETRY-FLOOD")
def test_client_chosen_methods_do_not_mint_metric_series(observed: Observed, label: str | None, with_id: bool) -> None:
    """200 made-up method names add at most one series to mcp.server.operation.duration, not 200.

    The method name is the client's to choose, before authentication (an anonymous 401) or as a
    notification a read key may send; each distinct value is a new series to store and export until the
    SDK's cardinality limit (2000) sends every later series, real tools included, to one overflow bucket.
    """
    marker = f"x-{label or 'anon'}-{with_id}-"
    with httpx.Client() as client:
        for i in range(200):
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": f"{marker}{i}"}
            if with_id:
                message["id"] = i
            client.post(observed.url + "/mcp", json=message, headers=observed.headers(label))
    observed.span(lambda s: (s.attributes or {}).get("mcp.method.name") == f"{marker}199")
    minted = {
        (p.attributes or {}).get("mcp.method.name")
        for p in observed.points("mcp.server.operation.duration")
        if str((p.attributes or {}).get("mcp.method.name", "")).startswith(marker)
    }
    assert len(minted) <= 1, f"{len(minted)} series"


@pytest.mark.threat("T-TELEMETRY-FLOOD")
def test_admin_calls_to_unlisted_tools_do_not_mint_metric_series(observed: Observed) -> None:
    """Tools the server never listed do not each become a gen_ai.tool.name series, even when the call is allowed."""
    with httpx.Client() as client:
        for i in range(50):
            call = {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {"name": f"ghost-{i}", "arguments": {}},
            }
            assert client.post(observed.url + "/mcp", json=call, headers=observed.headers("admin")).status_code == 200
    observed.span(lambda s: (s.attributes or {}).get("gen_ai.tool.name") == "ghost-49")
    minted = {
        (p.attributes or {}).get("gen_ai.tool.name")
        for p in observed.points("mcp.server.operation.duration")
        if str((p.attributes or {}).get("gen_ai.tool.name", "")).startswith("ghost-")
    }
    assert len(minted) <= 1, f"{len(minted)} series"


def _long_method(observed: Observed) -> Callable[[ReadableSpan], bool]:
    message = {"jsonrpc": "2.0", "id": "long-method", "method": "m" * 20_000}
    httpx.post(observed.url + "/mcp", json=message, headers=observed.headers(None, **{"User-Agent": "u" * 8000}))
    return lambda s: (s.attributes or {}).get("jsonrpc.request.id") == "long-method"


def _long_path(observed: Observed) -> Callable[[ReadableSpan], bool]:
    httpx.get(observed.url + "/" + "p" * 8000, headers=observed.headers("read"))
    return lambda s: str((s.attributes or {}).get("url.path", "")).startswith("/ppp")


def _long_tool_and_id(observed: Observed) -> Callable[[ReadableSpan], bool]:
    rid = "i" * 20_000
    call = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "t" * 20_000, "arguments": {}}}
    httpx.post(observed.url + "/mcp", json=call, headers=observed.headers("read"))
    return lambda s: str((s.attributes or {}).get("gen_ai.tool.name", "")).startswith("ttt")


@pytest.mark.parametrize(
    "send", [_long_method, _long_path, _long_tool_and_id], ids=["method", "path", "tool-name-and-id"]
)
def test_client_chosen_values_are_bounded_in_spans_and_metrics(
    observed: Observed, send: Callable[[Observed], Callable[[ReadableSpan], bool]]
) -> None:
    """No span attribute, span name or metric attribute keeps more than 256 characters of what a client sent."""
    before = observed.series()
    span = observed.span(send(observed))
    long_values = {k: len(v) for k, v in string_attributes(span).items() if len(v) > ATTRIBUTE_LIMIT}
    assert long_values == {}
    assert len(span.name) <= 2 * ATTRIBUTE_LIMIT, len(span.name)
    for name, attributes in observed.series() - before:
        for key, value in attributes:
            assert len(str(value)) <= ATTRIBUTE_LIMIT, (name, key, len(str(value)))


@pytest.mark.parametrize(
    ("body", "label"),
    [
        (b'{"jsonrpc":"2.0","id":"surrogate-method","method":"\\ud800"}', None),
        (
            b'{"jsonrpc":"2.0","id":"surrogate-tool","method":"tools/call","params":{"name":"\\udfff","arguments":{}}}',
            "read",
        ),
        (b'{"jsonrpc":"2.0","id":"\\ud800surrogate-id","method":"ping"}', "read"),
    ],
    ids=["method", "tool-name", "request-id"],
)
def test_attribute_values_are_valid_utf8(observed: Observed, body: bytes, label: str | None) -> None:
    """A lone surrogate escaped in the JSON never reaches a span or metric as a string OTLP cannot encode: such a
    request is refused (400) before anything is read from it, and its span holds only what the guard wrote.

    OTLP carries strings as protobuf strings, which must be UTF-8: one such attribute fails the export of
    its whole batch of spans, and a metric series holding it fails every export of the metrics from then on.
    """
    before = observed.series()
    answer = httpx.post(observed.url + "/mcp", content=body, headers=observed.headers(label))
    assert answer.status_code == 400
    span = observed.span(lambda s: (s.attributes or {}).get("http.response.status_code") == 400)
    unencodable = [key for key, value in string_attributes(span).items() if not utf8(value)]
    assert unencodable == []
    assert utf8(span.name)
    assert [
        (name, key)
        for name, attributes in observed.series() - before
        for key, value in attributes
        if not utf8(str(value))
    ] == []


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "garbage"},
        {"traceparent": f"00-{'0' * 32}-{PARENT}-01"},
        {"traceparent": f"00-{TRACE_ID}-{'0' * 16}-01"},
        {"traceparent": f"ff-{TRACE_ID}-{PARENT}-01"},
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-01-{'x' * 8000}"},
        {"traceparent": f"00-{TRACE_ID.upper()}-{PARENT}-01"},
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": ",".join(f"k{i}={'v' * 250}" for i in range(60))},
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "tracestate": f"ok=1,{CANARY} bad,=,a=b=c"},
        {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "baggage": f"token={CANARY}," + "k=v," * 500},
        {"baggage": f"authorization=Bearer%20{CANARY};prop=1"},
    ],
    ids=[
        "garbage",
        "zero-trace-id",
        "zero-span-id",
        "version-ff",
        "huge-suffix",
        "upper-case",
        "huge-tracestate",
        "malformed-tracestate",
        "huge-baggage",
        "baggage-only",
    ],
)
def test_hostile_trace_context_neither_breaks_the_call_nor_reaches_attributes(
    observed: Observed, headers: dict[str, str]
) -> None:
    """Malformed or oversized traceparent, tracestate and baggage: the call is answered, an invalid parent is
    dropped, tracestate stays within trace-context's 32 entries, and nothing of them becomes an attribute."""
    rid = f"trace-{abs(hash(tuple(headers.items())))}"
    response = httpx.post(
        observed.url + "/mcp",
        json={"jsonrpc": "2.0", "id": rid, "method": "ping"},
        headers=observed.headers("read", **headers),
    )
    assert response.status_code == 200
    span = observed.by_id(rid)
    assert span.context is not None
    if span.parent is not None:
        assert span.parent.trace_id == int(TRACE_ID, 16)
        assert len(span.parent.trace_state) <= 32
        assert len(span.parent.trace_state.to_header()) <= 8192
    elif headers.get("traceparent") == f"00-{TRACE_ID}-{PARENT}-01":
        pytest.fail("a valid traceparent was dropped")
    exported = span.to_json()
    assert CANARY not in json.dumps(dict(span.attributes or {}))
    assert CANARY not in span.name
    assert "baggage" not in exported.lower()
    assert all(not key.startswith(("baggage", "tracestate")) for key in span.attributes or {})


@pytest.mark.threat("T-AUDIT-LEAK")
def test_answers_and_credentials_never_reach_spans_or_metrics(observed: Observed) -> None:
    """Results, error messages and data, SSE events, upstream headers and the caller's key stay out of telemetry."""
    for shape, rid in (("json", "answer-json"), ("error", "answer-error"), ("sse", "answer-sse")):
        call = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "read_tool", "arguments": {}}}
        response = httpx.post(observed.url + "/mcp", json=call, headers=observed.headers("read", **{"x-answer": shape}))
        assert CANARY in response.text
    for rid in ("answer-json", "answer-error", "answer-sse"):
        observed.by_id(rid)
    assert (observed.by_id("answer-error").attributes or {})["error.type"] == "-32000"
    exported = "".join(span.to_json() for span in observed.spans.get_finished_spans())
    data = observed.reader.get_metrics_data()
    assert data is not None
    measured = data.to_json()
    for secret in (CANARY, observed.keys["read"], observed.keys["read"].split("_", 2)[2]):
        assert secret not in exported
        assert secret not in measured


@pytest.fixture(scope="module")
def strict() -> Iterator[Observed]:
    """A guard with telemetry, two tool calls a minute per tenant and three failed authentications per address."""
    yield from observed_guard(
        RecordingApp(), rate_limits=RateLimits(per_tenant="2/minute"), failed_auth_limit="3/minute"
    )


@pytest.mark.threat("T-AUDIT-GAP")
def test_denied_calls_reach_spans_and_the_decisions_counter(strict: Observed) -> None:
    """401, 421, 403 (origin) and 429 (quota, failed authentications) each give a denied span with its reason,
    and the decisions counter counts them by reason."""
    ping = {"jsonrpc": "2.0", "id": "anon", "method": "ping"}
    assert httpx.post(strict.url + "/mcp", json=ping, headers=strict.headers(None)).status_code == 401
    misdirected = {"jsonrpc": "2.0", "id": "host", "method": "ping"}
    headers = strict.headers("read", Host="evil.example")
    assert httpx.post(strict.url + "/mcp", json=misdirected, headers=headers).status_code == 421
    cross = {"jsonrpc": "2.0", "id": "origin", "method": "ping"}
    headers = strict.headers("read", Origin="https://evil.example")
    assert httpx.post(strict.url + "/mcp", json=cross, headers=headers).status_code == 403
    statuses = []
    for i in range(3):
        call = {"jsonrpc": "2.0", "id": f"quota-{i}", "method": "tools/call", "params": {"name": "read_tool"}}
        statuses.append(httpx.post(strict.url + "/mcp", json=call, headers=strict.headers("read")).status_code)
    assert statuses == [200, 200, 429]
    guesses = []
    for i in range(5):
        bad = {"jsonrpc": "2.0", "id": f"guess-{i}", "method": "ping"}
        headers = {**MCP_HEADERS, "Authorization": f"Bearer mk_AAAAAAAAAAAA_{'x' * 40}{i}"}
        guesses.append(httpx.post(strict.url + "/mcp", json=bad, headers=headers).status_code)
    assert guesses[-1] == 429
    expected = ("anon", "quota-2", "guess-4")
    # Host and Origin are checked before the body is read: those spans are found by their status.
    spans = [strict.by_id(rid) for rid in expected] + [
        strict.span(lambda s, code=code: (s.attributes or {}).get("http.response.status_code") == code)
        for code in (421, 403)
    ]
    found = [
        (
            (s.attributes or {})["mcpguard.decision"],
            (s.attributes or {})["mcpguard.reason"],
            (s.attributes or {})["http.response.status_code"],
        )
        for s in spans
    ]
    assert found == [
        ("denied", "auth", 401),
        ("denied", "rate", 429),
        ("denied", "rate", 429),
        ("denied", "origin", 421),
        ("denied", "origin", 403),
    ]
    counted = {frozenset((p.attributes or {}).items()): p.value for p in strict.points("mcpguard.decisions")}
    assert counted[frozenset({("decision", "denied"), ("reason", "auth")})] >= 1
    assert counted[frozenset({("decision", "denied"), ("reason", "origin")})] >= 2
    assert counted[frozenset({("decision", "denied"), ("reason", "rate")})] >= 2
    assert counted[frozenset({("decision", "allowed")})] >= 2
