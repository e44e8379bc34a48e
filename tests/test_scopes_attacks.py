"""Scopes, the tools/list filter, the annotation catalog and tenant pinning under attack, over real sockets.

A scripted MCP server sits behind the guard on 127.0.0.1; the guard fetches its catalog from that server
in process, exactly as it does in production, and every probe is a real HTTP request to the guard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from mcpguard import GuardConfig, MCPGuard, open_store
from sidecar.demo_server import http_app
from tests.conftest import answer_lifespan, cheap_keyring, free_port, make_keys, read_body, serve

Tool = dict[str, Any]
Chunks = tuple[int, bytes, list[bytes]]  # status, content type, body chunks
LIST_CHANGED = "notifications/tools/list_changed"
LABELS = {"read": ("acme", ["mcp:read"]), "write": ("acme", ["mcp:write"]), "admin": ("acme", ["mcp:admin"])}


def tool(name: str, **annotations: Any) -> Tool:
    return {"name": name, "inputSchema": {"type": "object"}, "annotations": annotations}


def R(name: str) -> Tool:
    return tool(name, readOnlyHint=True)


def D(name: str) -> Tool:
    return tool(name, readOnlyHint=False, destructiveHint=True)


def W(name: str) -> Tool:
    return tool(name, readOnlyHint=False, destructiveHint=False)


def answer(rid: Any, result: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode()


def sse(*events: bytes) -> bytes:
    return b"".join(b"event: message\r\ndata: " + event + b"\r\n\r\n" for event in events)


@dataclass
class Upstream:
    """An MCP server with scripted tool pages, answers and GET stream; it counts the listings the guard makes
    itself (they carry no credential)."""

    pages: list[list[Tool]]
    scripts: dict[str, Callable[[dict[str, Any]], Chunks]] = field(default_factory=dict)
    stream: list[bytes] = field(default_factory=list)
    listings: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)

    def page(self, params: dict[str, Any]) -> dict[str, Any]:
        index = int(params.get("cursor") or 0)
        result: dict[str, Any] = {"tools": self.pages[index]}
        if index + 1 < len(self.pages):
            result["nextCursor"] = str(index + 1)
        return result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        headers = dict(scope["headers"])
        body = await read_body(receive)
        doc = json.loads(body) if body else {}
        method, rid, params = doc.get("method"), doc.get("id"), doc.get("params") or {}
        script = self.scripts.get(headers.get(b"x-test-raw", b"").decode())
        if scope["method"] == "GET":
            status, ctype, chunks = 200, b"text/event-stream", self.stream
        elif script is not None:
            status, ctype, chunks = script(doc)
        elif rid is None:
            status, ctype, chunks = 202, b"application/json", [b""]
        else:
            if method == "tools/list" and b"authorization" not in headers:
                self.listings += 1
            if method == "tools/call":
                self.calls.append(doc)
            result: Any = {}
            if method == "tools/list":
                result = self.page(params)
            elif method == "tools/call":
                result = {"content": [{"type": "text", "text": json.dumps(params.get("arguments"))}]}
            status, ctype, chunks = 200, b"application/json", [answer(rid, result)]
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})


@dataclass
class Guarded:
    url: str
    keys: dict[str, str]
    upstream: Any

    def rpc(
        self, label: str, method: str, params: Any = None, *, rid: Any = 1, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if rid is not None:
            message["id"] = rid
        if params is not None:
            message["params"] = params
        sent = {"Authorization": f"Bearer {self.keys[label]}", "Accept": "application/json, text/event-stream"}
        return httpx.post(self.url + "/mcp", json=message, headers=sent | (headers or {}), timeout=10)

    def call(self, label: str, name: Any, arguments: Any = None, **headers: str) -> httpx.Response:
        params = {"name": name, "arguments": arguments if arguments is not None else {}}
        return self.rpc(label, "tools/call", params, headers=headers)

    def listed(self, label: str) -> list[str]:
        return [t["name"] for t in self.rpc(label, "tools/list").json()["result"]["tools"]]


@contextmanager
def guarded(upstream: Any, **config: Any) -> Iterator[Guarded]:
    store = open_store("memory://")
    keys = make_keys(store, LABELS | config.pop("labels", {}))
    port = free_port()
    guard = MCPGuard(
        upstream,
        GuardConfig(public_url=f"http://127.0.0.1:{port}", **config),
        keys=cheap_keyring(store),
        rate_limits=None,
    )
    with serve(guard, port) as url:
        yield Guarded(url, keys, upstream)


# --- the catalog: what the server declares, and only that, decides a tools/call -----------------------------


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    "pages",
    [[[R("dup"), D("dup")]], [[D("dup"), R("dup")]], [[D("dup")], [R("dup")]]],
    ids=["read-then-destructive", "destructive-then-read", "across-pages"],
)
def test_tool_listed_twice_needs_the_stricter_scope(pages: list[list[Tool]]) -> None:
    """A name the server lists twice, once destructive and once read-only, is refused to a write key
    whichever entry comes last: the guard cannot know which one the server runs."""
    with guarded(Upstream(pages)) as g:
        assert g.call("write", "dup").status_code == 403
        assert g.upstream.calls == []


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    "annotations",
    [
        {"readOnlyHint": "true"},
        {"readOnlyHint": 1},
        {"destructiveHint": "false"},
        {"destructiveHint": 0},
        {"destructiveHint": None},
        {"readOnlyHint": [True]},
        "readOnlyHint",
        [{"readOnlyHint": True}],
    ],
)
def test_hints_of_the_wrong_json_type_count_as_absent(annotations: Any) -> None:
    """A hint that is not a JSON boolean (or annotations that are not an object) leaves the tool admin-only,
    in the call decision and in the listing alike."""
    odd = {"name": "odd", "inputSchema": {"type": "object"}, "annotations": annotations}
    with guarded(Upstream([[R("read_tool"), odd]])) as g:
        assert g.listed("write") == ["read_tool"]
        assert g.call("write", "odd").status_code == 403
        assert g.upstream.calls == []


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    "name",
    [
        "DROP_TOOL",
        "Drop_tool",
        "drop_tool ",
        " drop_tool",
        "drop_tool\u200b",
        "\uff44\uff52\uff4f\uff50_tool",
        "drop_tool\x00",
        "drop\u2010tool",
    ],
)
def test_spelling_variants_of_a_tool_are_unlisted_and_need_admin(name: str) -> None:
    """Case, width, whitespace and invisible-character variants of a listed name are unlisted tools: a write
    key is refused and nothing is forwarded."""
    with guarded(Upstream([[R("read_tool"), D("drop_tool")]])) as g:
        assert g.call("write", name).status_code == 403
        assert g.upstream.calls == []


@pytest.mark.threat("T-PARSE-DIFF")
@pytest.mark.parametrize("params", [{}, {"name": None}, {"name": 1}, {"name": ["read_tool"]}, {"name": {"n": 1}}])
def test_tools_call_without_a_string_name_is_refused(params: dict[str, Any]) -> None:
    """A tools/call whose params.name is missing or not a string is refused before any decision."""
    with guarded(Upstream([[R("read_tool")]])) as g:
        assert g.rpc("admin", "tools/call", params | {"arguments": {}}).status_code == 400
        assert g.upstream.calls == []


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    ("method", "label"),
    [("tools/delete", "write"), ("x/custom", "write"), ("Tools/Call", "write"), ("tools/call ", "write")],
)
def test_unknown_methods_need_admin(method: str, label: str) -> None:
    """A method the guard does not know (or a variant spelling of tools/call) needs admin."""
    with guarded(Upstream([[R("read_tool")]])) as g:
        assert g.rpc(label, method, {"name": "read_tool"}).status_code == 403


@pytest.mark.threat("T-PARSE-DIFF")
@pytest.mark.parametrize(("header", "body"), [("=?base64?ZHJvcF90b29s?=", "read_tool"), ("read_tool", "drop_tool")])
def test_stateless_routing_headers_must_name_the_called_tool(header: str, body: str) -> None:
    """In the 2026-07-28 era, an Mcp-Name header (plain or base64) naming another tool than the body is refused."""
    with guarded(Upstream([[R("read_tool"), D("drop_tool")]])) as g:
        modern = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": header}
        assert g.call("admin", body, **modern).status_code == 400
        assert g.upstream.calls == []


# --- cache invalidation: only the server's own notification may make the guard re-list ---------------------


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("vector", ["request-id", "tool-result", "client-notification"])
def test_client_cannot_make_the_guard_relist_at_will(vector: str) -> None:
    """Nothing a read key sends makes the guard fetch tools/list again: not a request whose id spells
    notifications/tools/list_changed, not a tool result echoing it, not the notification itself (a client
    that could would make every call cost a full upstream listing, past the refresh throttle)."""
    with guarded(Upstream([[R("read_tool"), R("echo")]])) as g:
        assert g.call("read", "read_tool").status_code == 200
        for _ in range(4):
            if vector == "request-id":
                g.rpc("read", "resources/list", rid=LIST_CHANGED)
            elif vector == "tool-result":
                assert g.call("read", "echo", {"text": LIST_CHANGED}).status_code == 200
            else:
                g.rpc("read", LIST_CHANGED, rid=None)
            assert g.call("read", "read_tool").status_code == 200
        assert g.upstream.listings == 1


NOTICE = json.dumps({"jsonrpc": "2.0", "method": LIST_CHANGED}).encode()


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("shape", ["whole", "split-across-chunks", "escaped-slashes", "in-tools-list-stream"])
def test_servers_list_changed_always_reaches_the_catalog(shape: str) -> None:
    """When the server turns a read-only tool destructive and says so with notifications/tools/list_changed,
    however its SSE bytes are cut or its JSON is escaped, a read key can no longer call the tool."""
    upstream = Upstream([[R("flip"), W("mutate")]])

    def mutate(doc: dict[str, Any]) -> Chunks:
        upstream.pages[0][0] = D("flip")
        result = answer(doc["id"], upstream.page({}) if doc["method"] == "tools/list" else {"content": []})
        event = sse(NOTICE)
        if shape == "escaped-slashes":
            event = event.replace(b"/", b"\\/")
        cut = event.index(b"list_changed")
        chunks = [event[:cut], event[cut:] + sse(result)] if shape == "split-across-chunks" else [event + sse(result)]
        return 200, b"text/event-stream", chunks

    upstream.scripts["mutate"] = mutate
    with guarded(upstream) as g:
        assert g.call("read", "flip").status_code == 200
        if shape == "in-tools-list-stream":
            assert g.rpc("write", "tools/list", headers={"x-test-raw": "mutate"}).status_code == 200
        else:
            assert g.call("write", "mutate", **{"x-test-raw": "mutate"}).status_code == 200
        assert g.call("read", "flip").status_code == 403


# --- the tools/list filter, JSON and SSE ----------------------------------------------------------------


LISTING = answer(1, {"tools": [R("read_tool"), D("drop_tool")]})
HALF = LISTING.index(b', {"name": "drop_tool"') + 1


def listing_event(newline: bytes, head: bytes = b"", data: bytes = b"data: ") -> bytes:
    return head + data + LISTING + newline + newline


SSE_SHAPES: dict[str, list[bytes]] = {
    "lf": [listing_event(b"\n")],
    "cr": [listing_event(b"\r")],
    "crlf-byte-by-byte": [bytes([b]) for b in listing_event(b"\r\n")],
    "no-space-after-colon": [listing_event(b"\n", data=b"data:")],
    "data-over-several-lines": [b"data: " + LISTING[:HALF] + b"\ndata: " + LISTING[HALF:] + b"\n\n"],
    "id-retry-comment-lines": [listing_event(b"\n", head=b": keep-alive\nid: 42\nretry: 500\nevent: message\n")],
    "between-notices": [sse(NOTICE.replace(b"tools/list_changed", b"progress")), listing_event(b"\n"), sse(b"{}")],
    "byte-order-mark": [listing_event(b"\n", head="\ufeff".encode())],
}


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize("shape", list(SSE_SHAPES))
def test_sse_tools_list_is_filtered_however_framed(shape: str) -> None:
    """A read key never sees the destructive tool in an SSE tools/list answer, whatever the line endings,
    chunking, field spelling, extra fields or events around it; a leading BOM included, which WHATWG
    EventSource and eventsource-parser (the TypeScript SDK's) strip before reading the event."""
    upstream = Upstream([[R("read_tool"), D("drop_tool")]])
    upstream.scripts["sse"] = lambda doc: (200, b"text/event-stream", SSE_SHAPES[shape])
    with guarded(upstream) as g:
        response = g.rpc("read", "tools/list", headers={"x-test-raw": "sse"})
        assert response.status_code == 200
        assert b"drop_tool" not in response.content


def test_filtered_sse_event_keeps_its_id_and_retry() -> None:
    """Filtering an SSE tools/list answer keeps the event's id (resumption) and retry fields."""
    upstream = Upstream([[R("read_tool")]])
    upstream.scripts["sse"] = lambda doc: (200, b"text/event-stream", SSE_SHAPES["id-retry-comment-lines"])
    with guarded(upstream) as g:
        response = g.rpc("read", "tools/list", headers={"x-test-raw": "sse"})
        assert b"drop_tool" not in response.content
        assert b"id: 42" in response.content
        assert b"retry: 500" in response.content


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    ("status", "ctype", "body"),
    [
        (200, b"application/json", LISTING.replace(b'"id": 1', b'"id": "1"')),
        (200, b"text/event-stream", sse(LISTING.replace(b'"id": 1', b'"id": "1"'))),
        (201, b"application/json", LISTING),
        (200, b"Application/JSON; charset=utf-8", LISTING),
    ],
    ids=["string-id-json", "string-id-sse", "status-201", "content-type-case"],
)
def test_tools_list_answer_shapes_clients_accept_are_filtered(status: int, ctype: bytes, body: bytes) -> None:
    """Answers the MCP SDKs accept as the reply to tools/list id 1 (id "1", which they correlate with 1; a
    2xx other than 200) reach a read key filtered."""
    upstream = Upstream([[R("read_tool"), D("drop_tool")]])
    upstream.scripts["odd"] = lambda doc: (status, ctype, [body])
    with guarded(upstream) as g:
        response = g.rpc("read", "tools/list", headers={"x-test-raw": "odd"})
        assert b"drop_tool" not in response.content


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_later_pages_of_tools_list_are_filtered_and_known() -> None:
    """Every page a client asks for with nextCursor is filtered, and the catalog knows tools on later pages."""
    with guarded(Upstream([[R("read_tool")], [D("drop_tool"), R("late_read")]])) as g:
        first = g.rpc("read", "tools/list").json()["result"]
        assert first["nextCursor"] == "1"
        later = g.rpc("read", "tools/list", {"cursor": "1"}).json()["result"]
        assert [t["name"] for t in later["tools"]] == ["late_read"]
        assert g.call("read", "late_read").status_code == 200
        assert g.call("write", "drop_tool").status_code == 403


