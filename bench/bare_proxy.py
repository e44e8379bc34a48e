"""The sidecar's forwarding alone, with no guard: uvicorn and the same pooled proxy, nothing else.

Run: ``python -m bench.bare_proxy --upstream http://127.0.0.1:9001/mcp --listen 127.0.0.1:9002
[--client pool|aiohttp]`` (the sidecar's own pool by default, as the sidecar forwards). It is
the floor under the sidecar: what serving and forwarding a call costs before any key, limit, scope or
audit entry, so a benchmark can tell the guard's share from the HTTP stack's.
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Receive, Scope, Send

from mcpguard.request_state import SCOPE_KEY, RequestState
from sidecar.proxy import ProxySettings, UpstreamProxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="the upstream MCP endpoint URL")
    parser.add_argument("--listen", default="127.0.0.1:9002", help="HOST:PORT to serve on")
    parser.add_argument("--client", choices=("pool", "aiohttp"), default="pool", help="the forwarding client")
    args = parser.parse_args()
    proxy = UpstreamProxy(ProxySettings(upstream=args.upstream, client=args.client))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # The proxy maps the MCP endpoint by the request's state, as the guard would have set it.
            state = RequestState()
            state.is_mcp = scope["path"] == "/mcp"
            scope[SCOPE_KEY] = state
        await proxy(scope, receive, send)

    host, _, port = args.listen.rpartition(":")
    uvicorn.run(
        app,
        host=host,
        port=int(port),
        http="httptools",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
