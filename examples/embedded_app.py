"""A notes MCP server with a read, a write and a destructive tool, embedded behind mcpguard.

Run it with ``python examples/embedded_app.py`` (state in ``./mcpguard.db`` or ``$MCPGUARD_STATE``),
then create a key with ``mcpguard keys create --tenant acme`` and connect an MCP client to
``http://127.0.0.1:8000/mcp`` with ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import os
from collections import defaultdict

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from starlette.types import ASGIApp

from mcpguard import GuardConfig, KeyRing, MCPGuard, SQLiteAuditStore, current_principal, open_store

server = MCPServer("notes")
_notes: dict[str, list[str]] = defaultdict(list)


def _tenant() -> str:
    principal = current_principal()
    if principal is None:
        raise RuntimeError("called without the guard")
    return principal.tenant


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def list_notes() -> list[str]:
    """The notes of the caller's tenant."""
    return list(_notes[_tenant()])


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
def add_note(text: str) -> int:
    """Add a note to the caller's tenant; returns how many it has now."""
    notes = _notes[_tenant()]
    notes.append(text)
    return len(notes)


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def delete_all_notes() -> int:
    """Delete every note of the caller's tenant; returns how many were deleted."""
    notes = _notes[_tenant()]
    count = len(notes)
    notes.clear()
    return count


def create_app(
    *, state: str, public_url: str, keys: KeyRing | None = None, audit: SQLiteAuditStore | None = None
) -> ASGIApp:
    """The notes server wrapped by the guard, with keys from ``state`` unless a key ring is given."""
    keyring = keys if keys is not None else KeyRing(store=open_store(state))
    config = GuardConfig(public_url=public_url)
    return MCPGuard(server.streamable_http_app(host="127.0.0.1"), config, keys=keyring, audit=audit)


def main() -> None:
    """Serve the guarded notes server on 127.0.0.1:8000."""
    state = os.environ.get("MCPGUARD_STATE", "./mcpguard.db")
    url = state if "://" in state else f"sqlite:///{state}"
    port = int(os.environ.get("PORT", "8000"))
    audit = SQLiteAuditStore(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    app = create_app(state=url, public_url=f"http://127.0.0.1:{port}", audit=audit)
    # proxy_headers=False: the guard reads X-Forwarded-For only from GuardConfig.trusted_proxies; uvicorn's
    # default would rewrite the client address from that header for any peer on 127.0.0.1 first.
    uvicorn.run(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False, proxy_headers=False
    )


if __name__ == "__main__":
    main()
