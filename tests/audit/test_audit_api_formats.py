"""The audit API's export formats (NDJSON, CSV) and its public OpenAPI document, over a real socket."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from starlette.types import Message, Receive, Scope, Send

from mcpguard import GuardConfig, MCPGuard, open_store
from mcpguard.audit import SQLiteAuditStore
from mcpguard.audit.api import (
    CALL_FIELDS,
    CSV,
    EXPORT_CAP,
    JSON,
    NDJSON,
    TOOL_CALLS_PATH,
    AuditAPI,
    csv_cell,
    media_type_for,
)
from mcpguard.audit.events import AuditEvent
from mcpguard.audit.openapi import OPENAPI_PATH, openapi_document
from mcpguard.audit.query import FILTERS, TENANT_PARAMETER, AuditPage, AuditQuery, encode_cursor
from mcpguard.keys import parse_key
from mcpguard.metadata import PublicRoutes
from mcpguard.principal import CredentialKind, Principal
from mcpguard.request_state import SCOPE_KEY, RequestState
from mcpguard.scopes import AUDIT, ScopePolicy
from tests.conftest import cheap_keyring, free_port, make_keys, serve
from tests.test_audit import ToolApp, tools
from tests.test_guard import rpc

FORMULAS = ("=1+1", "+SUM(A1)", "-2+3", "@SUM(A1)", "\t=1", "\r=1")
INITECH_CALLS = 23


@dataclass
class Guarded:
    url: str
    keys: dict[str, str]
    operator: str

    def get(
        self, label: str | None, query: str = "", *, accept: str | None = None, path: str = TOOL_CALLS_PATH
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[label]}"} if label else {}
        if accept is not None:
            headers["Accept"] = accept
        return httpx.get(self.url + path + query, headers=headers)

    def call(self, label: str, tool: str) -> httpx.Response:
        body = rpc("tools/call", {"name": tool, "arguments": {}})
        return httpx.post(self.url + "/mcp", json=body, headers={"Authorization": f"Bearer {self.keys[label]}"})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    database = tmp_path_factory.mktemp("audit-formats") / "audit.db"
    store = open_store("memory://")

    keys = make_keys(
        store,
        {
            "acme": ("acme", ["mcp:read"]),
            "acme-audit": ("acme", ["mcp:audit"]),
            "globex": ("globex", ["mcp:admin"]),
            "initech": ("initech", ["mcp:read"]),
            "initech-audit": ("initech", ["mcp:audit"]),
            "operator": ("ops", ["mcp:audit"]),
        },
    )
    operator, _ = parse_key(keys["operator"])
    audit = SQLiteAuditStore(str(database))
    port = free_port()
    config = GuardConfig(public_url=f"http://127.0.0.1:{port}", operator_credentials=(operator,))
    guard = MCPGuard(
        ToolApp(database),
        config,
        keys=cheap_keyring(store),
        tool_lister=tools,
        audit=audit,
        rate_limits=None,
    )
    with serve(guard, port) as url:
        g = Guarded(url, keys, operator)
        for _ in range(INITECH_CALLS):
            assert g.call("initech", "read_tool").status_code == 200
        for name in FORMULAS:
            g.call("acme", name)
        g.call("acme", "read_tool")
        g.call("globex", "read_tool")
        yield g


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def csv_rows(response: httpx.Response) -> list[list[str]]:
    assert response.status_code == 200, response.text
    return list(csv.reader(io.StringIO(response.text, newline="")))


def json_ids(g: Guarded, label: str, query: str) -> list[str]:
    response = g.get(label, query)
    assert response.status_code == 200, response.text
    return [c["id"] for c in response.json()["calls"]]


def test_ndjson_streams_every_page(guarded: Guarded) -> None:
    """With a page size of 2, NDJSON holds every matching call once, newest first, as one object a line."""
    response = guarded.get("initech-audit", "?method=tools/call&limit=2", accept=NDJSON)
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    lines = ndjson(response)
    assert len(lines) == INITECH_CALLS
    assert [c["id"] for c in lines] == json_ids(guarded, "initech-audit", "?method=tools/call&limit=1000")
    assert all(set(c) == set(CALL_FIELDS) for c in lines)


def test_csv_has_a_fixed_header_and_every_call(guarded: Guarded) -> None:
    """CSV starts with the call fields as its header, then one row per matching call across pages."""
    response = guarded.get("initech-audit", "?method=tools/call&limit=3", accept=CSV)
    assert response.headers["content-type"] == "text/csv; charset=utf-8; header=present"
    assert response.headers["content-disposition"] == 'attachment; filename="mcp-tool-calls.csv"'
    assert response.text.endswith("\r\n")
    header, *rows = csv_rows(response)
    assert header == list(CALL_FIELDS)
    assert len(rows) == INITECH_CALLS
    as_dicts = [dict(zip(header, row, strict=True)) for row in rows]
    assert [r["id"] for r in as_dicts] == json_ids(guarded, "initech-audit", "?method=tools/call&limit=1000")
    assert {r["tenant"] for r in as_dicts} == {"initech"}
    assert {r["status"] for r in as_dicts} == {"200"}
    assert {r["tool_error"] for r in as_dicts} == {"false"}


@pytest.mark.threat("T-AUDIT-CSV-FORMULA")
def test_csv_cells_that_would_run_as_formulas_get_an_apostrophe(guarded: Guarded) -> None:
    """Tool names starting with = + - @ tab or CR come out with a leading apostrophe; numbers stay numbers."""
    header, *rows = csv_rows(guarded.get("acme-audit", "?method=tools/call", accept=CSV))
    by_field = [dict(zip(header, row, strict=True)) for row in rows]
    tools_seen = {r["tool"] for r in by_field}
    assert {"'" + name for name in FORMULAS} <= tools_seen
    assert not set(FORMULAS) & tools_seen
    assert "read_tool" in tools_seen
    refused = next(r for r in by_field if r["tool"] == "'=1+1")
    assert refused["status"] == "403"
    assert refused["rpc_error"].startswith("-")


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        *((f, "'" + f) for f in FORMULAS),
        ("read_tool", "read_tool"),
        ("", ""),
        (None, ""),
        (True, "true"),
        (False, "false"),
        (-32003, "-32003"),
        (1.5, "1.5"),
    ],
)
def test_csv_cell(value: Any, cell: str) -> None:
    """Each value becomes its cell: text that would start a formula is prefixed, everything else as is."""
    assert csv_cell(value) == cell


@pytest.mark.threat("T-AUDIT-CROSS-TENANT")
@pytest.mark.parametrize("accept", [JSON, NDJSON, CSV])
def test_every_format_is_scoped_to_the_tenant(guarded: Guarded, accept: str) -> None:
    """In every format a tenant's reviewer gets only its own calls and the reads of its trail, and tenant= still
    needs the operator."""

    def tenants(label: str, query: str) -> set[str]:
        """The tenant whose trail each call is in: the one it read, for a read of the trail, else its own."""
        response = guarded.get(label, query, accept=accept)
        assert response.status_code == 200, response.text
        if accept == NDJSON:
            return {c["read_tenant"] or c["tenant"] for c in ndjson(response)}
        if accept == CSV:
            header, *rows = csv_rows(response)
            return {row[header.index("read_tenant")] or row[header.index("tenant")] for row in rows}
        return {c["read_tenant"] or c["tenant"] for c in response.json()["calls"]}

    assert tenants("acme-audit", "?limit=5") == {"acme"}
    assert tenants("acme-audit", "?subject=key:globex") == set()
    assert tenants("operator", "?tenant=globex&limit=5") == {"globex"}
    assert guarded.get("acme-audit", "?tenant=globex", accept=accept).status_code == 403


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", JSON),
        ("*/*", JSON),
        ("application/json", JSON),
        (NDJSON, NDJSON),
        (CSV, CSV),
        ("TEXT/CSV", CSV),
        ("text/*", CSV),
        ("application/*", JSON),
        ("text/csv, */*", CSV),
        ("text/csv;q=0.5, application/x-ndjson", NDJSON),
        ("application/json;q=0.1, text/csv", CSV),
        ("text/csv;q=0", JSON),
        ("text/csv;q=oops", CSV),
        ("image/png", JSON),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", JSON),
    ],
)
def test_accept_chooses_the_format(accept: str, chosen: str) -> None:
    """The client's best-rated offered type wins, an exact name beats a wildcard, and doubt means JSON."""
    assert media_type_for(accept) == chosen


