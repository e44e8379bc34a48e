"""Instructions per proxied call, counted by valgrind: the sidecar against its own HTTP stack without the guard.

Run from the repository root (needs ``valgrind``, from Debian's packages)::

    python bench/instructions_per_call.py [--calls 300] [--warmup 100]

Each target runs under ``valgrind --tool=callgrind`` with counting off, in front of the same cheap echo
upstream (``bench.echo_upstream``, not counted); one client then makes ``--warmup`` calls, counting is
switched on, ``--calls`` more calls follow one after another (stateless ``tools/call`` POSTs on one
keep-alive connection), and the count is read. Targets: ``bare`` (``bench.bare_proxy``: uvicorn and the
same forwarding through the sidecar's HTTP/1.1 pool, no guard; the baseline), ``sidecar`` (every guard on, as
``bench/sidecar_vs_direct.py`` runs it: a cached key with its record read, the rate limit, scopes, the audit
start committed before forwarding), and ``bare-aiohttp`` and ``sidecar-aiohttp``, the same two forwarding
through aiohttp instead. Instruction counts do not move with the machine's other load, so
unlike timings they tell a 2% change apart on a noisy machine; they leave out time in the kernel and
cache misses, which ``bench/sidecar_vs_direct.py`` measures. Printed absolute and as a ratio to ``bare``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.sidecar_vs_direct import (  # noqa: E402
    BODY,
    DEFAULT_KEY_CMD,
    HEADERS,
    free_port,
    make_key,
    start,
    stop,
    wait_for_port,
)


def calls(port: int, headers: dict[str, str], count: int) -> None:
    """``count`` calls one after another on one connection; each must answer 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(count):
            connection.request("POST", "/mcp", BODY, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"a call answered {response.status}")
    finally:
        connection.close()


def summary(out: Path) -> int:
    """The instruction total of the callgrind dump ``out``."""
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def count(
    name: str, argv: list[str], env: dict[str, str], headers: dict[str, str], args: argparse.Namespace, directory: Path
) -> float:
    """Instructions per call of the target ``argv`` (a Python module command line) serving on its port."""
    port = free_port()
    out = directory / f"{name}.callgrind"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
        sys.executable,
        *[word.format(port=port) for word in argv],
    ]
    log = directory / f"{name}.log"
    proc = start(cmd, log, env)
    try:
        wait_for_port(port, proc, log, timeout=300)
        calls(port, headers, args.warmup)
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        calls(port, headers, args.calls)
        dumps = set(directory.glob(f"{name}.callgrind.*"))
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
        for _ in range(600):
            made = set(directory.glob(f"{name}.callgrind.*")) - dumps
            if made and all(path.stat().st_size for path in made):
                time.sleep(0.5)
                return sum(summary(path) for path in made) / args.calls
            time.sleep(0.1)
        raise SystemExit(f"callgrind wrote no dump for {name}")
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (apt-get install -y valgrind)")
    env = {k: v for k, v in os.environ.items() if k != "MCPGUARD_ARGON2_PROFILE"}
    env["MCP_RATE_LIMIT_PER_MIN"] = "100000000"
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory(prefix="mcpguard-instructions-") as tmp:
        directory = Path(tmp)
        upstream_port = free_port()
        upstream_log = directory / "upstream.log"
        upstream = start(
            [sys.executable, "-m", "bench.echo_upstream", "--http", f"127.0.0.1:{upstream_port}"], upstream_log, env
        )
        try:
            wait_for_port(upstream_port, upstream, upstream_log)
            url = f"http://127.0.0.1:{upstream_port}/mcp"
            state = str(directory / "state.db")
            # The key as the timing benchmark makes it: its default command, the production argon2 profile.
            key = make_key(argparse.Namespace(no_key=False, key=None, key_cmd=DEFAULT_KEY_CMD), state)
            targets = {
                "bare": ["-m", "bench.bare_proxy", "--upstream", url, "--listen", "127.0.0.1:{port}"],
                "sidecar": [
                    "-m",
                    "sidecar.cli",
                    "sidecar",
                    "--upstream",
                    url,
                    "--listen",
                    "127.0.0.1:{port}",
                    "--state",
                    state,
                ],
            }
            # The same two forwarding through aiohttp instead of the sidecar's own HTTP/1.1 pool.
            targets["bare-aiohttp"] = [*targets["bare"], "--client", "aiohttp"]
            targets["sidecar-aiohttp"] = targets["sidecar"]
            figures = {}
            for name, argv in targets.items():
                guarded = name.startswith("sidecar")
                headers = dict(HEADERS, Authorization=f"Bearer {key}") if guarded else dict(HEADERS)
                client = {"MCPGUARD_UPSTREAM_CLIENT": "aiohttp"} if name == "sidecar-aiohttp" else {}
                figures[name] = count(name, argv, env | client, headers, args, directory)
        finally:
            stop(upstream)
    base = figures["bare"]
    print(f"instructions per call, {args.calls} sequential calls after {args.warmup} (valgrind callgrind):")
    for name, value in figures.items():
        print(f"  {name:12s} {value:>12,.0f}  {value / base:5.2f}x bare")
    print(f"  the guard adds {figures['sidecar'] - base:,.0f} instructions a call")
    print(
        f"  the pool instead of aiohttp: {base / figures['bare-aiohttp']:.2f}x unguarded, "
        f"{figures['sidecar'] / figures['sidecar-aiohttp']:.2f}x guarded"
    )


if __name__ == "__main__":
    main()
