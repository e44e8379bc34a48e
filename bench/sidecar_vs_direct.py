"""The sidecar, its HTTP stack alone, nginx and a direct connection side by side in front of the same MCP upstream.

Run from the repository root::

    python bench/sidecar_vs_direct.py [--seconds 10] [--warmup 2] [--concurrency 1,16,64]
        [--upstreams demo,echo] [--targets direct,sidecar,sidecar-aiohttp,bare,bare-aiohttp,nginx] [--rounds 1]
        [--pin] [--out results.json]
        [--proxy-cmd "mcpguard sidecar --upstream {upstream} --listen {listen} --state {state}"]

With ``--rounds N`` every concurrency is measured N times, the targets taking turns within each round,
and each figure is judged by its median over the rounds (printed with its range): on a noisy machine
one run can be 20% off either way. With ``--pin`` (Linux ``taskset``, two CPUs or more) the upstream runs
alone on CPU 0 and the load generator and the proxy under test share CPU 1, so direct and proxied runs
give the upstream the same core and the scheduler cannot move the proxy onto it (the first two CPUs the
benchmark may use stand for 0 and 1); without it, all three
share every CPU as they would on one small host.

Load comes from ``wrk`` (``apt-get install -y wrk``): stateless 2026-07-28 ``tools/call echo`` POSTs,
so no session is needed, at 1 connection (1 thread) and 16 and 64 connections (2 threads), after a
warm-up at the same concurrency. Upstreams: ``demo`` (``sidecar.demo_server``, the ``mcp`` SDK, about
1 ms per call) and ``echo`` (``bench.echo_upstream``, a raw ASGI app that does almost nothing, so
the proxy is the bottleneck). Targets: ``direct`` to the upstream, the proxy command (named by
``--proxy-name``; placeholders ``{upstream}``, ``{listen}``, ``{host}``, ``{port}``, ``{state}``)
``bare`` (``bench.bare_proxy``: the sidecar's own HTTP stack, uvicorn and the same forwarding through
the sidecar's HTTP/1.1 pool, with no guard, so the guard's share shows beside the stack's in every run) and
``nginx`` (one worker, upstream keep-alive, no buffering) when it is installed. With the default proxy
command, ``sidecar-aiohttp`` and ``bare-aiohttp`` are the same two forwarding through aiohttp instead
(``upstream_client = "aiohttp"``). ``bare``, ``bare-aiohttp`` and ``nginx`` are references:
they are judged against the same targets, so a run shows what the stack alone and a C proxy reach.

For the proxy, a ``mcp:read`` key is made first with ``--key-cmd`` (production argon2 profile; its
verification is cached by the guard) unless ``--key`` or ``--no-key`` is given, and the proxy runs
with ``MCP_RATE_LIMIT_PER_MIN`` raised (``--rate-limit``) so the rate limiter stays on but does not
refuse the load. CPU per call is the user+system time of a process tree (from ``/proc``) during a
run divided by the calls it completed. Every figure is printed absolute and as a ratio to ``direct``
from the same run; a run with any 4xx/5xx answer, socket error or timeout is reported as invalid,
never as a figure; the design's targets are each marked met or NOT MET. The exit status is 1 when
something could not be measured (a target that did not start or answer, an invalid run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = "2026-07-28"
BODY = (
    '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"},"_meta":'
    '{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}'
)
HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": PROTOCOL,
    "Mcp-Method": "tools/call",
    "Mcp-Name": "echo",
}
UPSTREAMS = {
    "demo": ("demo server (mcp SDK)", ["-m", "sidecar.demo_server", "--http"]),
    "echo": ("raw ASGI echo (cheap: the proxy is the bottleneck)", ["-m", "bench.echo_upstream", "--http"]),
}
DEFAULT_PROXY_CMD = "mcpguard sidecar --upstream {upstream} --listen {listen} --state {state}"
DEFAULT_KEY_CMD = "mcpguard keys create --tenant bench --scopes mcp:read --state {state} --json"
# The sidecar's HTTP stack with no guard in front of it: the floor under the sidecar's figures.
BARE_CMD = [sys.executable, "-m", "bench.bare_proxy", "--upstream", "{upstream}", "--listen", "{listen}"]
REFERENCES = ("bare", "bare-aiohttp", "nginx")
# aiohttp instead of the sidecar's own HTTP/1.1 pool: the -aiohttp targets, with and without the guard.
AIOHTTP_SUFFIX = "-aiohttp"
AIOHTTP_ENV = {"MCPGUARD_UPSTREAM_CLIENT": "aiohttp"}

# wrk counts answers with status >= 400 as status errors; the preflight call must have answered 200.
ERROR_LABELS = {
    "status": "4xx/5xx answers",
    "connect": "connect errors",
    "read": "read errors",
    "write": "write errors",
    "timeout": "timeouts",
}
MIN_THROUGHPUT_RATIO = 0.9
MAX_ADDED_P50_MS = 0.5
MAX_PROXY_CPU_MS = 0.5

LUA = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'MCPGUARD_BENCH {{"requests":%.0f,"duration_us":%.0f,"connect":%.0f,"read":%.0f,"write":%.0f,' ..
    '"status":%.0f,"timeout":%.0f,"p50_us":%.0f,"p99_us":%.0f,"max_us":%.0f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Run:
    """One measured wrk run against one target; figures are None when the run was invalid."""

    upstream: str
    target: str
    connections: int
    valid: bool
    requests: int
    errors: dict[str, int]
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    proxy_cpu_ms_per_call: float | None = None
    upstream_cpu_ms_per_call: float | None = None
    note: str = ""
    round: int = 1


@dataclass
class Verdict:
    """One design target for one proxy in front of one upstream."""

    upstream: str
    target: str
    name: str
    value: float | None
    limit: float
    status: str


@dataclass
class Service:
    """A process started for the benchmark, with the URL that reaches it."""

    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group with output to ``log``, so stopping it reaches its children."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(cmd), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening:\n{tail(log)}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"did not listen on 127.0.0.1:{port} within {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _jsonrpc_message(content_type: str, text: str) -> Any:
    if content_type.startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1]) if data else None
    return json.loads(text)


def preflight(url: str, headers: dict[str, str], timeout: float = 30) -> None:
    """Send one call and require 200 with a JSON-RPC result; retries while the target is still starting."""
    host, _, rest = url.removeprefix("http://").partition("/")
    hostname, _, port = host.rpartition(":")
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(hostname, int(port), timeout=10)
        try:
            conn.request("POST", "/" + rest, body=BODY, headers=headers)
            response = conn.getresponse()
            text = response.read().decode(errors="replace")
        except OSError as error:
            problem = f"connection failed: {error}"
        else:
            if response.status == 200:
                message = _jsonrpc_message(response.getheader("content-type", ""), text)
                if isinstance(message, dict) and "result" in message and not message["result"].get("isError"):
                    return
            problem = f"HTTP {response.status}: {text[:300]}"
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer the benchmark call: {problem}")


def cpu_seconds(root: int) -> float:
    """User+system CPU time of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses, so fields are counted from the last ')'.
        fields = text[text.rfind(")") + 2 :].split()
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def write_lua(directory: Path, headers: dict[str, str]) -> Path:
    lines = "\n".join(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items())
    script = directory / "mcp_call.lua"
    script.write_text(LUA.format(body=BODY, headers=lines))
    return script


