"""One conformance suite every audit store runs (SQLite on a file, PostgreSQL in a schema of its own),
then what only PostgreSQL promises: replicas sharing one trail, and failing closed when the server goes.

PostgreSQL outages are made with a TCP relay the test owns in front of the shared server, which it
cuts or freezes; the server itself is never touched, and each test drops the schema it made.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mcpguard.audit import (
    AuditEvent,
    AuditQuery,
    AuditStore,
    PostgresAuditStore,
    SQLiteAuditStore,
    new_event_id,
    open_audit_store,
    parse_query,
)
from mcpguard.audit.events import Phase
from mcpguard.audit.sql import COLUMNS
from mcpguard.errors import StorageUnavailable
from tests.conftest import free_port

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "mcpguard_test"
T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

Body = Callable[[AuditStore], Awaitable[None]]
Cut = Callable[[], Awaitable[None]]


def pg_url(port: int = PG_PORT, schema: str | None = None, password: str = "") -> str:
    """The test database's URL through ``port``, with ``schema`` first on the search path."""
    auth = f"postgres:{password}" if password else "postgres"
    options = f"?options=-csearch_path%3D{schema}" if schema else ""
    return f"postgresql://{auth}@{PG_HOST}:{port}/{PG_DATABASE}{options}"


def require_postgres() -> None:
    """Skip without the test PostgreSQL (fail under CI)."""
    try:
        psycopg.connect(pg_url(), connect_timeout=2).close()
    except psycopg.Error as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs PostgreSQL at {pg_url()}: {exc}")
        pytest.skip(f"no PostgreSQL at {pg_url()}: {exc}")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A schema of this test's own in the test database, dropped afterwards; yields its name."""
    require_postgres()
    schema = f"audit_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_url(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:
        with psycopg.connect(pg_url(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class Relay:
    """A TCP relay in front of PostgreSQL that the test can cut (every connection reset) or freeze."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._flowing = asyncio.Event()

    async def start(self) -> None:
        """Listen, on the same port again after a cut."""
        self._flowing.set()
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and reset every open one, as a crashed server or a dropped link would."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self._flowing.set()

    async def freeze(self) -> None:
        """Refuse new connections and stop relaying on open ones, which stay open: a hung server."""
        if self._server is not None:
            self._server.close()
        self._flowing.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers += [client_writer, server_writer]
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side was cut
        finally:
            writer.transport.abort()


# The trail's table as stores made it before entries named the tenant whose trail they read.
EARLIER_COLUMNS = (
    "id", "at", "phase", "start_id", "tenant", "subject", "credential_id", "client_id", "session", "rpc_method",
    "tool", "http_method", "path", "status", "rpc_error", "tool_error", "decision", "reason", "duration_ms",
    "bytes_in", "bytes_out", "trace_id", "user_agent",
)  # fmt: skip
EARLIER_SQLITE = f"""
CREATE TABLE audit_events ({", ".join(c + (" TEXT PRIMARY KEY" if c == "id" else "") for c in EARLIER_COLUMNS)});
CREATE INDEX audit_by_tenant ON audit_events (tenant, id);
CREATE INDEX audit_by_start ON audit_events (start_id) WHERE start_id IS NOT NULL;
"""
EARLIER_POSTGRES = (
    'CREATE TABLE audit_events (id text COLLATE "C" PRIMARY KEY, at timestamptz NOT NULL, phase text NOT NULL, '
    'start_id text COLLATE "C", tenant text, subject text, credential_id text, client_id text, session text, '
    "rpc_method text, tool text, http_method text, path text, status integer, rpc_error bigint, tool_error boolean, "
    "decision text, reason text, duration_ms double precision, bytes_in bigint, bytes_out bigint, trace_id text, "
    "user_agent text)",
    "CREATE INDEX audit_by_tenant ON audit_events (tenant, id)",
    "CREATE INDEX audit_by_start ON audit_events (start_id)",
)


@dataclass
class Backend:
    """One audit store backend under test, opened by URL in a place of this test's own."""

    name: str
    url: str
    tmp_path: Path
    schema: str | None = None

    def run(self, body: Body) -> None:
        """Open the store, run ``body`` on it in one event loop, and close it."""

        async def main() -> None:
            store = open_audit_store(self.url)
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())

    def make_earlier_trail(self, *rows: tuple[Any, ...]) -> None:
        """Make the trail's table as stores made it before entries named the tenant whose trail they read, holding
        ``rows`` (values of ``EARLIER_COLUMNS``)."""
        marks = ", ".join("?" if self.name == "sqlite" else "%s" for _ in EARLIER_COLUMNS)
        insert = f"INSERT INTO audit_events ({', '.join(EARLIER_COLUMNS)}) VALUES ({marks})"  # noqa: S608 - fixed names
        if self.name == "sqlite":
            with sqlite3.connect(self.tmp_path / "audit.db") as conn:
                conn.executescript(EARLIER_SQLITE)
                conn.executemany(
                    insert, [(*row[:1], row[1].isoformat(timespec="microseconds"), *row[2:]) for row in rows]
                )
            conn.close()
            return
        with psycopg.connect(pg_url(schema=self.schema), autocommit=True) as conn:
            for statement in EARLIER_POSTGRES:
                conn.execute(statement)
            with conn.cursor() as cursor:
                cursor.executemany(insert, rows)

    def columns(self) -> dict[str, str]:
        """The trail table's columns and their declared types."""
        if self.name == "sqlite":
            with sqlite3.connect(self.tmp_path / "audit.db") as conn:
                found = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(audit_events)")}
            conn.close()
            return found
        with psycopg.connect(pg_url(schema=self.schema)) as conn:
            query = (
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'audit_events'"
            )
            return dict(conn.execute(query, (self.schema,)).fetchall())

    @asynccontextmanager
    async def cuttable(self) -> AsyncIterator[tuple[AuditStore, Cut]]:
        """A store whose backend the test can break mid-way, and the function that breaks it."""
        if self.name == "sqlite":
            path = self.tmp_path / "cuttable.db"
            store: AuditStore = SQLiteAuditStore(str(path), synchronous="FULL" if "FULL" in self.url else "NORMAL")

            async def drop_table() -> None:
                with sqlite3.connect(path) as conn:
                    conn.execute("DROP TABLE audit_events")
                conn.close()

            try:
                yield store, drop_table
            finally:
                await store.close()
            return
        relay = Relay()
        await relay.start()
        store = PostgresAuditStore(pg_url(relay.port, self.schema))
        try:
            yield store, relay.cut
        finally:
            await store.close()
            await relay.cut()


@pytest.fixture(params=["sqlite", "sqlite-full", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each audit store backend (SQLite committing on the loop, and syncing each commit on a thread), in a
    file or schema of this test's own."""
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path}/audit.db", tmp_path)
        return
    if request.param == "sqlite-full":
        yield Backend("sqlite", f"sqlite:///{tmp_path}/audit.db?synchronous=FULL", tmp_path)
        return
    with postgres_schema() as schema:
        yield Backend("postgresql", pg_url(schema=schema), tmp_path, schema)


def entry(phase: Phase, *, minutes: float = 0, tenant: str | None = "acme", **fields: Any) -> AuditEvent:
    """An audit entry ``minutes`` after T0 (its id sorts by that time), with any other field set by keyword."""
    at = T0 + timedelta(minutes=minutes)
    return AuditEvent(
        id=new_event_id(at.timestamp()),
        at=at,
        phase=phase,
        tenant=tenant,
        http_method="POST",
        path="/mcp",
        **fields,
    )


def start(*, minutes: float = 0, tool: str = "read", **fields: Any) -> AuditEvent:
    """The start of a forwarded tools/call."""
    return entry("start", minutes=minutes, rpc_method="tools/call", tool=tool, **fields)


def end(of: AuditEvent, *, status: int = 200, decision: str = "allowed", **fields: Any) -> AuditEvent:
    """The end of the call ``of`` started, a little later."""
    minutes = (of.at - T0).total_seconds() / 60 + 0.001
    return entry("end", minutes=minutes, tenant=of.tenant, start_id=of.id, status=status, decision=decision, **fields)


async def append_all(store: AuditStore, *events: AuditEvent) -> None:
    """Append ``events`` in order, each durably."""
    for event in events:
        await store.append(event, durable=True)


async def ids(store: AuditStore, tenant: str | None = "acme", **filters: Any) -> list[str]:
    """The ids of the calls a query returns, in its order."""
    page = await store.query(AuditQuery(tenant=tenant, limit=1000, **filters))
    return [call["id"] for call in page.calls]


def commits_of(store: AuditStore) -> int:
    """How many commits the store's writer has made."""
    assert isinstance(store, SQLiteAuditStore | PostgresAuditStore)
    return store.commits


class TestAuditStoreConformance:
    """What every ``AuditStore`` backend guarantees, with the very same answers."""

    def test_durable_append_then_query_reads_the_call_back_joined(self, backend: Backend) -> None:
        """A start and its end read back as one complete call: the same keys, values and types on every backend."""
        began = start(
            subject="key:alice",
            credential_id="k1",
            client_id="client-1",
            session="ab" * 16,
            bytes_in=120,
            trace_id="0af7651916cd43dd8448eb211c80319c",
            user_agent="agent/1.0",
        )
        # Given in another zone, read back in UTC.
        began = began._replace(at=T0.astimezone(timezone(timedelta(hours=2))))
        ended = end(began, rpc_error=-32001, tool_error=True, duration_ms=12.5, bytes_in=120, bytes_out=4096)
        expected = {
            "id": began.id,
            "at": "2025-01-02T03:04:05.678901+00:00",
            "tenant": "acme",
            "subject": "key:alice",
            "credential_id": "k1",
            "client_id": "client-1",
            "session": "ab" * 16,
            "rpc_method": "tools/call",
            "tool": "read",
            "http_method": "POST",
            "path": "/mcp",
            "status": 200,
            "rpc_error": -32001,
            "tool_error": True,
            "decision": "allowed",
            "reason": None,
            "duration_ms": 12.5,
            "bytes_in": 120,
            "bytes_out": 4096,
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "user_agent": "agent/1.0",
            "read_tenant": None,
            "outcome": "complete",
        }

        async def body(store: AuditStore) -> None:
            await append_all(store, began, ended)
            page = await store.query(AuditQuery(tenant="acme"))
            assert page.calls == [expected]
            assert [type(v) for v in page.calls[0].values()] == [type(v) for v in expected.values()]
            assert page.next_cursor is None

        backend.run(body)

    def test_start_alone_is_no_outcome_and_local_entries_stand_alone(self, backend: Backend) -> None:
        """A start without an end reads back as no_outcome; an entry the guard answered itself as local."""
        forwarded = start()
        local = entry("local", minutes=1, rpc_method="tools/call", tool="drop", status=403, decision="denied")
        local = local._replace(reason="scope", tool_error=False, duration_ms=0.5)

        async def body(store: AuditStore) -> None:
            await append_all(store, forwarded, local)
            newest, oldest = (await store.query(AuditQuery(tenant="acme"))).calls
            assert (oldest["id"], oldest["outcome"]) == (forwarded.id, "no_outcome")
            assert (oldest["status"], oldest["decision"], oldest["duration_ms"]) == (None, None, None)
            assert (newest["id"], newest["outcome"]) == (local.id, "local")
            assert (newest["status"], newest["decision"], newest["reason"]) == (403, "denied", "scope")
            assert newest["tool_error"] is False
            assert "phase" not in newest
            assert "start_id" not in newest

        backend.run(body)

    def test_filters(self, backend: Backend) -> None:
        """Each filter selects exactly its calls; status and decision are the outcome's, times are half-open."""
        c1 = start(minutes=1, subject="alice", credential_id="k1")
        c2 = start(minutes=2, tool="write", subject="bob", credential_id="k2")
        c3 = entry("local", minutes=3, rpc_method="tools/call", tool="write", subject="bob", status=403)
        c3 = c3._replace(decision="denied", credential_id="k2")
        c4 = entry("local", minutes=4, rpc_method="tools/list", subject="alice", credential_id="k1", status=200)
        c4 = c4._replace(decision="allowed")
        c5 = start(minutes=5)

        async def body(store: AuditStore) -> None:
            await append_all(store, c1, end(c1), c2, end(c2, status=502), c3, c4, c5)
            assert await ids(store) == [c5.id, c4.id, c3.id, c2.id, c1.id]
            assert await ids(store, tool="read") == [c5.id, c1.id]
            assert await ids(store, method="tools/list") == [c4.id]
            assert await ids(store, status=200) == [c4.id, c1.id]
            assert await ids(store, status=502) == [c2.id]
            assert await ids(store, decision="denied") == [c3.id]
            assert await ids(store, decision="allowed") == [c4.id, c2.id, c1.id]
            assert await ids(store, subject="bob") == [c3.id, c2.id]
            assert await ids(store, credential="k1") == [c4.id, c1.id]
            assert await ids(store, since=c2.at) == [c5.id, c4.id, c3.id, c2.id]
            assert await ids(store, until=c2.at) == [c1.id]
            assert await ids(store, since=c2.at, until=c4.at) == [c3.id, c2.id]
            assert await ids(store, tool="write", status=403) == [c3.id]
            assert await ids(store, call_id=c2.id) == [c2.id]
            assert await ids(store, tool="nothing") == []

        backend.run(body)

    def test_queries_are_tenant_scoped(self, backend: Backend) -> None:
        """A tenant's query never returns another tenant's calls, even with a prefix-like name; None is all."""
        acme, globex, prefixed = start(), start(minutes=1, tenant="globex"), start(minutes=2, tenant="acme-b")
        anonymous = entry("local", minutes=3, tenant=None, status=401)

        async def body(store: AuditStore) -> None:
            await append_all(store, acme, globex, prefixed, anonymous)
            assert await ids(store, "acme") == [acme.id]
            assert await ids(store, "globex", call_id=globex.id) == [globex.id]
            assert await ids(store, "acme", call_id=globex.id) == []
            assert await ids(store, "nobody") == []
            assert await ids(store, None) == [anonymous.id, prefixed.id, globex.id, acme.id]

        backend.run(body)

    def test_reads_of_a_tenants_trail_are_in_that_trail_and_nothing_more(self, backend: Backend) -> None:
        """An entry naming the tenant whose trail it read is kept as it is; a tenant's calls are its own and the
        reads of its trail by others (an operator's), found by any filter and paged by cursor like the rest; a read
        of every tenant (*) is in no one tenant's trail, and another tenant's calls never come along."""
        acme, globex, ops = start(), start(minutes=1, tenant="globex"), start(minutes=2, tenant="ops")
        reads = {"subject": "key:operator", "credential_id": "op", "status": 200}
        of_globex = entry("local", minutes=3, tenant="ops", read_tenant="globex", **reads)
        of_all = entry("local", minutes=4, tenant="ops", read_tenant="*", **reads)
        own = entry("local", minutes=5, tenant="globex", read_tenant="globex", subject="key:globex-audit")
        of_acme = entry("local", minutes=6, tenant="ops", read_tenant="acme", **reads)

        async def body(store: AuditStore) -> None:
            await append_all(store, acme, end(acme), globex, end(globex), ops, of_globex, of_all, own, of_acme)
            assert await ids(store, "acme") == [of_acme.id, acme.id]
            assert await ids(store, "globex") == [own.id, of_globex.id, globex.id]
            assert await ids(store, "ops") == [of_acme.id, of_all.id, of_globex.id, ops.id]
            assert await ids(store, None) == [of_acme.id, own.id, of_all.id, of_globex.id, ops.id, globex.id, acme.id]
            assert await ids(store, "globex", subject="key:operator") == [of_globex.id]
            assert await ids(store, "globex", call_id=of_globex.id) == [of_globex.id]
            assert await ids(store, "acme", call_id=of_globex.id) == []
            assert await ids(store, "globex", since=of_globex.at, until=own.at) == [of_globex.id]
            found = (await store.query(AuditQuery(tenant="globex", call_id=of_globex.id))).calls
            shown = [(c["tenant"], c["read_tenant"], c["subject"], c["outcome"]) for c in found]
            assert shown == [("ops", "globex", "key:operator", "local")]
            paged: list[str] = []
            params = {"limit": ["1"]}
            while True:
                page = await store.query(parse_query(params, tenant="globex"))
                paged += [c["id"] for c in page.calls]
                if page.next_cursor is None:
                    break
                params = {"limit": ["1"], "cursor": [page.next_cursor]}
            assert paged == [own.id, of_globex.id, globex.id]

        backend.run(body)

    def test_a_trail_made_before_reads_named_their_tenant_takes_and_answers_entries(self, backend: Backend) -> None:
        """A table made before read_tenant existed gets the column on opening (its rows reading back with none);
        new entries carrying it are kept, read back and shown to the tenant read, and opening again changes
        nothing."""
        old = start()
        old_end = end(old)
        backend.make_earlier_trail(*(tuple(getattr(e, c) for c in EARLIER_COLUMNS) for e in (old, old_end)))
        read = entry("local", minutes=1, tenant="ops", read_tenant="acme", subject="key:operator", status=200)

        async def body(store: AuditStore) -> None:
            await store.append(read, durable=True)
            calls = (await store.query(AuditQuery(tenant="acme"))).calls
            assert [(c["id"], c["read_tenant"], c["outcome"]) for c in calls] == [
                (read.id, "acme", "local"),
                (old.id, None, "complete"),
            ]

        backend.run(body)
        assert list(backend.columns()) == list(COLUMNS)
        assert backend.columns()["read_tenant"] in ("", "text")  # SQLite declares no type
        later = start(minutes=2)

        async def again(store: AuditStore) -> None:
            await store.append(later, durable=True)
            assert await ids(store, "acme") == [later.id, read.id, old.id]

        backend.run(again)
        assert list(backend.columns()) == list(COLUMNS)

    def test_cursor_pages_every_call_once_newest_first_while_appends_continue(self, backend: Backend) -> None:
        """Paging three at a time returns each earlier call exactly once, in order, while new calls keep arriving."""
        earlier = [start(minutes=i) for i in range(10)]

        async def body(store: AuditStore) -> None:
            await append_all(store, *earlier, *(end(e) for e in earlier[::2]))
            paging = True
            arrived = 0

            async def keep_appending() -> None:
                nonlocal arrived
                while paging:
                    await store.append(start(minutes=100 + arrived), durable=True)
                    arrived += 1
                    await asyncio.sleep(0)  # a durable append may complete without yielding: let the pages be read

            appender = asyncio.create_task(keep_appending())
            paged: list[str] = []
            params = {"limit": ["3"]}
            while True:
                page = await store.query(parse_query(params, tenant="acme"))
                paged += [call["id"] for call in page.calls]
                if page.next_cursor is None:
                    break
                params = {"limit": ["3"], "cursor": [page.next_cursor]}
                await asyncio.sleep(0)
            paging = False
            await appender
            expected = [e.id for e in reversed(earlier)]
            assert [call_id for call_id in paged if call_id in set(expected)] == expected
            assert len(set(paged)) == len(paged)
            assert paged == sorted(paged, reverse=True)
            assert arrived > 0

        backend.run(body)

    def test_delete_before_removes_only_older_entries(self, backend: Backend) -> None:
        """Retention deletes every entry older than the cutoff, counts them, and leaves the rest joined."""
        old, new = start(), start(minutes=10)

        async def body(store: AuditStore) -> None:
            await append_all(store, old, end(old), new, end(new))
            assert await store.delete_before(T0 + timedelta(minutes=5)) == 2
            calls = (await store.query(AuditQuery(tenant=None))).calls
            assert [(c["id"], c["outcome"]) for c in calls] == [(new.id, "complete")]
            assert await store.delete_before(T0) == 0

        backend.run(body)

    def test_concurrent_durable_appends_all_land(self, backend: Backend) -> None:
        """200 concurrent durable appends are all committed. Where a commit waits (PostgreSQL's round trip,
        SQLite's sync with FULL) they share commits; SQLite with NORMAL commits each at once, waiting for none."""
        events = [start(minutes=i / 1000) for i in range(200)]
        shared = backend.name == "postgresql" or "FULL" in backend.url

        async def body(store: AuditStore) -> None:
            before = commits_of(store)
            await asyncio.gather(*(store.append(e, durable=True) for e in events))
            made = commits_of(store) - before
            assert 0 < made < len(events) if shared else made == len(events)
            assert sorted(await ids(store)) == sorted(e.id for e in events)

        backend.run(body)

    @pytest.mark.threat("T-STORE-FAIL")
    def test_backend_failure_is_storage_unavailable(self, backend: Backend) -> None:
        """When the backend breaks mid-way, appends, queries and retention fail closed as StorageUnavailable."""

        async def body() -> None:
            async with backend.cuttable() as (store, cut):
                await store.append(start(), durable=True)
                assert len((await store.query(AuditQuery(tenant="acme"))).calls) == 1
                await cut()
                with pytest.raises(StorageUnavailable):
                    await store.append(start(minutes=1), durable=True)
                with pytest.raises(StorageUnavailable):
                    await store.query(AuditQuery(tenant="acme"))
                with pytest.raises(StorageUnavailable):
                    await store.delete_before(T0)

        asyncio.run(body())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_closed_store_is_storage_unavailable(self, backend: Backend) -> None:
        """After close, every operation is StorageUnavailable, and closing again is harmless."""

        async def body() -> None:
            store = open_audit_store(backend.url)
            await store.append(start(), durable=True)
            await store.close()
            await store.close()
            with pytest.raises(StorageUnavailable):
                await store.append(start(minutes=1), durable=True)
            with pytest.raises(StorageUnavailable):
                await store.append(start(minutes=2), durable=False)
            with pytest.raises(StorageUnavailable):
                await store.query(AuditQuery(tenant="acme"))
            with pytest.raises(StorageUnavailable):
                await store.delete_before(T0)

        asyncio.run(body())

    def test_close_commits_what_is_queued(self, backend: Backend) -> None:
        """Entries appended without waiting are committed by close, and a reopened store reads them."""
        events = [start(minutes=i) for i in range(20)]

        async def queue_then_close(store: AuditStore) -> None:
            for event in events:
                await store.append(event, durable=False)

        async def read(store: AuditStore) -> None:
            assert sorted(await ids(store)) == sorted(e.id for e in events)

        backend.run(queue_then_close)
        backend.run(read)


class TestSQLiteCommits:
    """How the SQLite store shares commits: an entry nobody waits for rides along with the next durable one."""

    def test_each_calls_end_rides_with_the_next_calls_start(self, tmp_path: Path) -> None:
        """Calls one after another cost about one commit each, not two: a call's end waits for the next start."""
        calls = [start(minutes=i) for i in range(50)]

        async def body() -> None:
            store = SQLiteAuditStore(str(tmp_path / "audit.db"))
            for call in calls:
                await store.append(call, durable=True)
                await store.append(end(call), durable=False)
            assert store.commits <= len(calls) + 1
            assert sorted(await ids(store)) == sorted(c.id for c in calls)
            await store.close()

        asyncio.run(body())

    def test_a_start_is_committed_without_waiting_for_the_loop(self, tmp_path: Path) -> None:
        """A durable append returns committed before the event loop runs anything else: no call waits on a busy
        loop (or on other calls) between its start being recorded and its being forwarded."""

        async def body() -> None:
            store = SQLiteAuditStore(str(tmp_path / "audit.db"))
            await store.append(start(minutes=1), durable=True)  # the schema and the connection are warm
            ran: list[str] = []
            asyncio.get_running_loop().call_soon(ran.append, "another callback")
            before = store.commits
            await store.append(start(minutes=2), durable=True)
            assert ran == []
            assert store.commits == before + 1
            await asyncio.sleep(0)
            assert ran == ["another callback"]
            await store.close()

        asyncio.run(body())

    def test_an_end_with_nothing_after_it_is_committed_soon(self, tmp_path: Path) -> None:
        """With no further traffic, an entry appended without waiting is committed within a moment anyway."""
        path = tmp_path / "audit.db"
        call = start()

        async def body() -> None:
            store = SQLiteAuditStore(str(path))
            await store.append(call, durable=False)
            await asyncio.sleep(0.3)
            with sqlite3.connect(path) as conn:
                rows = conn.execute("SELECT id FROM audit_events").fetchall()
            conn.close()
            assert rows == [(call.id,)]
            await store.close()

        asyncio.run(body())


class TestPostgres:
    """What only the PostgreSQL store promises: a trail replicas share, and failing closed when the server goes."""

    @pytest.fixture
    def schema(self) -> Iterator[str]:
        """A schema of this test's own."""
        with postgres_schema() as schema:
            yield schema

    def test_replicas_opening_together_share_one_trail(self, schema: str) -> None:
        """Stores opened at once on a fresh schema all start, and each reads what the others wrote."""

        async def body() -> None:
            replicas = await asyncio.gather(*(PostgresAuditStore.open(pg_url(schema=schema)) for _ in range(4)))
            try:
                began = start()
                await replicas[0].append(began, durable=True)
                await replicas[1].append(end(began), durable=True)
                for replica in replicas:
                    calls = (await replica.query(AuditQuery(tenant="acme"))).calls
                    assert [(c["id"], c["outcome"]) for c in calls] == [(began.id, "complete")]
            finally:
                for replica in replicas:
                    await replica.close()

        asyncio.run(body())

    def test_schema_has_native_times_and_the_indexes(self, schema: str) -> None:
        """Opening creates the table with timestamptz times, byte-ordered ids and the tenant and start indexes."""

        async def body() -> None:
            await (await PostgresAuditStore.open(pg_url(schema=schema))).close()

        asyncio.run(body())
        with psycopg.connect(pg_url(schema=schema)) as conn:
            types: dict[str, str] = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = %s AND table_name = 'audit_events'",
                    (schema,),
                ).fetchall()
            )
            collation = conn.execute(
                "SELECT collation_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'audit_events' AND column_name = 'id'",
                (schema,),
            ).fetchone()
            indexes = {
                row[0] for row in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))
            }
        assert types["at"] == "timestamp with time zone"
        assert (types["tool_error"], types["duration_ms"]) == ("boolean", "double precision")
        assert collation == ("C",)
        assert {"audit_by_tenant", "audit_by_start", "audit_by_read_tenant"} <= indexes

    def test_replicas_opening_together_on_an_earlier_table_add_its_column_once(self, schema: str) -> None:
        """Stores opened at once on a table made before read_tenant existed all start, and share one trail."""
        with psycopg.connect(pg_url(schema=schema), autocommit=True) as conn:
            for statement in EARLIER_POSTGRES:
                conn.execute(statement)

        async def body() -> None:
            replicas = await asyncio.gather(*(PostgresAuditStore.open(pg_url(schema=schema)) for _ in range(4)))
            try:
                read = entry("local", tenant="ops", read_tenant="acme", status=200)
                await replicas[0].append(read, durable=True)
                for replica in replicas:
                    calls = (await replica.query(AuditQuery(tenant="acme"))).calls
                    assert [(c["id"], c["read_tenant"]) for c in calls] == [(read.id, "acme")]
            finally:
                for replica in replicas:
                    await replica.close()

        asyncio.run(body())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_unreachable_server_is_storage_unavailable(self) -> None:
        """No server fails at open, or on first use when opened lazily, never quoting the URL's password."""
        require_postgres()
        url = pg_url(free_port(), password="hunter2")

        async def body() -> None:
            with pytest.raises(StorageUnavailable) as caught:
                await PostgresAuditStore.open(url)
            assert "hunter2" not in str(caught.value)
            lazy = open_audit_store(url)
            with pytest.raises(StorageUnavailable):
                await lazy.append(start(), durable=True)
            with pytest.raises(StorageUnavailable):
                await lazy.query(AuditQuery(tenant=None))
            await lazy.close()

        asyncio.run(body())

    def test_store_recovers_when_the_server_returns(self, schema: str) -> None:
        """After an outage the store reconnects by itself: appends fail while it lasts and land once it ends."""

        async def body() -> None:
            relay = Relay()
            await relay.start()
            store = PostgresAuditStore(pg_url(relay.port, schema))
            try:
                await store.append(start(), durable=True)
                await relay.cut()
                with pytest.raises(StorageUnavailable):
                    await store.append(start(minutes=1), durable=True)
                await relay.start()
                later = start(minutes=2)
                await store.append(later, durable=True)
                assert later.id in await ids(store)
            finally:
                await store.close()
                await relay.cut()

        asyncio.run(body())

    @pytest.mark.threat("T-STORE-FAIL")
    def test_hung_server_fails_closed_within_a_bound(self, schema: str) -> None:
        """A server that stops answering makes a durable append StorageUnavailable, not a call that waits forever."""

        async def body() -> None:
            relay = Relay()
            await relay.start()
            store = PostgresAuditStore(pg_url(relay.port, schema), operation_timeout=0.5)
            try:
                await store.append(start(), durable=True)
                await relay.freeze()
                began = time.monotonic()
                with pytest.raises(StorageUnavailable):
                    await store.append(start(minutes=1), durable=True)
                # The operation timeout, then psycopg's own grace for cancelling the query in the server.
                assert time.monotonic() - began < 8
            finally:
                await relay.cut()
                await store.close()

        asyncio.run(body())

    @pytest.mark.threat("T-AUDIT-GAP")
    def test_an_entry_the_server_refuses_fails_alone(self, schema: str) -> None:
        """An entry PostgreSQL refuses (an error code past bigint) fails by itself; the rest of its commit lands."""
        good = [start(minutes=i) for i in range(50)]
        bad = end(good[0], rpc_error=10**30)

        async def body() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                outcomes = await asyncio.gather(
                    *(store.append(e, durable=True) for e in [*good[:25], bad, *good[25:]]), return_exceptions=True
                )
                assert [type(o) for o in outcomes if o is not None] == [StorageUnavailable]
                assert sorted(await ids(store)) == sorted(e.id for e in good)
                later = start(minutes=60)
                await store.append(later, durable=True)
                assert later.id in await ids(store)
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.threat("T-AUDIT-GAP")
    def test_nul_in_a_client_value_is_recorded_replaced(self, schema: str) -> None:
        """A NUL a client put in a path or tool name (PostgreSQL text cannot hold it) is kept as U+FFFD and findable."""
        sneaky = start(tool="read\x00drop")._replace(path="/mcp\x00")

        async def body() -> None:
            store = PostgresAuditStore(pg_url(schema=schema))
            try:
                await store.append(sneaky, durable=True)
                (call,) = (await store.query(AuditQuery(tenant="acme", tool="read\x00drop"))).calls
                assert (call["id"], call["tool"], call["path"]) == (sneaky.id, "read\ufffddrop", "/mcp\ufffd")
            finally:
                await store.close()

        asyncio.run(body())

    def test_store_is_bound_to_one_event_loop(self, schema: str) -> None:
        """A store used from a second event loop refuses plainly instead of waiting on the first loop's connection."""
        store = PostgresAuditStore(pg_url(schema=schema))
        asyncio.run(store.append(start(), durable=False))
        with pytest.raises(RuntimeError, match="event loop"):
            asyncio.run(store.query(AuditQuery(tenant=None)))


