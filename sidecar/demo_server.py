"""A small multi-tenant MCP server to try the sidecar on: ``python -m sidecar.demo_server --http 127.0.0.1:9000``.

It keeps items in memory per ``tenant_id`` argument and trusts that argument without reading any identity
header, so it is safe only behind a guard that pins ``tenant_id`` (it serves stdio unless ``--http`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import defaultdict
from collections.abc import Sequence

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from starlette.types import ASGIApp

__all__ = ["build_server", "http_app", "main"]

README = """\
mcpguard demo server

Tools: list_items, add_item, delete_items (per tenant_id), echo, slow_count.
"""

# Long enough that progress notifications leave as separate SSE events, short enough for tests.
PROGRESS_INTERVAL_SECONDS = 0.02


def build_server() -> MCPServer:
    """A fresh demo server with its own empty item store."""
    server = MCPServer("mcpguard-demo", instructions="A demo server for trying mcpguard.")
    items: defaultdict[str, list[str]] = defaultdict(list)

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def list_items(tenant_id: str) -> list[str]:
        """The items of a tenant."""
        return list(items[tenant_id])

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False))
    def add_item(tenant_id: str, text: str) -> int:
        """Add an item to a tenant; returns how many it has now."""
        tenant_items = items[tenant_id]
        tenant_items.append(text)
        return len(tenant_items)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    def delete_items(tenant_id: str) -> int:
        """Delete every item of a tenant; returns how many were deleted."""
        return len(items.pop(tenant_id, []))

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def slow_count(n: int, ctx: Context) -> int:
        """Count to ``n``, reporting progress at each step; returns ``n``."""
        for step in range(1, n + 1):
            await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
            await ctx.report_progress(step, n, f"counted {step}")
        return n

    @server.resource("demo://readme", name="readme", mime_type="text/plain")
    def readme() -> str:
        """What this server offers."""
        return README

    @server.prompt()
    def summarize_items(tenant_id: str) -> str:
        """Ask for a summary of a tenant's items."""
        return f"Call list_items with tenant_id={tenant_id!r} and summarize the items in one sentence."

    return server


def http_app() -> ASGIApp:
    """A fresh demo server as a streamable HTTP ASGI app serving ``/mcp`` on 127.0.0.1."""
    return build_server().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the demo server over stdio (default) or streamable HTTP."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo_server", description=__doc__)
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument("--http", type=_address, metavar="HOST:PORT", help="serve streamable HTTP at /mcp")
    transport.add_argument("--stdio", action="store_true", help="serve over stdin/stdout (the default)")
    args = parser.parse_args(argv)
    if args.http is None:
        build_server().run("stdio")
        return 0
    host, port = args.http
    uvicorn.run(http_app(), host=host, port=port, loop="uvloop", http="httptools", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