# CPUs for --pin, the first two this process may use: the upstream alone on one, the load generator and the
# target under test on the other.
ALLOWED_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
UPSTREAM_CPU, LOAD_CPU = (str(cpu) for cpu in ALLOWED_CPUS[:2]) if len(ALLOWED_CPUS) >= 2 else ("0", "1")


def pinned(cmd: list[str], cpu: str | None) -> list[str]:
    """``cmd`` run on CPU ``cpu`` only (with ``taskset``), or as it is."""
    return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd


def wrk(lua: Path, url: str, connections: int, seconds: int, cpu: str | None = None) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    cmd = pinned(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"], cpu)
    done = subprocess.run([*cmd, "-s", str(lua), url], capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("MCPGUARD_BENCH "):
            figures: dict[str, float] = json.loads(line.removeprefix("MCPGUARD_BENCH "))
            return figures
    raise RuntimeError(f"wrk printed no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(
    lua: Path, upstream: str, target: Service, upstream_proc: subprocess.Popen[bytes], connections: int, args: Any
) -> Run:
    cpu = LOAD_CPU if args.pin else None
    if args.warmup > 0:
        wrk(lua, target.url, connections, args.warmup, cpu)
    proxy_before = cpu_seconds(target.proc.pid) if target.proc else 0.0
    upstream_before = cpu_seconds(upstream_proc.pid)
    figures = wrk(lua, target.url, connections, args.seconds, cpu)
    proxy_cpu = cpu_seconds(target.proc.pid) - proxy_before if target.proc else None
    upstream_cpu = cpu_seconds(upstream_proc.pid) - upstream_before
    requests = int(figures["requests"])
    errors = {name: int(figures[name]) for name in ("status", "connect", "read", "write", "timeout")}
    run = Run(upstream, target.name, connections, valid=False, requests=requests, errors=errors)
    if any(errors.values()) or requests == 0:
        problems = ", ".join(f"{count} {ERROR_LABELS[name]}" for name, count in errors.items() if count)
        run.note = problems or "no calls completed"
        return run
    run.valid = True
    run.rps = requests / (figures["duration_us"] / 1e6)
    run.p50_ms = figures["p50_us"] / 1000
    run.p99_ms = figures["p99_us"] / 1000
    run.upstream_cpu_ms_per_call = upstream_cpu * 1000 / requests
    if proxy_cpu is not None:
        run.proxy_cpu_ms_per_call = proxy_cpu * 1000 / requests
    return run


def nginx_conf(directory: Path, port: int, upstream_port: int) -> Path:
    conf = directory / "nginx.conf"
    temp = "\n".join(
        f"  {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  upstream mcp_upstream {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mcp_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{upstream_port};
      proxy_buffering off;
    }}
  }}
}}
""")
    return conf


def executable(name: str) -> str:
    """``name`` from PATH, else from this interpreter's environment (a venv not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return found or name


