"""The SQLite tables of grants and their refresh-token families.

A mixin of :class:`~mcpguard.stores.sqlite.SQLiteStore`, which lends it its connections. A rotation is
one ``BEGIN IMMEDIATE`` transaction on the writer thread, so it is atomic against this process's other
calls and against other processes sharing the file; the grant read on every request runs on the
calling thread's read-only connection, as a key read does.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta
from typing import Any

from mcpguard.stores.base import GrantRecord, Rotation, RotationOutcome
from mcpguard.stores.refresh_families import Family, check_grace, rotate
from mcpguard.stores.sqlite_tables import Connections, from_timestamp, immediate, timestamp, words

__all__ = ["GRANT_SCHEMA", "GrantTables"]

GRANT_SCHEMA = """
CREATE TABLE IF NOT EXISTS oauth_grants (
    grant_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    subject TEXT NOT NULL,
    client_id TEXT NOT NULL,
    scopes TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    revoked_at TEXT,
    revoked_reason TEXT,
    generation INTEGER NOT NULL,
    current_hash TEXT NOT NULL,
    previous_hash TEXT,
    rotated_at TEXT
);
CREATE INDEX IF NOT EXISTS oauth_grants_by_tenant ON oauth_grants (tenant, created_at);
CREATE TABLE IF NOT EXISTS oauth_refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL REFERENCES oauth_grants (grant_id)
);
"""

# Every statement below is built from constant column lists only; every value is a bound parameter.
_GRANT_COLUMNS = (
    "grant_id, tenant, subject, client_id, scopes, resource, created_at, expires_at, revoked_at, revoked_reason, "
    "generation"
)
_FAMILY_COLUMNS = f"{_GRANT_COLUMNS}, current_hash, previous_hash, rotated_at"
_INSERT_GRANT = f"INSERT INTO oauth_grants ({_FAMILY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608 (see above)
_INSERT_REFRESH = "INSERT INTO oauth_refresh_tokens (token_hash, grant_id) VALUES (?, ?)"
_SELECT_GRANT = f"SELECT {_GRANT_COLUMNS} FROM oauth_grants WHERE grant_id = ?"  # noqa: S608 (see above)
_SELECT_TENANT = f"SELECT {_GRANT_COLUMNS} FROM oauth_grants WHERE tenant = ? ORDER BY created_at, rowid"  # noqa: S608 (see above)
_SELECT_BY_TOKEN = (
    f"SELECT {_FAMILY_COLUMNS} FROM oauth_grants "  # noqa: S608 (see above)
    "WHERE grant_id = (SELECT grant_id FROM oauth_refresh_tokens WHERE token_hash = ?)"
)
_REFRESH_ISSUED = "SELECT 1 FROM oauth_refresh_tokens WHERE token_hash = ?"
_UPDATE_FAMILY = (
    "UPDATE oauth_grants SET revoked_at = ?, revoked_reason = ?, generation = ?, current_hash = ?, "
    "previous_hash = ?, rotated_at = ? WHERE grant_id = ?"
)
# In an UPDATE every expression sees the row as it was, so the reason is kept exactly when the time is.
_REVOKE = (
    "UPDATE oauth_grants SET revoked_reason = CASE WHEN revoked_at IS NULL THEN ? ELSE revoked_reason END, "  # noqa: S608 (see above)
    f"revoked_at = COALESCE(revoked_at, ?) WHERE grant_id = ? RETURNING {_GRANT_COLUMNS}"
)


def _grant(row: Any) -> GrantRecord:
    grant_id, tenant, subject, client_id, scopes, resource, created_at, expires_at = row[:8]
    revoked_at, revoked_reason, generation = row[8:11]
    return GrantRecord(
        grant_id=grant_id,
        tenant=tenant,
        subject=subject,
        client_id=client_id,
        scopes=tuple(scopes.split()),
        resource=resource,
        created_at=from_timestamp(created_at),
        expires_at=from_timestamp(expires_at),
        revoked_at=from_timestamp(revoked_at),
        revoked_reason=revoked_reason,
        generation=generation,
    )


def _family(row: Any) -> Family:
    current_hash, previous_hash, rotated_at = row[11:]
    return Family(
        grant=_grant(row), current_hash=current_hash, previous_hash=previous_hash, rotated_at=from_timestamp(rotated_at)
    )


def _add_grant(conn: sqlite3.Connection, grant: GrantRecord, refresh_hash: str) -> None:
    with immediate(conn):
        if conn.execute(_REFRESH_ISSUED, (refresh_hash,)).fetchall():
            raise ValueError("this refresh token was already issued")
        row = (
            grant.grant_id,
            grant.tenant,
            grant.subject,
            grant.client_id,
            words(grant.scopes),
            grant.resource,
            timestamp(grant.created_at),
            timestamp(grant.expires_at),
            timestamp(grant.revoked_at),
            grant.revoked_reason,
            grant.generation,
            refresh_hash,
            None,
            None,
        )
        try:
            conn.execute(_INSERT_GRANT, row)
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY:
                raise ValueError(f"grant id {grant.grant_id!r} already exists") from None
            raise
        conn.execute(_INSERT_REFRESH, (refresh_hash, grant.grant_id))


def _rotate(conn: sqlite3.Connection, presented_hash: str, new_hash: str, at: datetime, grace: timedelta) -> Rotation:
    with immediate(conn):
        rows = conn.execute(_SELECT_BY_TOKEN, (presented_hash,)).fetchall()
        if not rows:
            return Rotation(outcome=RotationOutcome.UNKNOWN, grant=None)
        if conn.execute(_REFRESH_ISSUED, (new_hash,)).fetchall():
            raise ValueError("this refresh token was already issued")
        before = _family(rows[0])
        outcome, after = rotate(before, presented_hash, new_hash, at, grace)
        if after != before:
            grant = after.grant
            conn.execute(
                _UPDATE_FAMILY,
                (
                    timestamp(grant.revoked_at),
                    grant.revoked_reason,
                    grant.generation,
                    after.current_hash,
                    after.previous_hash,
                    timestamp(after.rotated_at),
                    grant.grant_id,
                ),
            )
        if outcome in (RotationOutcome.ROTATED, RotationOutcome.GRACE_REISSUED):
            conn.execute(_INSERT_REFRESH, (new_hash, after.grant.grant_id))
        return Rotation(outcome=outcome, grant=after.grant)


class GrantTables:
    """Grants and refresh-token families, each method one statement or one transaction."""

    async def add_grant(self: Connections, grant: GrantRecord, refresh_hash: str) -> None:
        """Create the grant's family, ``refresh_hash`` its live token; a known id or hash is a ``ValueError``."""
        await self._run(lambda conn: _add_grant(conn, grant, refresh_hash))

    async def get_grant(self: Connections, grant_id: str) -> GrantRecord | None:
        """The grant ``grant_id`` names (revoked or not), or ``None``; read in place, as on every request."""
        rows = await self._read(lambda conn: conn.execute(_SELECT_GRANT, (grant_id,)).fetchall())
        return _grant(rows[0]) if rows else None

    async def rotate_refresh(
        self: Connections, presented_hash: str, new_hash: str, at: datetime, grace: timedelta
    ) -> Rotation:
        """Replace the presented token by ``new_hash`` if it is live, or revoke its family on reuse."""
        check_grace(grace)
        return await self._run(lambda conn: _rotate(conn, presented_hash, new_hash, at, grace))

    async def revoke_grant(self: Connections, grant_id: str, at: datetime, reason: str) -> GrantRecord | None:
        """Revoke the grant and its family (the first revocation's time and reason are kept); ``None`` if unknown."""
        # fetchall() runs the statement to its end, which is what commits it.
        rows = await self._run(lambda conn: conn.execute(_REVOKE, (reason, timestamp(at), grant_id)).fetchall())
        return _grant(rows[0]) if rows else None

    async def grant_for_refresh(self: Connections, presented_hash: str) -> GrantRecord | None:
        """The grant whose family ever issued this refresh token (live or not), or ``None``."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_BY_TOKEN, (presented_hash,)).fetchall())
        return _grant(rows[0]) if rows else None

    async def list_grants(self: Connections, tenant: str) -> list[GrantRecord]:
        """Every grant of ``tenant``, oldest first."""
        rows = await self._run(lambda conn: conn.execute(_SELECT_TENANT, (tenant,)).fetchall())
        return [_grant(row) for row in rows]