def schema(**extra: Any) -> Tool:
    return {"name": "t", "annotations": {"readOnlyHint": True}, "inputSchema": {"type": "object", **extra}}


TENANT = {"tenant_id": {"type": "string"}}
SCHEMAS = {
    "top-level": schema(properties=TENANT, required=["tenant_id"]),
    "ref-to-defs": schema(
        **{"$ref": "#/$defs/Args", "$defs": {"Args": {"properties": TENANT, "required": ["tenant_id"]}}}
    ),
    "allOf": schema(allOf=[{"properties": TENANT, "required": ["tenant_id"]}]),
    "oneOf": schema(oneOf=[{"properties": TENANT, "required": ["tenant_id"]}, {"properties": {"x": {}}}]),
    "dependentRequired": schema(properties={"x": {}}, dependentRequired={"x": ["tenant_id"]}),
    "if-then": schema(properties={"x": {}}, then={"required": ["tenant_id"]}, **{"if": {"required": ["x"]}}),
}


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize("shape", list(SCHEMAS))
def test_pinned_argument_hidden_wherever_the_schema_names_it(shape: str) -> None:
    """tools/list shows no trace of the pinned argument, wherever in the JSON Schema the server names it."""
    with guarded(Upstream([[SCHEMAS[shape]]]), tenant_argument="tenant_id") as g:
        (listed,) = g.rpc("admin", "tools/list").json()["result"]["tools"]
        assert "tenant_id" not in json.dumps(listed["inputSchema"])