def command(template: str, **values: str) -> list[str]:
    words = [word.format(**values) for word in shlex.split(template)]
    return [executable(words[0]), *words[1:]]


def make_key(args: Any, state: str) -> str | None:
    if args.no_key:
        return None
    if args.key:
        return str(args.key)
    env = {name: value for name, value in os.environ.items() if name != "MCPGUARD_ARGON2_PROFILE"}
    done = subprocess.run(command(args.key_cmd, state=state), capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"--key-cmd failed ({done.returncode}): {done.stderr.strip()}\nuse --key KEY or --no-key")
    key: str = json.loads(done.stdout)["key"]
    return key


@contextmanager
def services(directory: Path, upstream: str, args: Any) -> Iterator[tuple[Service, list[Service], list[str]]]:
    """Start one upstream and every target in front of it; stops them all on the way out."""
    started: list[subprocess.Popen[bytes]] = []
    notes: list[str] = []
    try:
        port = free_port()
        log = directory / f"{upstream}-upstream.log"
        upstream_cmd = [sys.executable, *UPSTREAMS[upstream][1], f"127.0.0.1:{port}"]
        proc = start(pinned(upstream_cmd, UPSTREAM_CPU if args.pin else None), log)
        started.append(proc)
        wait_for_port(port, proc, log)
        up = Service(upstream, f"http://127.0.0.1:{port}/mcp", proc)
        targets: list[Service] = []
        for name in args.targets:
            if name == "direct":
                targets.append(Service("direct", up.url))
                continue
            listen = free_port()
            log = directory / f"{upstream}-{name}.log"
            if name == "nginx":
                if shutil.which("nginx") is None:
                    notes.append("nginx is not installed: skipped (apt-get install -y nginx)")
                    continue
                conf = nginx_conf(directory, listen, port)
                cmd = ["nginx", "-p", str(directory), "-c", str(conf), "-e", str(directory / "nginx-error.log")]
                target_proc = start(pinned(cmd, LOAD_CPU if args.pin else None), log)
            elif name in ("bare", "bare" + AIOHTTP_SUFFIX):
                cmd = [word.format(upstream=up.url, listen=f"127.0.0.1:{listen}") for word in BARE_CMD]
                cmd += ["--client", "aiohttp" if name.endswith(AIOHTTP_SUFFIX) else "pool"]
                target_proc = start(pinned(cmd, LOAD_CPU if args.pin else None), log)
            else:
                values = {
                    "upstream": up.url,
                    "listen": f"127.0.0.1:{listen}",
                    "host": "127.0.0.1",
                    "port": str(listen),
                    "state": args.state,
                }
                env = {k: v for k, v in os.environ.items() if k != "MCPGUARD_ARGON2_PROFILE"}
                env["MCP_RATE_LIMIT_PER_MIN"] = str(args.rate_limit)
                env.update(pair.split("=", 1) for pair in args.proxy_env)
                if name == args.proxy_name + AIOHTTP_SUFFIX:
                    env.update(AIOHTTP_ENV)
                target_proc = start(pinned(command(args.proxy_cmd, **values), LOAD_CPU if args.pin else None), log, env)
            started.append(target_proc)
            try:
                wait_for_port(listen, target_proc, log)
            except RuntimeError as error:
                notes.append(f"{name} in front of {upstream} did not start: {error}")
                continue
            targets.append(Service(name, f"http://127.0.0.1:{listen}/mcp", target_proc))
        yield up, targets, notes
    finally:
        for proc in reversed(started):
            stop(proc)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def difference(value: float | None, base: float | None) -> float | None:
    return value - base if value is not None and base is not None else None


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


