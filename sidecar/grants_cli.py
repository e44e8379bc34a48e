"""``mcpguard grants list|revoke``: the grants the built-in authorization server made, each a consent of one
user for one client in one tenant; revoking one ends its refresh and access tokens at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any, TypeAlias

from mcpguard import GrantRecord
from sidecar.cli_support import add_audit_option, iso, opened_store, print_table, record_operator_action

__all__ = ["add_grants_command"]

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_REVOKED_REASON = "revoked"


def _grant_json(grant: GrantRecord) -> dict[str, Any]:
    # Field by field: a grant record holds no hash today, and a listing must not start showing one tomorrow.
    return {
        "grant_id": grant.grant_id,
        "tenant": grant.tenant,
        "subject": grant.subject,
        "client_id": grant.client_id,
        "scopes": list(grant.scopes),
        "resource": grant.resource,
        "created_at": iso(grant.created_at),
        "expires_at": iso(grant.expires_at),
        "revoked_at": iso(grant.revoked_at),
        "revoked_reason": grant.revoked_reason,
    }


def _status(grant: GrantRecord, now: datetime) -> str:
    if grant.revoked_at is not None:
        return f"revoked ({grant.revoked_reason})" if grant.revoked_reason else "revoked"
    return "expired" if grant.expires_at <= now else "active"


async def _list(args: argparse.Namespace) -> int:
    async with opened_store(args) as store:
        grants = await store.list_grants(args.tenant)
    if args.json:
        print(json.dumps([_grant_json(grant) for grant in grants]))
        return 0
    now = datetime.now(UTC)
    rows = [("GRANT ID", "STATUS", "SUBJECT", "CLIENT", "SCOPES", "CREATED", "EXPIRES")]
    rows += [
        (
            g.grant_id,
            _status(g, now),
            g.subject,
            g.client_id,
            ",".join(g.scopes),
            iso(g.created_at) or "",
            iso(g.expires_at) or "",
        )
        for g in grants
    ]
    print_table(rows)
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    async with opened_store(args) as store:
        grant = await store.revoke_grant(args.grant_id, datetime.now(UTC), _REVOKED_REASON)
    if grant is None:
        print("mcpguard: error: no grant with that id", file=sys.stderr)
        return 1
    print(f"revoked grant {grant.grant_id} of tenant {grant.tenant} at {iso(grant.revoked_at)}")
    recorded = await record_operator_action(args, "grants revoke", tenant=grant.tenant, credential_id=grant.grant_id)
    return 0 if recorded else 1


def add_grants_command(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """Register ``mcpguard grants``."""
    grants = commands.add_parser("grants", parents=[common], help="list and revoke the OAuth server's grants")
    actions = grants.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="list a tenant's grants")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_list)

    revoke = actions.add_parser("revoke", parents=[common], help="revoke a grant and its tokens at once")
    revoke.add_argument("grant_id", metavar="GRANT_ID")
    add_audit_option(revoke)
    revoke.set_defaults(run=_revoke)