@pytest.mark.parametrize("accept", [None, "*/*", "image/png", "application/json"])
def test_json_page_for_anything_else(guarded: Guarded, accept: str | None) -> None:
    """Without an Accept for an export format the answer is the usual JSON page, marked as varying by Accept."""
    response = guarded.get("acme-audit", "?limit=2", accept=accept)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["vary"] == "Accept"
    assert set(response.json()) == {"calls", "next_cursor"}


def test_bad_filters_in_an_export_are_a_json_400(guarded: Guarded) -> None:
    """Filters are checked before an export starts, so a bad one is an ordinary JSON error."""
    response = guarded.get("acme-audit", "?limit=0&colour=red", accept=CSV)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert "colour" in response.json()["error_description"]


def test_head_of_an_export_has_headers_only(guarded: Guarded) -> None:
    """HEAD answers an export's headers without reading the trail page by page."""
    response = httpx.head(
        guarded.url + TOOL_CALLS_PATH,
        headers={"Authorization": f"Bearer {guarded.keys['acme-audit']}", "Accept": CSV},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert response.content == b""


@dataclass
class ListStore:
    """An AuditStore over calls held newest first, counting the queries it answers."""

    calls: list[dict[str, Any]]
    queries: list[AuditQuery] = field(default_factory=list)

    async def append(self, event: AuditEvent, *, durable: bool) -> None:
        raise AssertionError("the API never writes")

    async def query(self, q: AuditQuery) -> AuditPage:
        self.queries.append(q)
        # A real store answers from another thread; this lets other tasks run meanwhile, as it would.
        await asyncio.sleep(0)
        matching = [c for c in self.calls if q.before_id is None or c["id"] < q.before_id]
        page = matching[: q.limit]
        return AuditPage(page, encode_cursor(page[-1]["id"]) if len(matching) > q.limit and page else None)

    async def delete_before(self, cutoff: datetime) -> int:
        return 0

    async def close(self) -> None:
        return None


def synthetic_calls(count: int) -> list[dict[str, Any]]:
    """``count`` calls of tenant acme, newest first, with ids that sort like the real ones."""
    return [
        {**dict.fromkeys(CALL_FIELDS), "id": f"{i:026d}", "tenant": "acme", "outcome": "local"}
        for i in range(count, 0, -1)
    ]


def run_api(
    api: AuditAPI, query: str, accept: str, *, disconnect: bool = False
) -> tuple[dict[bytes, bytes], list[Message]]:
    """One GET through ``api`` alone, as the guard's layers would hand it on; the headers and body messages."""
    principal = Principal(
        tenant="acme",
        subject="key:r",
        credential_id="r",
        client_id="r",
        scopes=frozenset({AUDIT}),
        kind=CredentialKind.KEY,
    )
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": TOOL_CALLS_PATH,
        "query_string": query.encode(),
        "headers": [(b"accept", accept.encode())],
        SCOPE_KEY: RequestState(principal=principal),
    }
    sent: list[Message] = []
    received = 0

    async def receive() -> Message:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the API answers its own path")

    asyncio.run(api(scope, receive, send))
    assert sent[0]["type"] == "http.response.start"
    return dict(sent[0]["headers"]), sent[1:]


