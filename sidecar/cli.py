"""The ``mcpguard`` command: operator tasks, each a thin layer over the library's public API.

Every command is added to the parser by one function listed in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeAlias

import uvloop

from mcpguard import KeyRecord, KeyRing, MCPGuardError, open_store
from sidecar.audit_cli import add_audit_command
from sidecar.cli_support import add_audit_option, iso, print_table, record_operator_action, scope_list, state_url
from sidecar.grants_cli import add_grants_command
from sidecar.hashing import hasher_from_env
from sidecar.quickstart import add_quickstart_command
from sidecar.serve import add_sidecar_command
from sidecar.users_cli import add_users_command

__all__ = ["main"]

_DURATION = re.compile(r"([1-9][0-9]*)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}

# argparse's messages that quote an argument back; the argument is cut out, the choices (if any) are kept.
_QUOTED = re.compile(
    r"(invalid choice|invalid [\w-]+ value|ignored explicit argument):? .*?(?= \(choose from [^()]*\)$|$)", re.DOTALL
)

# A string: argparse does not make this class subscriptable at run time.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_EPILOG = """\
environment:
  MCPGUARD_STATE           where state lives when --state is not given (default ./mcpguard.db)
  MCPGUARD_AUDIT           the audit trail when --audit is not given, as the sidecar reads it (default: the state file)
  MCPGUARD_ARGON2_PROFILE  'cheapest' makes key and password hashing trivially cheap: tests only, never in production
"""


def _expiry(text: str) -> datetime:
    match = _DURATION.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError("expected a duration such as 90d, 12h or 30m")
    try:
        return datetime.now(UTC) + timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        raise argparse.ArgumentTypeError("that duration reaches too far into the future") from None


class _Parser(argparse.ArgumentParser):
    """Takes options by their full names only, and never prints an argument back in a usage error.

    A value typed in the wrong place may be a password, a key or a database URL with its credentials: an
    error names the option or the position, never what was given there. The subcommands' parsers are of
    this class too (argparse makes them of their parent's class).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # An abbreviation such as --pass would stand for the first option it starts, or quote itself as ambiguous.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(_QUOTED.sub(r"\1", message))


@asynccontextmanager
async def _keyring(args: argparse.Namespace) -> AsyncIterator[KeyRing]:
    store = open_store(state_url(args))
    ring = KeyRing(store=store, hasher=hasher_from_env(os.environ))
    try:
        yield ring
    finally:
        await ring.aclose()
        await store.close()


def _record_json(record: KeyRecord) -> dict[str, Any]:
    # Field by field, so that the hash can never be printed by accident.
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "name": record.name,
        "scopes": list(record.scopes),
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": iso(record.revoked_at),
    }


def _status(record: KeyRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"


async def _keys_create(args: argparse.Namespace) -> int:
    async with _keyring(args) as ring:
        if args.scopes is None:
            key, record = await ring.create(tenant=args.tenant, name=args.name, expires_at=args.expires)
        else:
            key, record = await ring.create(
                tenant=args.tenant, scopes=args.scopes, name=args.name, expires_at=args.expires
            )
    if args.json:
        print(json.dumps({"key": key, **_record_json(record)}))
        return 0
    print(key)
    print(
        "This key is shown only once: store it now.\n"
        f"key id:  {record.key_id}\n"
        f"tenant:  {record.tenant}\n"
        f"scopes:  {' '.join(record.scopes)}\n"
        f"name:    {record.name or '-'}\n"
        f"expires: {iso(record.expires_at) or 'never'}",
        file=sys.stderr,
    )
    return 0


async def _keys_list(args: argparse.Namespace) -> int:
    async with _keyring(args) as ring:
        records = await ring.list(args.tenant)
    if args.json:
        print(json.dumps([_record_json(record) for record in records]))
        return 0
    now = datetime.now(UTC)
    rows = [("KEY ID", "STATUS", "SCOPES", "CREATED", "EXPIRES", "NAME")]
    rows += [
        (
            r.key_id,
            _status(r, now),
            ",".join(r.scopes),
            iso(r.created_at) or "",
            iso(r.expires_at) or "never",
            r.name or "-",
        )
        for r in records
    ]
    print_table(rows)
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    async with _keyring(args) as ring:
        record = await ring.revoke(args.key_id)
    if record is None:
        # The argument is not repeated: it may be a whole key pasted by mistake.
        print("mcpguard: error: no key with that id", file=sys.stderr)
        return 1
    print(f"revoked key {record.key_id} of tenant {record.tenant} at {iso(record.revoked_at)}")
    recorded = await record_operator_action(args, "keys revoke", tenant=record.tenant, credential_id=record.key_id)
    return 0 if recorded else 1


def _add_keys(commands: _Commands, common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser("keys", parents=[common], help="create, list and revoke MCP keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", parents=[common], help="create a key and print it once")
    create.add_argument("--tenant", required=True, help="the tenant the key is bound to")
    create.add_argument(
        "--scopes", type=scope_list, metavar="S1,S2", help="comma-separated scopes (default mcp:read,mcp:write)"
    )
    create.add_argument("--name", help="a label shown as the key's subject")
    create.add_argument("--expires", type=_expiry, metavar="DURATION", help="lifetime such as 90d, 12h or 30m")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(run=_keys_create)

    listing = actions.add_parser("list", parents=[common], help="list a tenant's keys (never their hashes)")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(run=_keys_list)

    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key at once")
    revoke.add_argument("key_id", metavar="KEY_ID")
    add_audit_option(revoke)
    revoke.set_defaults(run=_keys_revoke)


_COMMANDS: tuple[Callable[[_Commands, argparse.ArgumentParser], None], ...] = (
    _add_keys,
    add_users_command,
    add_grants_command,
    add_sidecar_command,
    add_quickstart_command,
    add_audit_command,
)


def _parser() -> argparse.ArgumentParser:
    # --state is accepted before or after any subcommand; SUPPRESS keeps a later parser from resetting it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--state",
        default=argparse.SUPPRESS,
        metavar="URL_OR_PATH",
        help="store URL (memory://, sqlite:///PATH) or an SQLite file path",
    )
    # Typed as the base class, whose subparsers' type the command modules take; they are _Parser all the same.
    parser: argparse.ArgumentParser = _Parser(
        prog="mcpguard",
        description="Security layer for MCP servers.",
        parents=[common],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands, common)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``argv`` parsed; unrecognized options are named without their values, other arguments only counted."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        options = [item.partition("=")[0] for item in extra if item.startswith("-")]
        others = len(extra) - len(options)
        named = " ".join(options) + (" and " if options and others else "")
        parser.error(f"unrecognized arguments: {named}" + (f"{others} value(s), not repeated" if others else ""))
    return args


def _explain(error: Exception) -> str:
    # A store's description is written for clients; the operator also gets the underlying cause.
    if isinstance(error, MCPGuardError) and error.__cause__ is not None:
        return f"{error.description} ({error.__cause__})"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = _parse(_parser(), argv)
    try:
        # uvloop for every command: the sidecar serves on it, and the others do not mind.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            status: int = runner.run(args.run(args))
    except (MCPGuardError, ValueError) as error:
        print(f"mcpguard: error: {_explain(error)}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