class TestOpenAuditStore:
    """Choosing an audit backend from a URL."""

    def test_url_names_the_backend(self, tmp_path: Path) -> None:
        """sqlite:/// opens SQLite (a file or :memory:); postgresql:// and postgres:// open PostgreSQL, lazily."""

        async def body() -> None:
            for url, kind in (
                (f"sqlite:///{tmp_path}/a.db", SQLiteAuditStore),
                ("sqlite:///:memory:", SQLiteAuditStore),
                (f"sqlite:///{tmp_path}/b.db?synchronous=FULL", SQLiteAuditStore),
                ("postgresql://postgres@127.0.0.1:5432/mcpguard_test", PostgresAuditStore),
                ("postgres://postgres@127.0.0.1:5432/mcpguard_test", PostgresAuditStore),
            ):
                store = open_audit_store(url)
                assert isinstance(store, kind)
                await store.close()

        asyncio.run(body())

    @pytest.mark.parametrize(
        "url",
        [
            "",
            "/var/lib/audit.db",
            "ftp://admin:hunter2@example.com/db",
            "sqlite:///",
            "sqlite:///?synchronous=FULL",
            "sqlite:///a.db?synchronous=OFF",
            "postgresql://x:hunter2@h/d?bogus=1",
        ],
    )
    def test_bad_url_is_value_error_without_the_rest_of_it(self, url: str) -> None:
        """An unknown scheme or a malformed URL is a ValueError that never repeats a password."""
        with pytest.raises(ValueError, match="URL") as caught:
            open_audit_store(url)
        assert "hunter2" not in str(caught.value)