def api_over(store: ListStore, *, export_cap: int = EXPORT_CAP) -> AuditAPI:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the API answers its own path")

    return AuditAPI(app, store, policy=ScopePolicy(), operators=frozenset(), export_cap=export_cap)


def test_export_sends_each_page_as_it_is_read() -> None:
    """One body message per page read, the last one closing the stream: nothing is gathered first."""
    store = ListStore(synthetic_calls(7))
    _, bodies = run_api(api_over(store), "limit=2", NDJSON)
    assert len(store.queries) == 4
    assert [m.get("more_body", False) for m in bodies] == [True, True, True, False]
    assert [len(m["body"].splitlines()) for m in bodies] == [2, 2, 2, 1]


def test_export_stops_at_the_cap_and_says_where_to_go_on() -> None:
    """Past the cap the export ends with the cursor to continue from; following it yields every call once."""
    calls = synthetic_calls(12)
    store = ListStore(calls)
    api = api_over(store, export_cap=5)
    seen: list[str] = []
    query = "limit=2"
    continuations = 0
    while True:
        _, bodies = run_api(api, query, NDJSON)
        lines = [json.loads(line) for m in bodies for line in m["body"].splitlines()]
        assert all(q.limit <= 2 for q in store.queries)
        if "next_cursor" in lines[-1]:
            continuations += 1
            seen += [c["id"] for c in lines[:-1]]
            assert len(lines) - 1 == 5
            query = f"limit=2&cursor={lines[-1]['next_cursor']}"
        else:
            seen += [c["id"] for c in lines]
            break
    assert continuations == 2
    assert seen == [c["id"] for c in calls]


