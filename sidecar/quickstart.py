"""``mcpguard quickstart``: the bundled demo MCP server behind the sidecar, with a demo key, in one command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import uvicorn

from mcpguard import KeyRing, open_store
from sidecar.coalescing import CoalescingHttpToolsProtocol
from sidecar.hashing import hasher_from_env
from sidecar.serve import serve_until_stopped, sidecar_from_settings
from sidecar.settings import SidecarSettings, load_settings

__all__ = ["add_quickstart_command"]

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
DEMO_TENANT = "demo"
# The state file is the sidecar's default one: the demo key is revoked when quickstart stops, and expires in any case.
DEMO_KEY_LIFETIME = timedelta(hours=24)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_for_port(port: int, process: asyncio.subprocess.Process, deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise RuntimeError("the demo MCP server exited at start")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError("the demo MCP server did not start in time")


def _instructions(url: str, key: str) -> str:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": "add_item",
            "arguments": {"text": "hello"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    desktop = {
        "mcpServers": {
            "mcpguard-demo": {
                "command": "npx",
                "args": ["-y", "mcp-remote", url, "--header", "Authorization:${MCPGUARD_AUTH}"],
                "env": {"MCPGUARD_AUTH": f"Bearer {key}"},
            }
        }
    }
    return f"""
mcpguard quickstart is running: the demo MCP server behind the sidecar.

  MCP endpoint : {url}
  tenant       : {DEMO_TENANT}
  key          : {key}
                 (scopes mcp:read mcp:write; shown only this once, stored as an argon2id hash;
                  revoked when quickstart stops, and expiring within 24 hours in any case)

Call a tool with curl:

  curl -s {url} \\
    -H 'Authorization: Bearer {key}' \\
    -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\
    -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' -H 'Mcp-Name: add_item' \\
    -d '{json.dumps(body, separators=(",", ":"))}'

The demo tools take a tenant_id argument; the sidecar pins it to the key's tenant ({DEMO_TENANT}), so it
is hidden from tools/list and a client cannot name another tenant. The destructive tool delete_items
needs mcp:admin, so this key is refused it (403).

Claude Desktop / any client through mcp-remote (claude_desktop_config.json):

{json.dumps(desktop, indent=2)}

Press Ctrl+C to stop.
"""


async def _run(args: argparse.Namespace) -> int:
    state = getattr(args, "state", None) or os.environ.get("MCPGUARD_STATE") or "./mcpguard.db"
    upstream_port = _free_port()
    demo = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sidecar.demo_server", "--http", f"127.0.0.1:{upstream_port}"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_for_port(upstream_port, demo, time.monotonic() + 20)
        settings = load_settings(
            config_file=None,
            env=os.environ,
            overrides={
                "upstream": f"http://127.0.0.1:{upstream_port}/mcp",
                "listen": f"127.0.0.1:{args.port}",
                "state": state,
                "tenant_argument": "tenant_id",
            },
        )
        store = open_store(settings.state_url)
        ring = KeyRing(store=store, hasher=hasher_from_env(os.environ))
        expires_at = datetime.now(UTC) + DEMO_KEY_LIFETIME
        key, record = await ring.create(
            tenant=DEMO_TENANT, scopes=["mcp:read", "mcp:write"], name="quickstart", expires_at=expires_at
        )
        try:
            return await _serve(settings, key)
        finally:
            await ring.revoke(record.key_id)
            await ring.aclose()
            await store.close()
    finally:
        if demo.returncode is None:
            demo.terminate()
            try:
                await asyncio.wait_for(demo.wait(), timeout=5)
            except TimeoutError:
                demo.kill()


async def _serve(settings: SidecarSettings, key: str) -> int:
    """Serve the sidecar ``settings`` describe until stopped, printing how to call it with ``key`` once it is up."""
    app = sidecar_from_settings(settings, os.environ)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.listen_host,
            port=settings.listen_port,
            http=CoalescingHttpToolsProtocol,
            access_log=False,
            # The guard reads X-Forwarded-For only from its trusted proxies; uvicorn must not rewrite the peer.
            proxy_headers=False,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    )
    task = asyncio.create_task(serve_until_stopped(server))
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers only this flag
        await asyncio.sleep(0.05)
    if server.started:
        print(_instructions(f"{settings.public_origin}{settings.mcp_path}", key), flush=True)
    await task
    return 0 if server.started else 1


def add_quickstart_command(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """Register ``mcpguard quickstart``."""
    quickstart = commands.add_parser(
        "quickstart",
        parents=[common],
        help="run the demo MCP server behind the sidecar and print a demo key",
    )
    quickstart.add_argument("--port", type=int, default=8080, help="where the sidecar listens (default 8080)")
    quickstart.set_defaults(run=_run)