COLUMNS = "  {:<10} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}"
HEADER = ("target", "req/s", "x direct", "p50 ms", "+p50 ms", "p99 ms", "+p99 ms", "proxy CPU", "upstr CPU")


def report_table(runs: list[Run], out: TextIO) -> None:
    print(COLUMNS.format(*HEADER), file=out)
    direct = next((run for run in runs if run.target == "direct" and run.valid), None)
    for run in runs:
        if not run.valid:
            print(f"  {run.target:<10} INVALID RUN ({run.note}; {run.requests} calls)", file=out)
            continue
        base = direct if direct is not None and run is not direct else None
        row = (
            fmt(run.rps, ",.0f"),
            fmt(ratio(run.rps, direct.rps if direct else None), ".2f"),
            fmt(run.p50_ms, ".3f"),
            fmt(difference(run.p50_ms, base.p50_ms if base else None), "+.3f"),
            fmt(run.p99_ms, ".3f"),
            fmt(difference(run.p99_ms, base.p99_ms if base else None), "+.3f"),
            fmt(run.proxy_cpu_ms_per_call, ".3f"),
            fmt(run.upstream_cpu_ms_per_call, ".3f"),
        )
        print(COLUMNS.format(run.target, *row), file=out)


def median(values: Sequence[float | None]) -> float | None:
    """The median of ``values``, or None when any is missing (an invalid run is never averaged away)."""
    known = [value for value in values if value is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def spread(values: Sequence[float | None], spec: str) -> str:
    """`` (low-high over N rounds)`` for more than one value, else nothing."""
    known = [value for value in values if value is not None]
    if len(known) < 2:
        return ""
    return f" ({format(min(known), spec)} to {format(max(known), spec)} over {len(known)} rounds)"


def paired(runs: list[Run], upstream: str, proxy: str, connections: int) -> list[tuple[Run, Run]]:
    """Each round's run of ``proxy`` beside that round's direct run, at ``connections``."""
    key = (upstream, "direct", connections)
    direct = {run.round: run for run in runs if (run.upstream, run.target, run.connections) == key}
    return [
        (run, direct[run.round])
        for run in runs
        if (run.upstream, run.target, run.connections) == (upstream, proxy, connections) and run.round in direct
    ]


def verdicts(upstream: str, runs: list[Run], proxies: Sequence[str]) -> list[Verdict]:
    """Each design target for each proxy in front of ``upstream``, judged by its median over the rounds, each
    round's figure taken against direct from the same round."""
    found: list[Verdict] = []
    for proxy in proxies:
        own = [run for run in runs if run.upstream == upstream and run.target == proxy]
        if not own:
            found.append(Verdict(upstream, proxy, "every target", None, 0.0, "NOT MET (did not run)"))
            continue
        # (name, per-round values, limit, whether the value must be at least the limit, the runs they rest on)
        checks: list[tuple[str, list[float | None], float, bool, list[Run]]] = []
        for connections in (16, 64):
            pairs = paired(runs, upstream, proxy, connections)
            if pairs:
                name = f"throughput >= {MIN_THROUGHPUT_RATIO}x direct at c={connections}"
                values = [ratio(run.rps, direct.rps) for run, direct in pairs]
                checks.append((name, values, MIN_THROUGHPUT_RATIO, True, [r for pair in pairs for r in pair]))
        pairs = paired(runs, upstream, proxy, 1)
        if pairs:
            name = f"added p50 <= {MAX_ADDED_P50_MS} ms at c=1"
            values = [difference(run.p50_ms, direct.p50_ms) for run, direct in pairs]
            checks.append((name, values, MAX_ADDED_P50_MS, False, [r for pair in pairs for r in pair]))
        worst: list[float | None] = []
        for connections in sorted({run.connections for run in own}):
            worst.append(median([run.proxy_cpu_ms_per_call for run in own if run.connections == connections]))
        levels = ",".join(str(c) for c in sorted({run.connections for run in own}))
        name = f"proxy CPU <= {MAX_PROXY_CPU_MS} ms per call (worst median of c={levels})"
        checks.append((name, [max(worst) if None not in worst else None], MAX_PROXY_CPU_MS, False, own))
        for name, values, limit, at_least, basis in checks:
            value = median(values)
            if not all(run.valid for run in basis):
                status = "NOT MET (invalid run)"
            elif value is None:
                status = "NOT MET (not measured)"
            else:
                status = "met" if (value >= limit if at_least else value <= limit) else "NOT MET"
            found.append(Verdict(upstream, proxy, name + spread(values, ".3f"), value, limit, status))
    return found


def report_medians(upstream: str, runs: list[Run], connections: int, out: TextIO) -> None:
    """Per target, the median over the rounds at ``connections``, each ratio and difference taken per round."""
    print(f"\n{upstream}, c={connections}: medians over the rounds", file=out)
    print(COLUMNS.format(*HEADER), file=out)
    here = [run for run in runs if run.upstream == upstream and run.connections == connections]
    targets = list(dict.fromkeys(run.target for run in here))
    for target in targets:
        own = [run for run in runs if (run.upstream, run.target, run.connections) == (upstream, target, connections)]
        pairs = paired(runs, upstream, target, connections) if target != "direct" else []
        row = (
            fmt(median([run.rps for run in own]), ",.0f"),
            fmt(median([ratio(run.rps, direct.rps) for run, direct in pairs]) if pairs else None, ".2f"),
            fmt(median([run.p50_ms for run in own]), ".3f"),
            fmt(median([difference(run.p50_ms, direct.p50_ms) for run, direct in pairs]) if pairs else None, "+.3f"),
            fmt(median([run.p99_ms for run in own]), ".3f"),
            fmt(median([difference(run.p99_ms, direct.p99_ms) for run, direct in pairs]) if pairs else None, "+.3f"),
            fmt(median([run.proxy_cpu_ms_per_call for run in own]), ".3f"),
            fmt(median([run.upstream_cpu_ms_per_call for run in own]), ".3f"),
        )
        print(COLUMNS.format(target, *row), file=out)


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each run (default 2)")
    parser.add_argument("--concurrency", default="1,16,64", help="connection counts (default 1,16,64)")
    parser.add_argument("--upstreams", default="demo,echo", help="of demo,echo (default both)")
    parser.add_argument(
        "--targets",
        default=None,
        help="of direct, --proxy-name (and its -aiohttp), bare, bare-aiohttp, nginx (default all)",
    )
    parser.add_argument("--proxy-name", default="sidecar", help="the proxy command's name in reports")
    parser.add_argument("--proxy-cmd", default=DEFAULT_PROXY_CMD, help="command template for the proxy")
    parser.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE", help="extra proxy env")
    parser.add_argument("--rate-limit", type=int, default=1_000_000_000, help="MCP_RATE_LIMIT_PER_MIN for the proxy")
    parser.add_argument("--key-cmd", default=DEFAULT_KEY_CMD, help="makes the key; prints JSON with a 'key' field")
    parser.add_argument("--key", default=None, help="use this bearer key instead of running --key-cmd")
    parser.add_argument("--no-key", action="store_true", help="send no Authorization header")
    parser.add_argument("--state", default=None, help="state URL or path for the proxy (default: a temp file)")
    parser.add_argument("--rounds", type=int, default=1, help="times each concurrency is measured (default 1)")
    parser.add_argument("--pin", action="store_true", help="upstream alone on one CPU; load and target on another")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.pin and (shutil.which("taskset") is None or len(ALLOWED_CPUS) < 2):
        parser.error("--pin needs taskset (util-linux) and at least two CPUs this process may use")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.upstreams = [u for u in args.upstreams.split(",") if u]
    variant = args.proxy_name + AIOHTTP_SUFFIX
    # The -aiohttp variant of the proxy only means something for the sidecar's own command.
    default = (
        f"direct,{args.proxy_name},{variant},bare,bare-aiohttp,nginx"
        if args.proxy_cmd == DEFAULT_PROXY_CMD
        else (f"direct,{args.proxy_name},bare,nginx")
    )
    args.targets = [t for t in (args.targets or default).split(",") if t]
    unknown = [u for u in args.upstreams if u not in UPSTREAMS]
    if unknown:
        parser.error(f"unknown upstream(s) {unknown}; choose from {sorted(UPSTREAMS)}")
    if args.proxy_name in ("direct", *REFERENCES):
        parser.error(f"--proxy-name {args.proxy_name!r} is taken by a built-in target")
    if not set(args.targets) <= {"direct", args.proxy_name, variant, *REFERENCES}:
        parser.error(
            f"targets are direct, {args.proxy_name!r} (--proxy-name), {variant!r}, bare, bare-aiohttp and nginx"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; install it (Debian: apt-get install -y wrk) and run again.", file=sys.stderr)
        return 2
    out = sys.stdout
    runs: list[Run] = []
    found: list[Verdict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mcpguard-bench-") as tmp:
        directory = Path(tmp)
        args.state = args.state or str(directory / "state.db")
        needs_key = bool({args.proxy_name, args.proxy_name + AIOHTTP_SUFFIX} & set(args.targets))
        key = make_key(args, args.state) if needs_key else None
        headers = {**HEADERS, **({"Authorization": f"Bearer {key}"} if key else {})}
        lua = write_lua(directory, headers)
        # nginx is a reference: when it is not installed it is skipped with a note, not judged.
        proxies = [t for t in args.targets if t != "direct" and (t != "nginx" or shutil.which("nginx"))]
        print(
            f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {args.seconds:g} s per run "
            f"after {args.warmup:g} s warm-up; CPU columns are ms per call"
            + (f"; pinned: upstream on CPU {UPSTREAM_CPU}, load and target on CPU {LOAD_CPU}" if args.pin else ""),
            file=out,
        )
        for upstream in args.upstreams:
            with services(directory, upstream, args) as (up, targets, started_notes):
                notes.extend(started_notes)
                ready = []
                for target in targets:
                    try:
                        preflight(target.url, headers)
                        ready.append(target)
                    except RuntimeError as error:
                        notes.append(f"{target.name} in front of {upstream}: {error}")
                assert up.proc is not None
                for connections in args.concurrency:
                    for number in range(1, args.rounds + 1):
                        batch = [measure(lua, upstream, target, up.proc, connections, args) for target in ready]
                        for run in batch:
                            run.round = number
                        runs.extend(batch)
                        which = f", round {number} of {args.rounds}" if args.rounds > 1 else ""
                        print(f"\n{upstream}: {UPSTREAMS[upstream][0]}, c={connections}{which}", file=out)
                        report_table(batch, out)
                    if args.rounds > 1:
                        report_medians(upstream, runs, connections, out)
            found.extend(verdicts(upstream, runs, proxies))
    basis = "figure against direct from the same run"
    if args.rounds > 1:
        basis = "median over the rounds, each against direct from its round"
    print(f"\ntargets (DESIGN.md, judged by the {basis}):", file=out)
    for verdict in found:
        print(
            f"  [{verdict.upstream}] {verdict.target}: {verdict.name}: {fmt(verdict.value, '.3f', 'n/a')} "
            f"-> {verdict.status}",
            file=out,
        )
    if not found:
        print("  none judged: no proxy target was measured", file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    if args.out:
        config = {
            name: getattr(args, name)
            for name in ("seconds", "warmup", "concurrency", "upstreams", "targets", "rounds", "pin")
        }
        config |= {"proxy_cmd": args.proxy_cmd, "cpus": os.cpu_count()}
        document = {
            "config": config,
            "runs": [asdict(run) for run in runs],
            "targets": [asdict(verdict) for verdict in found],
            "notes": notes,
        }
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    # Misses are reported above; a non-zero exit means something could not be measured at all.
    return 1 if notes or not all(run.valid for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
