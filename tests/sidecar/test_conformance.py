"""The MCP conformance suite's server scenarios give the same results through the sidecar as direct.

The suite is the npm package ``@modelcontextprotocol/conformance`` (Node >= 22), installed into ``.conformance/``
by ``.ci/conformance-setup`` or named by ``MCPGUARD_CONFORMANCE_CMD``. Its scenarios expect an "everything"
server with fixed fixtures, served by ``tests/sidecar/conformance_server.py``. The suite cannot send a header
of its own, so a Node preload adds the sidecar key to the requests it sends to the sidecar, and to no other.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
SUITE_TIMEOUT = 180
START_TIMEOUT = 30
# One result directory per scenario, named by the suite as server-<scenario>-<ISO time with dashes>.
RESULT_DIR = re.compile(r"server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT[0-9-]+Z")

# Loaded with --import into the suite's Node process: both its fetch() and its direct undici requests
# go through undici's global dispatcher, which is the one shared seam where a header can be added.
BEARER_PRELOAD = """\
import { createRequire } from 'node:module';
import { realpathSync } from 'node:fs';

const target = new URL(process.env.MCPGUARD_CONFORMANCE_TARGET).origin;
const authorization = `Bearer ${process.env.MCPGUARD_CONFORMANCE_KEY}`;
let undici = null;
try {
  undici = createRequire(realpathSync(process.argv[1]))('undici');
} catch {
  // A launcher (npx, a shell wrapper) is not the suite: only the process that can load undici sends requests.
}

function withAuthorization(headers) {
  if (headers == null) return { authorization };
  if (Array.isArray(headers)) return [...headers, 'authorization', authorization];
  return { ...headers, authorization };
}

undici?.setGlobalDispatcher(
  new undici.Agent().compose((dispatch) => (options, handler) =>
    dispatch(
      new URL(String(options.origin)).origin === target
        ? { ...options, headers: withAuthorization(options.headers) }
        : options,
      handler,
    )),
);
"""


def _suite_command() -> list[str] | None:
    named = os.environ.get("MCPGUARD_CONFORMANCE_CMD", "").strip()
    if named:
        return shlex.split(named)
    local = REPO / ".conformance" / "bin" / "conformance"
    return [str(local)] if os.access(local, os.X_OK) else None


@pytest.fixture(scope="module")
def suite() -> list[str]:
    """The command that runs the conformance suite; in CI its absence is a failure, elsewhere a skip."""
    command = _suite_command()
    if command is None:
        reason = "MCP conformance suite not installed: run .ci/conformance-setup or set MCPGUARD_CONFORMANCE_CMD"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return command


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args!r} did not start:\n{log.read_text()}") from None
            time.sleep(0.05)


@contextmanager
def _running(argv: list[str], port: int, log: Path, env: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run ``argv`` from the repository root until the block ends; ready once it accepts on ``port``."""
    with log.open("wb") as output:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        _wait_for_port(port, process, log)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


Outcomes = dict[str, tuple[tuple[str, str, str], ...]]


def _run_suite(command: list[str], url: str, out: Path, env: Mapping[str, str]) -> Outcomes:
    """Every server scenario run against ``url``: per scenario, each check's id, status and message."""
    argv = [*command, "server", "--suite", "all", "--url", url, "--output-dir", str(out)]
    run = subprocess.run(argv, cwd=out.parent, env=env, capture_output=True, text=True, timeout=SUITE_TIMEOUT)
    host = url.split("/")[2]
    outcomes: Outcomes = {}
    for checks in sorted(out.glob("*/checks.json")):
        match = RESULT_DIR.fullmatch(checks.parent.name)
        assert match, f"unexpected result directory {checks.parent.name}"
        outcomes[match["scenario"]] = tuple(
            (check["id"], check["status"], (check.get("errorMessage") or "").replace(host, "<server>"))
            for check in json.loads(checks.read_text())
        )
    assert outcomes, f"the suite reported no scenario (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    return outcomes


def _verdict(checks: tuple[tuple[str, str, str], ...]) -> str:
    statuses = {status for _, status, _ in checks}
    return next((s for s in ("FAILURE", "WARNING", "SUCCESS") if s in statuses), "INFO")


def _report(upstream: str, direct: Outcomes, proxied: Outcomes) -> str:
    lines = [f"conformance scenarios against the {upstream} server: direct | through the sidecar"]
    for scenario in sorted(direct.keys() | proxied.keys()):
        left = _verdict(direct[scenario]) if scenario in direct else "-"
        right = _verdict(proxied[scenario]) if scenario in proxied else "-"
        differs = "" if direct.get(scenario) == proxied.get(scenario) else "   <-- differs"
        lines.append(f"  {scenario:32} {left:8} | {right:8}{differs}")
        if differs:
            lines.append(f"      direct:  {direct.get(scenario)}")
            lines.append(f"      sidecar: {proxied.get(scenario)}")
    return "\n".join(lines)


def _upstream_argv(upstream: str, port: int) -> list[str]:
    if upstream == "everything":
        return [sys.executable, "-m", "tests.sidecar.conformance_server", f"127.0.0.1:{port}"]
    return [sys.executable, "-m", "sidecar.demo_server", "--http", f"127.0.0.1:{port}"]


@pytest.mark.parametrize("upstream", ["everything", "demo"])
def test_server_scenarios_match_direct_and_through_the_sidecar(suite: list[str], upstream: str, tmp_path: Path) -> None:
    """Each scenario's checks (id, status, message) are identical direct and through the sidecar with a key."""
    env = os.environ | {"MCPGUARD_ARGON2_PROFILE": "cheapest"}
    state = str(tmp_path / "state.db")
    keys_argv = [sys.executable, "-m", "sidecar.cli", "keys", "create", "--tenant", "conformance"]
    created = subprocess.run(
        [*keys_argv, "--scopes", "mcp:admin", "--state", state, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(created.stdout)["key"]
    preload = tmp_path / "bearer.mjs"
    preload.write_text(BEARER_PRELOAD)

    upstream_port, sidecar_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/mcp"
    sidecar_url = f"http://127.0.0.1:{sidecar_port}/mcp"
    sidecar_argv = [sys.executable, "-m", "sidecar.cli", "sidecar", "--upstream", upstream_url]
    sidecar_argv += ["--listen", f"127.0.0.1:{sidecar_port}", "--state", state]
    with (
        _running(_upstream_argv(upstream, upstream_port), upstream_port, tmp_path / "upstream.log"),
        _running(sidecar_argv, sidecar_port, tmp_path / "sidecar.log", env),
    ):
        direct = _run_suite(suite, upstream_url, tmp_path / "direct", os.environ)
        keyed = os.environ | {
            "NODE_OPTIONS": f"{os.environ.get('NODE_OPTIONS', '')} --import={preload.as_uri()}".strip(),
            "MCPGUARD_CONFORMANCE_TARGET": sidecar_url,
            "MCPGUARD_CONFORMANCE_KEY": key,
        }
        proxied = _run_suite(suite, sidecar_url, tmp_path / "sidecar", keyed)

    report = _report(upstream, direct, proxied)
    print(report)
    assert proxied == direct, report
    if upstream == "everything":
        # This server must satisfy the suite, or matching results would prove little.
        failing = [scenario for scenario, checks in direct.items() if _verdict(checks) == "FAILURE"]
        assert not failing, report
