"""``mcpguard audit query|tail``: read the audit trail from the command line (the operator's view)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, TypeAlias

from mcpguard import AUDIT_FILTERS as FILTERS
from mcpguard import AuditQuery, open_audit_store, parse_query
from sidecar.cli_support import add_audit_option, audit_url, inert

__all__ = ["add_audit_command"]


def _audit_url(args: argparse.Namespace) -> str:
    url = audit_url(args)
    if url is None:
        raise SystemExit(
            "mcpguard: error: the state is not an SQLite file: name the audit store with --audit or MCPGUARD_AUDIT"
        )
    return url


_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _query(args: argparse.Namespace) -> AuditQuery:
    params = {name: [str(getattr(args, name))] for name in FILTERS if getattr(args, name, None) is not None}
    return parse_query(params, tenant=args.tenant)


def _line(call: dict[str, Any]) -> str:
    # Method, tool and path are the client's to choose: each field is inert, so a call prints as one line.
    fields = [
        call["at"],
        call.get("tenant") or "-",
        call.get("subject") or "-",
        call.get("http_method") or "-",
        call.get("rpc_method") or call.get("path") or "-",
        call.get("tool") or "-",
        str(call.get("status") or "-"),
        call.get("decision") or "-",
        call.get("reason") or "",
        # A read of the trail: whose trail it read (an operator may read another tenant's, or every tenant's: *).
        f"read_tenant={call['read_tenant']}" if call.get("read_tenant") else "",
        f"{call['duration_ms']:.1f}ms" if call.get("duration_ms") is not None else "",
        "" if call.get("outcome") != "no_outcome" else "NO OUTCOME",
    ]
    return "  ".join(map(inert, fields)).rstrip()


def _print(calls: list[dict[str, Any]], as_json: bool) -> None:
    for call in calls:
        print(json.dumps(call) if as_json else _line(call), flush=True)


async def _run_query(args: argparse.Namespace) -> int:
    store = open_audit_store(_audit_url(args))
    try:
        page = await store.query(_query(args))
    finally:
        await store.close()
    _print(page.calls, args.json)
    return 0


async def _run_tail(args: argparse.Namespace) -> int:
    store = open_audit_store(_audit_url(args))
    seen: set[str] = set()
    first = True
    try:
        while True:
            page = await store.query(_query(args))
            fresh = [call for call in reversed(page.calls) if call["id"] not in seen]
            seen.update(call["id"] for call in fresh)
            if not first or args.history:
                _print(fresh, args.json)
            first = False
            await asyncio.sleep(args.interval)
    except asyncio.CancelledError:
        return 0
    finally:
        await store.close()


def _filters(parser: argparse.ArgumentParser) -> None:
    add_audit_option(parser)
    parser.add_argument("--tenant", help="one tenant (default: all tenants)")
    parser.add_argument("--tool")
    parser.add_argument("--method", help="JSON-RPC method, e.g. tools/call")
    parser.add_argument("--status", type=int)
    parser.add_argument("--decision", choices=("allowed", "denied"))
    parser.add_argument("--subject")
    parser.add_argument("--credential")
    parser.add_argument("--since", help="ISO 8601 time")
    parser.add_argument("--until", help="ISO 8601 time")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def add_audit_command(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """Register ``mcpguard audit``."""
    audit = commands.add_parser("audit", parents=[common], help="read the audit trail")
    actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    query = actions.add_parser("query", parents=[common], help="print matching calls, newest first")
    _filters(query)
    query.add_argument("--limit", type=int, default=100)
    query.set_defaults(run=_run_query)
    tail = actions.add_parser("tail", parents=[common], help="print calls as they are recorded")
    _filters(tail)
    tail.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    tail.add_argument("--history", action="store_true", help="print the latest calls first")
    tail.set_defaults(run=_run_tail, limit=100)