def test_csv_export_cut_short_ends_with_a_marked_row() -> None:
    """A CSV export past the cap ends with a row whose first cell starts with # and carries the cursor."""
    _, bodies = run_api(api_over(ListStore(synthetic_calls(4)), export_cap=3), "limit=2", CSV)
    header, *rows = list(csv.reader(io.StringIO(b"".join(m["body"] for m in bodies).decode(), newline="")))
    assert header == list(CALL_FIELDS)
    assert len(rows) == 4
    assert rows[-1][0].startswith("# export cut short; continue with cursor=")
    assert all(len(row) == len(CALL_FIELDS) for row in rows)


def test_export_stops_reading_when_the_client_leaves() -> None:
    """Once the client has gone the export reads no further pages."""
    store = ListStore(synthetic_calls(50))
    run_api(api_over(store), "limit=1", NDJSON, disconnect=True)
    assert len(store.queries) <= 3


def test_openapi_document_is_public_and_valid(guarded: Guarded) -> None:
    """Anyone may fetch the OpenAPI 3.1 document; it validates and names the guard's public origin."""
    response = guarded.get(None, path=OPENAPI_PATH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["access-control-allow-origin"] == "*"
    document = response.json()
    validate(document, cls=OpenAPIV31SpecValidator)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": guarded.url}]
    assert httpx.post(guarded.url + OPENAPI_PATH).status_code == 405


def test_openapi_document_holds_nothing_secret(guarded: Guarded) -> None:
    """No key, operator credential id or tenant of the running guard appears in the document."""
    text = guarded.get(None, path=OPENAPI_PATH).text
    for secret in (*guarded.keys.values(), guarded.operator, "globex", "initech"):
        assert secret not in text


def test_openapi_document_fits_chatgpt_actions() -> None:
    """Operation ids are unique, bearer auth asks for mcp:audit, descriptions fit ChatGPT Actions' limits."""
    document = openapi_document(GuardConfig(public_url="https://guard.example", api_key_header="X-MCP-Key"))
    validate(document, cls=OpenAPIV31SpecValidator)
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert sorted(op["operationId"] for op in operations) == ["getToolCall", "listToolCalls"]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    assert document["components"]["securitySchemes"]["apiKeyHeader"]["name"] == "X-MCP-Key"
    assert {"bearerAuth": [AUDIT]} in document["security"]
    for op in operations:
        assert len(op["description"]) <= 300
        assert len(op["summary"]) <= 300
        for parameter in parameters_of(document, op):
            assert parameter["schema"]
            assert 0 < len(parameter["description"]) <= 700


def parameters_of(document: dict[str, Any], operation: dict[str, Any]) -> list[dict[str, Any]]:
    """The operation's parameters with every $ref resolved."""
    resolved = []
    for parameter in operation["parameters"]:
        if "$ref" in parameter:
            parameter = document["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        resolved.append(parameter)
    return resolved


def test_openapi_document_describes_formats_and_errors() -> None:
    """The list answers JSON, NDJSON and CSV; both operations document their errors with the JSON error body."""
    document = openapi_document(GuardConfig())
    listing = document["paths"][TOOL_CALLS_PATH]["get"]
    single = document["paths"][TOOL_CALLS_PATH + "/{call_id}"]["get"]
    assert set(listing["responses"]["200"]["content"]) == {JSON, NDJSON, CSV}
    assert set(listing["responses"]) == {"200", "400", "401", "403", "429", "503"}
    assert set(single["responses"]) == {"200", "400", "401", "403", "404", "429", "503"}
    responses = document["components"]["responses"]
    for name in ("BadRequest", "Unauthorized", "Forbidden", "NotFound", "TooManyRequests", "Unavailable"):
        assert responses[name]["content"][JSON]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert set(document["components"]["schemas"]["Call"]["properties"]) == set(CALL_FIELDS)


def test_openapi_parameters_are_exactly_those_the_api_takes(guarded: Guarded) -> None:
    """The documented query parameters are the API's filters and tenant, each accepted live; others are a 400."""
    document = guarded.get(None, path=OPENAPI_PATH).json()
    assert set(document["paths"]) == {TOOL_CALLS_PATH, TOOL_CALLS_PATH + "/{call_id}"}
    listing = parameters_of(document, document["paths"][TOOL_CALLS_PATH]["get"])
    assert [p["name"] for p in listing] == [*FILTERS, TENANT_PARAMETER]
    cursor = guarded.get("operator", "?limit=1").json()["next_cursor"]
    for parameter in listing:
        value = cursor if parameter["name"] == "cursor" else parameter["example"]
        response = guarded.get("operator", "?" + str(httpx.QueryParams({parameter["name"]: value})))
        assert response.status_code == 200, (parameter["name"], response.text)
    assert guarded.get("operator", "?colour=red").status_code == 400
    single = parameters_of(document, document["paths"][TOOL_CALLS_PATH + "/{call_id}"]["get"])
    assert [(p["name"], p["in"]) for p in single] == [("call_id", "path"), (TENANT_PARAMETER, "query")]


def test_answers_match_the_documented_schemas(guarded: Guarded) -> None:
    """A JSON page, a single call, each NDJSON line and an error body validate against the document."""
    document = guarded.get(None, path=OPENAPI_PATH).json()

    def check(instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(instance)

    page = guarded.get("operator", "?limit=50").json()
    check(page, "CallPage")
    call_id = page["calls"][0]["id"]
    check(guarded.get("operator", path=f"{TOOL_CALLS_PATH}/{call_id}").json(), "Call")
    for line in ndjson(guarded.get("operator", "?limit=50", accept=NDJSON)):
        check(line, "Call")
    for response in (
        guarded.get("acme-audit", "?status=abc"),
        guarded.get(None),
        guarded.get("acme"),
        guarded.get("acme-audit", path=f"{TOOL_CALLS_PATH}/{call_id}x"),
    ):
        assert response.status_code in (400, 401, 403, 404)
        check(response.json(), "Error")


def test_openapi_route_can_be_left_out() -> None:
    """With openapi off, the document's path is not answered publicly but goes on to be guarded."""
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is answered publicly")

    routes = PublicRoutes(app, GuardConfig(), openapi=False)
    scope: Scope = {"type": "http", "method": "GET", "path": OPENAPI_PATH, "headers": [], SCOPE_KEY: RequestState()}
    asyncio.run(routes(scope, receive, send))
    assert reached == [OPENAPI_PATH]
