"""The SQLite tables of the authorization server's clients, authorization codes, consent tickets and local users.

A mixin of :class:`~mcpguard.stores.sqlite.SQLiteStore`, which lends it its connections.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

from mcpguard.stores.base import ClientRecord, CodeConsumption, CodeOutcome, CodeRecord, UserRecord
from mcpguard.stores.code_consumption import consume
from mcpguard.stores.sqlite_tables import (
    Connections,
    from_json_list,
    from_timestamp,
    immediate,
    json_list,
    timestamp,
    words,
)

__all__ = ["OAUTH_SCHEMA", "OAuthTables"]

OAUTH_SCHEMA = """
CREATE TABLE IF NOT EXISTS oauth_clients (
    client_id TEXT PRIMARY KEY,
    client_secret_hash TEXT,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_codes (
    code_hash TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    resource TEXT NOT NULL,
    scopes TEXT NOT NULL,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    consumed_at TEXT
);
CREATE TABLE IF NOT EXISTS oauth_consent_tickets (
    ticket_hash TEXT PRIMARY KEY,
    expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_consent_tickets_by_expiry ON oauth_consent_tickets (expires_at);
CREATE TABLE IF NOT EXISTS oauth_users (
    user_id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    tenants TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at TEXT NOT NULL,
    disabled_at TEXT
);
"""

# Every statement below is built from constant column lists only; every value is a bound parameter.
_CLIENT_COLUMNS = "client_id, client_secret_hash, metadata, created_at"
_INSERT_CLIENT = f"INSERT INTO oauth_clients ({_CLIENT_COLUMNS}) VALUES (?, ?, ?, ?)"  # noqa: S608 (see above)
_SELECT_CLIENT = f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients WHERE client_id = ?"  # noqa: S608 (see above)

_CODE_COLUMNS = (
    "code_hash, grant_id, client_id, redirect_uri, code_challenge, resource, scopes, tenant, subject, "
    "created_at, expires_at, consumed_at"
)
_INSERT_CODE = f"INSERT INTO oauth_codes ({_CODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (see above)
_SELECT_CODE = f"SELECT {_CODE_COLUMNS} FROM oauth_codes WHERE code_hash = ?"  # noqa: S608 (see above)
_SET_CODE_CONSUMED = "UPDATE oauth_codes SET consumed_at = ? WHERE code_hash = ?"
_FORGET_TICKETS = "DELETE FROM oauth_consent_tickets WHERE expires_at <= ?"
_SPEND_TICKET = "INSERT INTO oauth_consent_tickets (ticket_hash, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING"

_USER_COLUMNS = "user_id, email, password_hash, tenants, scopes, created_at, disabled_at"
_INSERT_USER = f"INSERT INTO oauth_users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (see above)
_SELECT_USER_BY_EMAIL = f"SELECT {_USER_COLUMNS} FROM oauth_users WHERE email = ?"  # noqa: S608 (see above)
_SELECT_USER = f"SELECT {_USER_COLUMNS} FROM oauth_users WHERE user_id = ?"  # noqa: S608 (see above)
_SET_PASSWORD = f"UPDATE oauth_users SET password_hash = ? WHERE user_id = ? RETURNING {_USER_COLUMNS}"  # noqa: S608 (see above)
# The first disabling time is kept, as a revocation's is.
_DISABLE_USER = (
    "UPDATE oauth_users SET disabled_at = COALESCE(disabled_at, ?) "  # noqa: S608 (see above)
    f"WHERE user_id = ? RETURNING {_USER_COLUMNS}"
)
# Tenants are a JSON array, so membership is an exact match on one element, never a substring.
_SELECT_USERS = (
    f"SELECT {_USER_COLUMNS} FROM oauth_users "  # noqa: S608 (see above)
    "WHERE ?1 IS NULL OR EXISTS (SELECT 1 FROM json_each(oauth_users.tenants) WHERE json_each.value = ?1) "
    "ORDER BY created_at, rowid"
)


def _client(row: Any) -> ClientRecord:
    client_id, client_secret_hash, metadata, created_at = row
    return ClientRecord(
        client_id=client_id,
        client_secret_hash=client_secret_hash,
        metadata=metadata,
        created_at=from_timestamp(created_at),
    )


def _code_row(record: CodeRecord) -> tuple[str | None, ...]:
    return (
        record.code_hash,
        record.grant_id,
        record.client_id,
        record.redirect_uri,
        record.code_challenge,
        record.resource,
        words(record.scopes),
        record.tenant,
        record.subject,
        timestamp(record.created_at),
        timestamp(record.expires_at),
        timestamp(record.consumed_at),
    )


def _code(row: Any) -> CodeRecord:
    (code_hash, grant_id, client_id, redirect_uri, code_challenge, resource, scopes, tenant, subject) = row[:9]
    created_at, expires_at, consumed_at = row[9:]
    return CodeRecord(
        code_hash=code_hash,
        grant_id=grant_id,
        client_id=client_id,
        redirect_uri=redirect_uri,
        code_challenge=code_challenge,
        resource=resource,
        scopes=tuple(scopes.split()),
        tenant=tenant,
        subject=subject,
        created_at=from_timestamp(created_at),
        expires_at=from_timestamp(expires_at),
        consumed_at=from_timestamp(consumed_at),
    )


def _user(row: Any) -> UserRecord:
    user_id, email, password_hash, tenants, scopes, created_at, disabled_at = row
    return UserRecord(
        user_id=user_id,
        email=email,
        password_hash=password_hash,
        tenants=from_json_list(tenants),
        scopes=tuple(scopes.split()),
        created_at=from_timestamp(created_at),
        disabled_at=from_timestamp(disabled_at),
    )


def _insert(conn: sqlite3.Connection, statement: str, row: tuple[str | None, ...], messages: dict[int, str]) -> None:
    """Insert ``row``; a constraint named in ``messages`` (by SQLite error code) is that ``ValueError``."""
    try:
        conn.execute(statement, row)
    except sqlite3.IntegrityError as exc:
        message = messages.get(exc.sqlite_errorcode)
        if message is not None:
            raise ValueError(message) from None
        raise


class OAuthTables:
    """Clients, codes, tickets and users of the authorization server, each method one statement or one transaction."""

    async def add_client(self: Connections, record: ClientRecord) -> None:
        """Insert a new client; an existing ``client_id`` is a ``ValueError``."""
        row = (record.client_id, record.client_secret_hash, record.metadata, timestamp(record.created_at))
        duplicate = {sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY: f"client id {record.client_id!r} already exists"}
        await self._run(lambda conn: _insert(conn, _INSERT_CLIENT, row, duplicate))

    async def get_client(self: Connections, client_id: str) -> ClientRecord | None:
        """The client ``client_id`` names, or ``None``."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_CLIENT, (client_id,)).fetchall())
        return _client(rows[0]) if rows else None

    async def add_code(self: Connections, record: CodeRecord) -> None:
        """Insert a new code; an existing ``code_hash`` is a ``ValueError``."""
        duplicate = {sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY: "this authorization code already exists"}
        await self._run(lambda conn: _insert(conn, _INSERT_CODE, _code_row(record), duplicate))

    async def consume_code(self: Connections, code_hash: str, at: datetime) -> CodeConsumption:
        """Use the code once: of any number of concurrent calls for one code, exactly one is ``FRESH``."""

        def transaction(conn: sqlite3.Connection) -> CodeConsumption:
            with immediate(conn):
                rows = conn.execute(_SELECT_CODE, (code_hash,)).fetchall()
                if not rows:
                    return CodeConsumption(outcome=CodeOutcome.UNKNOWN, record=None)
                before = _code(rows[0])
                consumption = consume(before, at)
                after = consumption.record
                if after is not None and after.consumed_at != before.consumed_at:
                    conn.execute(_SET_CODE_CONSUMED, (timestamp(after.consumed_at), code_hash))
                return consumption

        return await self._run(transaction)

    async def spend_ticket(self: Connections, ticket_hash: str, expires_at: datetime, at: datetime) -> bool:
        """Use a consent ticket once: of any number of concurrent calls for one ticket before ``expires_at``,
        exactly one is ``True``; at or after it every call is ``False``, and the ticket may be forgotten."""
        if at >= expires_at:
            return False

        def transaction(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                conn.execute(_FORGET_TICKETS, (timestamp(at),))
                return conn.execute(_SPEND_TICKET, (ticket_hash, timestamp(expires_at))).rowcount == 1

        return await self._run(transaction)

    async def add_user(self: Connections, record: UserRecord) -> None:
        """Insert a new user; an existing ``user_id`` or email (in any case) is a ``ValueError``."""
        row = (
            record.user_id,
            record.email.lower(),
            record.password_hash,
            json_list(record.tenants),
            words(record.scopes),
            timestamp(record.created_at),
            timestamp(record.disabled_at),
        )
        duplicate = {
            sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY: f"user id {record.user_id!r} already exists",
            sqlite3.SQLITE_CONSTRAINT_UNIQUE: "a user with this email already exists",
        }
        await self._run(lambda conn: _insert(conn, _INSERT_USER, row, duplicate))

    async def get_user(self: Connections, user_id: str) -> UserRecord | None:
        """The user ``user_id`` names, or ``None``."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_USER, (user_id,)).fetchall())
        return _user(rows[0]) if rows else None

    async def get_user_by_email(self: Connections, email: str) -> UserRecord | None:
        """The user with this email, compared case-insensitively, or ``None``."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_USER_BY_EMAIL, (email.lower(),)).fetchall())
        return _user(rows[0]) if rows else None

    async def set_user_password(self: Connections, user_id: str, password_hash: str) -> UserRecord | None:
        """Replace the user's password hash; the record after, or ``None`` if unknown."""
        # fetchall() runs the statement to its end, which is what commits it.
        rows = await self._run(lambda conn: conn.execute(_SET_PASSWORD, (password_hash, user_id)).fetchall())
        return _user(rows[0]) if rows else None

    async def list_users(self: Connections, tenant: str | None = None) -> list[UserRecord]:
        """Every user, or every member of ``tenant``, oldest first."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_USERS, (tenant,)).fetchall())
        return [_user(row) for row in rows]

    async def disable_user(self: Connections, user_id: str, at: datetime) -> UserRecord | None:
        """Mark the user disabled at ``at`` (kept if already disabled); the record after, or ``None`` if unknown."""
        rows = await self._run(lambda conn: conn.execute(_DISABLE_USER, (timestamp(at), user_id)).fetchall())
        return _user(rows[0]) if rows else None