MODERN = {"MCP-Protocol-Version": "2026-07-28"}
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "attacker", "version": "1"},
}


def modern_call(g: Guarded, label: str, name: str, arguments: Any) -> httpx.Response:
    params = {"name": name, "arguments": arguments, "_meta": META}
    return g.rpc(label, "tools/call", params, headers=MODERN | {"Mcp-Method": "tools/call", "Mcp-Name": name})


@pytest.fixture(scope="module")
def demo() -> Iterator[Guarded]:
    labels = {"acme": ("acme", ["mcp:write"]), "globex": ("globex", ["mcp:write"])}
    with guarded(http_app(), tenant_argument="tenant_id", labels=labels) as g:
        assert modern_call(g, "globex", "add_item", {"text": "globex-secret"}).status_code == 200
        yield g


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize(
    "arguments",
    [
        {"tenant\u2010id": "globex"},
        {"tenant-id": "globex"},
        {"tenantId": "globex"},
        {"tenant_id\x00": "globex"},
        {"\uff54\uff45\uff4e\uff41\uff4e\uff54\uff3f\uff49\uff44": "globex"},
        {"TENANT_ID": "globex"},
        {"tenant_id ": "globex"},
        '{"tenant_id": "globex"}',
        [{"tenant_id": "globex"}],
    ],
    ids=["unicode-hyphen", "hyphen", "camel", "nul", "fullwidth", "upper", "space", "json-string", "list"],
)
def test_no_spelling_of_the_tenant_argument_reaches_another_tenant(demo: Guarded, arguments: Any) -> None:
    """However the tenant key is spelled, or the arguments shaped, acme's key never reads globex's items."""
    response = modern_call(demo, "acme", "list_items", arguments)
    assert "globex-secret" not in response.text
    if response.status_code == 200:
        assert response.json()["result"]["structuredContent"]["result"] == []


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_tools_list_answer_replayed_on_the_server_stream_is_filtered() -> None:
    """A tools/list answer the server replays on its GET stream (resuming with Last-Event-ID) reaches a read key
    cut down to what it may call, like any tools/list answer; the stream's other events pass as they came."""
    listing = answer(7, {"tools": [R("read_tool"), D("drop_tool")]})
    progress = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}})
    upstream = Upstream(pages=[[R("read_tool"), D("drop_tool")]], stream=[sse(listing, progress.encode())])
    with guarded(upstream) as g:
        headers = {"Authorization": f"Bearer {g.keys['read']}", "Accept": "text/event-stream", "Last-Event-ID": "3"}
        streamed = httpx.get(g.url + "/mcp", headers=headers, timeout=10)
    assert streamed.status_code == 200
    assert "read_tool" in streamed.text
    assert "drop_tool" not in streamed.text
    assert "notifications/progress" in streamed.text


@pytest.mark.threat("T-SCOPE-ESCALATE")
@pytest.mark.parametrize(
    ("method", "rid", "expected"),
    [
        ("notifications/cancelled", None, 202),
        ("notifications/cancelled", 5, 403),
        ("notifications/custom", 6, 403),
        ("x/list", 7, 403),
        ("resources/templates/list", 8, 200),
    ],
)
def test_read_methods_by_name_alone_need_more(method: str, rid: Any, expected: int) -> None:
    """A request (with an id) named like a notification, or any unknown method ending in /list, is a method
    the guard does not know: a read key is refused it (403), while real notifications and listings pass."""
    upstream = Upstream(pages=[[R("read_tool")]])
    with guarded(upstream) as g:
        answered = g.rpc("read", method, {}, rid=rid)
    assert answered.status_code == expected, answered.text
