"""``mcpguard users add|list|disable``: the local users who sign in on the built-in authorization server's
consent page. Passwords are read from a prompt or standard input, never from the command line, and only
their argon2id hashes are stored.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hmac
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeAlias

from mcpguard import GrantRecord, LocalUsers, Store, UserRecord
from sidecar.cli_support import add_audit_option, iso, opened_store, print_table, record_operator_action, scope_list
from sidecar.hashing import hasher_from_env

__all__ = ["add_users_command"]

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# Why a grant is revoked when its user is disabled, as the grants listing shows it.
_DISABLED_REASON = "user_disabled"


class _RefusePassword(argparse.Action):
    """``--password``, hidden: a password typed there is refused without being printed back."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error("passwords are never taken on the command line: use the prompt or --password-stdin")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        # Only the line ending is dropped: every other character belongs to the password.
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if not hmac.compare_digest(password.encode(), getpass.getpass("Repeat the password: ").encode()):
        raise ValueError("the two passwords differ")
    return password


def _user_json(record: UserRecord) -> dict[str, Any]:
    # Field by field, so that the password hash can never be printed by accident.
    return {
        "user_id": record.user_id,
        "email": record.email,
        "tenants": list(record.tenants),
        "scopes": list(record.scopes),
        "created_at": iso(record.created_at),
        "disabled_at": iso(record.disabled_at),
    }


async def _revoke_grants(store: Store, record: UserRecord, at: datetime) -> list[GrantRecord]:
    # The subject LocalUsers gives the accounts it signs in.
    subject = f"user:{record.user_id}"
    revoked: list[GrantRecord] = []
    for tenant in record.tenants:
        for grant in await store.list_grants(tenant):
            if grant.subject == subject and grant.revoked_at is None:
                await store.revoke_grant(grant.grant_id, at, _DISABLED_REASON)
                revoked.append(grant)
    return revoked


async def _add(args: argparse.Namespace) -> int:
    password = await asyncio.to_thread(_read_password, args.password_stdin)
    async with opened_store(args) as store:
        users = LocalUsers(store, hasher=hasher_from_env(os.environ))
        if args.scopes is None:
            record = await users.add(email=args.email, password=password, tenants=args.tenant)
        else:
            record = await users.add(email=args.email, password=password, tenants=args.tenant, scopes=args.scopes)
    if args.json:
        print(json.dumps(_user_json(record)))
        return 0
    print(
        f"added user {record.user_id} ({record.email})\n"
        f"tenants: {' '.join(record.tenants)}\n"
        f"scopes:  {' '.join(record.scopes)}"
    )
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with opened_store(args) as store:
        records = await store.list_users(args.tenant)
    if args.json:
        print(json.dumps([_user_json(record) for record in records]))
        return 0
    rows = [("USER ID", "EMAIL", "STATUS", "TENANTS", "SCOPES", "CREATED")]
    rows += [
        (
            r.user_id,
            r.email,
            "active" if r.disabled_at is None else "disabled",
            ",".join(r.tenants),
            ",".join(r.scopes),
            iso(r.created_at) or "",
        )
        for r in records
    ]
    print_table(rows)
    return 0


async def _disable(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    async with opened_store(args) as store:
        user = await store.get_user_by_email(args.email)
        record = None if user is None else await store.disable_user(user.user_id, now)
        if record is None:
            print("mcpguard: error: no user with that email", file=sys.stderr)
            return 1
        # Disabling stops new sign-ins; revoking the grants also ends the access and refresh tokens already issued.
        revoked = await _revoke_grants(store, record, now)
    print(
        f"disabled user {record.user_id} ({record.email}) at {iso(record.disabled_at)}; revoked {len(revoked)} grant(s)"
    )
    recorded = [
        await record_operator_action(args, "users disable", tenant=grant.tenant, credential_id=grant.grant_id)
        for grant in revoked
    ]
    return 0 if all(recorded) else 1


def add_users_command(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """Register ``mcpguard users``."""
    users = commands.add_parser(
        "users", parents=[common], help="add, list and disable the users who sign in to the OAuth server"
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser("add", parents=[common], help="add a user (the password is prompted for)")
    add.add_argument("--email", required=True, help="what the user signs in with")
    add.add_argument(
        "--tenant", required=True, action="append", help="a tenant the user belongs to (repeat for several)"
    )
    add.add_argument(
        "--scopes", type=scope_list, metavar="S1,S2", help="the most the user may grant (default mcp:read)"
    )
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of standard input"
    )
    add.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    add.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(run=_add)

    listing = actions.add_parser("list", parents=[common], help="list users (never their password hashes)")
    listing.add_argument("--tenant", help="only the members of this tenant")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_list)

    disable = actions.add_parser("disable", parents=[common], help="stop a user signing in and revoke their grants")
    disable.add_argument("--email", required=True)
    add_audit_option(disable)
    disable.set_defaults(run=_disable)
