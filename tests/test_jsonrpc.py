"""parse_message: one strict reading of an MCP JSON-RPC body and its routing headers."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mcp.shared.inbound import encode_header_value

from mcpguard.errors import HeaderMismatch, InvalidRequest
from mcpguard.jsonrpc import RpcMessage, parse_message

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020

Headers = Sequence[tuple[bytes, bytes]]


def body(**fields: Any) -> bytes:
    """A JSON-RPC 2.0 message with ``fields``, serialised the ordinary way."""
    return json.dumps({"jsonrpc": "2.0", **fields}).encode()


def call(name: str, **arguments: Any) -> bytes:
    return body(id=1, method="tools/call", params={"name": name, "arguments": arguments})


def refused(raw: bytes, headers: Headers = (), *, max_depth: int = 64) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_message(raw, headers, max_depth=max_depth)
    return info.value


def mismatched(raw: bytes, headers: Headers) -> HeaderMismatch:
    with pytest.raises(HeaderMismatch) as info:
        parse_message(raw, headers)
    assert info.value.jsonrpc_code == HEADER_MISMATCH
    assert info.value.status == 400
    return info.value


def nested(depth: int) -> bytes:
    """A valid request whose deepest container sits at ``depth`` (the message object is depth 1)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"a":{inner or 0}}}}}'.encode()


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


class TestAccepted:
    def test_request_is_read_with_method_id_and_params(self) -> None:
        """A request keeps its method, id and params, and is classified as a request."""
        message = parse_message(body(id=7, method="tools/list", params={"cursor": "abc"}), [])
        assert message == RpcMessage(kind="request", method="tools/list", id=7, name=None, params={"cursor": "abc"})

    def test_string_id_is_kept_as_a_string(self) -> None:
        """A string id is not coerced to a number."""
        assert parse_message(body(id="42", method="ping"), []).id == "42"

    def test_message_without_id_is_a_notification(self) -> None:
        """A method without an id is a notification, with no id and no params."""
        message = parse_message(body(method="notifications/initialized"), [])
        assert (message.kind, message.method, message.id, message.params) == (
            "notification",
            "notifications/initialized",
            None,
            None,
        )

    def test_response_carries_only_its_id(self) -> None:
        """A response to a server request is classified as one, keeping the id it answers."""
        message = parse_message(body(id="srv-1", result={"roots": []}), [])
        assert message == RpcMessage(kind="response", method=None, id="srv-1", name=None, params=None)

    def test_error_response_is_a_response(self) -> None:
        """A response carrying an error (rather than a result) is still a response."""
        message = parse_message(body(id=3, error={"code": -1, "message": "no"}), [])
        assert (message.kind, message.id) == ("response", 3)

    def test_tools_call_names_its_tool(self) -> None:
        """tools/call exposes the tool name as the message's name."""
        assert parse_message(call("search", q="x"), []).name == "search"

    def test_prompts_get_names_its_prompt(self) -> None:
        """prompts/get exposes params.name as the message's name."""
        assert parse_message(body(id=1, method="prompts/get", params={"name": "greet"}), []).name == "greet"

    def test_resources_read_names_its_uri(self) -> None:
        """resources/read exposes params.uri as the message's name."""
        raw = body(id=1, method="resources/read", params={"uri": "file:///etc/motd"})
        assert parse_message(raw, []).name == "file:///etc/motd"

    def test_name_is_only_taken_from_methods_that_name_something(self) -> None:
        """A params.name on a method that names nothing is not taken as the target."""
        assert parse_message(body(id=1, method="prompts/list", params={"name": "x"}), []).name is None

    def test_null_params_count_as_absent(self) -> None:
        """``"params": null`` is read as no params rather than refused."""
        assert parse_message(body(id=1, method="ping", params=None), []).params is None

    def test_keys_differing_in_case_are_distinct(self) -> None:
        """Keys are compared exactly, so ``name`` and ``Name`` are two keys, not a duplicate."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}'
        assert parse_message(raw, []).name == "a"

    def test_unrelated_headers_may_repeat(self) -> None:
        """Only routing headers must be single; other repeated headers are none of the parser's business."""
        headers = [(b"accept", b"application/json"), (b"accept", b"text/event-stream")]
        assert parse_message(body(id=1, method="ping"), headers).method == "ping"

    @settings(max_examples=75)
    @given(
        method=st.text(min_size=1).filter(lambda m: m not in ("tools/call", "prompts/get", "resources/read")),
        rid=st.integers() | st.text(),
        params=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    )
    def test_any_well_formed_request_round_trips(self, method: str, rid: int | str, params: dict[str, Any]) -> None:
        """Whatever the method, id and params, a well-formed request is read back exactly as it was written."""
        message = parse_message(body(id=rid, method=method, params=params), [])
        assert (message.kind, message.method, message.id, message.params) == ("request", method, rid, params)


@pytest.mark.threat("T-PARSE-DIFF")
class TestAmbiguousBodies:
    def test_duplicate_top_level_method_refused(self) -> None:
        """Two ``method`` keys are refused: first-wins and last-wins parsers would run different methods."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"rm"}}'
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_duplicate_nested_key_refused(self) -> None:
        """A duplicate key inside params is refused, so the tool name cannot be read two ways."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","name":"delete"}}'
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_duplicate_deep_inside_arguments_refused(self) -> None:
        """Duplicates are refused at any depth, not just where the guard looks."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":{"b":1,"b":2}}}}'
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_duplicate_with_equal_values_refused(self) -> None:
        """A repeated key is refused even when both copies agree: the shape itself is ambiguous."""
        raw = b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}'
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_duplicate_spelled_with_unicode_escape_refused(self) -> None:
        """``"met\\u0068od"`` is the key ``method``; alongside a plain ``method`` it is a duplicate."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","met\\u0068od":"tools/call","params":{"name":"x"}}'
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    @settings(max_examples=100)
    @given(key=st.text(min_size=1, max_size=12), escape=st.lists(st.booleans(), min_size=12, max_size=12))
    def test_duplicate_under_any_escape_spelling_refused(self, key: str, escape: list[bool]) -> None:
        """However a key's characters are \\u-escaped, the parser sees it as the same key and refuses the pair."""
        plain = json.dumps(key, ensure_ascii=False)[1:-1]
        spelled = "".join(
            "".join(f"\\u{unit:04x}" for unit in _utf16_units(char)) if flag else json.dumps(char)[1:-1]
            for char, flag in zip(key, escape, strict=False)
        )
        raw = f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"{plain}":1,"{spelled}":2}}}}'
        assert refused(raw.encode("utf-8", "surrogatepass")).jsonrpc_code == PARSE_ERROR

    def test_batch_refused(self) -> None:
        """A JSON array (a batch) is refused whatever it holds."""
        raw = json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]).encode()
        error = refused(raw)
        assert (type(error), error.jsonrpc_code) == (InvalidRequest, INVALID_REQUEST)

    def test_batch_hiding_tools_call_behind_ping_refused(self) -> None:
        """A ping followed by a tools/call in one batch cannot slip the call past a check of the first item."""
        raw = json.dumps(
            [
                {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "drop_db"}},
            ]
        ).encode()
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    def test_empty_batch_refused(self) -> None:
        """An empty array is no message at all."""
        assert refused(b"[]").jsonrpc_code == INVALID_REQUEST

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}', id="invalid-byte"),
            pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"\xc0\xafping"}', id="overlong"),
            pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"\xed\xa0\x80"}', id="encoded-surrogate"),
            pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"ping\xe2\x82"}', id="truncated-sequence"),
        ],
    )
    def test_non_utf8_body_refused(self, raw: bytes) -> None:
        """Bytes that are not strict UTF-8 are a parse error, not decoded leniently."""
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_utf16_body_refused(self) -> None:
        """A UTF-16 body, which some JSON readers auto-detect, is not read as JSON."""
        raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode("utf-16-le")
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_utf8_bom_refused(self) -> None:
        """A UTF-8 byte order mark before the JSON is refused (some parsers skip it, others fail)."""
        assert refused(b"\xef\xbb\xbf" + body(id=1, method="ping")).jsonrpc_code == PARSE_ERROR

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
    def test_non_finite_constants_refused(self, constant: str) -> None:
        """NaN and Infinity are not JSON; a param carrying one is a parse error."""
        raw = f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{{"n":{constant}}}}}}}'
        assert refused(raw.encode()).jsonrpc_code == PARSE_ERROR

    def test_nan_id_refused(self) -> None:
        """NaN in the id position is refused before it could be compared or echoed."""
        assert refused(b'{"jsonrpc":"2.0","id":NaN,"method":"ping"}').jsonrpc_code == PARSE_ERROR

    @pytest.mark.parametrize("raw", [b"", b"   ", b"{", b'{"jsonrpc":"2.0"} x', b"{'jsonrpc':'2.0'}"])
    def test_malformed_json_refused(self, raw: bytes) -> None:
        """Empty, truncated, trailing-garbage and single-quoted bodies are parse errors."""
        assert refused(raw).jsonrpc_code == PARSE_ERROR

    def test_nesting_exactly_at_the_limit_passes(self) -> None:
        """Containers nested exactly ``max_depth`` deep are accepted."""
        assert parse_message(nested(64), [], max_depth=64).method == "ping"

    def test_nesting_one_past_the_limit_refused(self) -> None:
        """One container deeper than ``max_depth`` is a parse error."""
        assert refused(nested(65), max_depth=64).jsonrpc_code == PARSE_ERROR

    def test_scalar_below_the_deepest_container_does_not_count(self) -> None:
        """Depth counts containers: a number inside the deepest allowed array does not tip it over."""
        raw = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":[1]}}'
        assert parse_message(raw, [], max_depth=3).method == "ping"

    @settings(max_examples=60)
    @given(depth=st.integers(min_value=2, max_value=40), limit=st.integers(min_value=2, max_value=40))
    def test_depth_limit_is_exact(self, depth: int, limit: int) -> None:
        """A message is accepted exactly when its nesting depth does not exceed the limit."""
        if depth <= limit:
            assert parse_message(nested(depth), [], max_depth=limit).method == "ping"
        else:
            assert refused(nested(depth), max_depth=limit).jsonrpc_code == PARSE_ERROR

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b"[" * 100_000, id="open-arrays"),
            pytest.param(b"[" * 100_000 + b"]" * 100_000, id="closed-arrays"),
            pytest.param(b'{"a":' * 100_000, id="open-objects"),
            pytest.param(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":' + b"[" * 100_000, id="in-params"),
        ],
    )
    def test_very_deep_nesting_is_a_parse_error_not_a_crash(self, raw: bytes) -> None:
        """100,000 levels of nesting end in a parse error, never a RecursionError escaping the parser."""
        assert refused(raw).jsonrpc_code == PARSE_ERROR


class TestEnvelope:
    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(b'{"id":1,"method":"ping"}', id="missing"),
            pytest.param(b'{"jsonrpc":"1.0","id":1,"method":"ping"}', id="wrong-version"),
            pytest.param(b'{"jsonrpc":2.0,"id":1,"method":"ping"}', id="number"),
            pytest.param(b'{"jsonrpc":null,"id":1,"method":"ping"}', id="null"),
        ],
    )
    def test_jsonrpc_member_must_be_the_string_2_0(self, raw: bytes) -> None:
        """Without ``"jsonrpc": "2.0"`` exactly, the message is an invalid request."""
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    @pytest.mark.parametrize("raw", [b"5", b'"ping"', b"null", b"true"])
    def test_top_level_must_be_an_object(self, raw: bytes) -> None:
        """A JSON scalar is not a JSON-RPC message."""
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    @pytest.mark.parametrize(
        "rid",
        [
            pytest.param("null", id="null"),
            pytest.param("true", id="true"),
            pytest.param("false", id="false"),
            pytest.param("1.0", id="float"),
            pytest.param("1e3", id="exponent"),
            pytest.param("[1]", id="array"),
            pytest.param('{"n":1}', id="object"),
        ],
    )
    def test_id_must_be_string_or_integer(self, rid: str) -> None:
        """null, booleans (which Python calls ints), floats and containers are not usable ids."""
        raw = f'{{"jsonrpc":"2.0","id":{rid},"method":"ping"}}'.encode()
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    @pytest.mark.parametrize("params", ["[]", '["search"]', '"search"', "1"])
    def test_params_must_be_an_object(self, params: str) -> None:
        """Positional (array) or scalar params are invalid params, not silently ignored."""
        raw = f'{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}'.encode()
        assert refused(raw).jsonrpc_code == INVALID_PARAMS

    @pytest.mark.parametrize("method", ['""', "5", "null", '["tools/call"]'])
    def test_method_must_be_a_non_empty_string(self, method: str) -> None:
        """An empty or non-string method is an invalid request."""
        raw = f'{{"jsonrpc":"2.0","id":1,"method":{method}}}'.encode()
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    @pytest.mark.parametrize(
        "params",
        [None, {}, {"name": 5}, {"name": None}, {"name": ["rm"]}, {"tool": "rm"}],
        ids=["no-params", "empty", "number", "null", "list", "other-key"],
    )
    def test_tools_call_needs_a_string_name(self, params: dict[str, Any] | None) -> None:
        """tools/call without a string params.name is invalid params: no tool, no decision."""
        fields: dict[str, Any] = {"id": 1, "method": "tools/call"}
        if params is not None:
            fields["params"] = params
        assert refused(body(**fields)).jsonrpc_code == INVALID_PARAMS

    @pytest.mark.parametrize("params", [{}, {"uri": 1}, {"uri": ["file:///a"]}, {"name": "file:///a"}])
    def test_resources_read_needs_a_string_uri(self, params: dict[str, Any]) -> None:
        """resources/read without a string params.uri is invalid params."""
        assert refused(body(id=1, method="resources/read", params=params)).jsonrpc_code == INVALID_PARAMS

    def test_prompts_get_needs_a_string_name(self) -> None:
        """prompts/get without a string params.name is invalid params."""
        assert refused(body(id=1, method="prompts/get", params={"name": {}})).jsonrpc_code == INVALID_PARAMS

    def test_named_notification_still_needs_its_name(self) -> None:
        """A tools/call sent as a notification is held to the same params rule as a request."""
        assert refused(body(method="tools/call", params={})).jsonrpc_code == INVALID_PARAMS

    @pytest.mark.threat("T-PARSE-DIFF")
    @pytest.mark.parametrize("member", ["result", "error"])
    def test_request_and_response_at_once_refused(self, member: str) -> None:
        """A message with a method and a result or error could be routed either way, so it is refused."""
        raw = body(id=1, method="tools/call", params={"name": "t"}, **{member: {}})
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    @pytest.mark.threat("T-PARSE-DIFF")
    def test_response_with_result_and_error_refused(self) -> None:
        """A response cannot claim success and failure at once."""
        raw = body(id=1, result={}, error={"code": -1, "message": "x"})
        assert refused(raw).jsonrpc_code == INVALID_REQUEST

    def test_response_needs_an_id(self) -> None:
        """A result with no id answers nothing and is refused."""
        assert refused(body(result={})).jsonrpc_code == INVALID_REQUEST

    def test_neither_method_nor_result(self) -> None:
        """An object with only an id is not a message."""
        assert refused(body(id=1)).jsonrpc_code == INVALID_REQUEST


@pytest.mark.threat("T-PARSE-DIFF")
class TestRoutingHeaders:
    def test_matching_headers_pass(self) -> None:
        """Mcp-Method and Mcp-Name that agree with the body are accepted."""
        headers = [(b"mcp-method", b"tools/call"), (b"mcp-name", b"search"), (b"mcp-protocol-version", b"2025-11-25")]
        assert parse_message(call("search"), headers).name == "search"

    def test_mcp_method_mismatch_refused(self) -> None:
        """An Mcp-Method header naming another method than the body is a header mismatch."""
        mismatched(call("drop_db"), [(b"mcp-method", b"tools/list")])

    def test_mcp_method_compared_case_sensitively(self) -> None:
        """Method names are case-sensitive, so ``Tools/Call`` does not match ``tools/call``."""
        mismatched(call("t"), [(b"mcp-method", b"Tools/Call")])

    def test_mcp_method_on_a_response_refused(self) -> None:
        """A response has no method, so any Mcp-Method header disagrees with it."""
        mismatched(body(id=1, result={}), [(b"mcp-method", b"tools/call")])

    @pytest.mark.parametrize("name", [b"mcp-method", b"mcp-name", b"mcp-protocol-version"])
    def test_routing_header_sent_twice_refused(self, name: bytes) -> None:
        """A routing header sent twice is refused even when both copies agree (first- and last-wins differ)."""
        value = {b"mcp-method": b"tools/call", b"mcp-name": b"search", b"mcp-protocol-version": b"2025-11-25"}[name]
        mismatched(call("search"), [(name, value), (name, value)])

    def test_mcp_method_twice_with_different_values_refused(self) -> None:
        """Two Mcp-Method headers, one matching the body, cannot pass on the matching one."""
        mismatched(call("search"), [(b"mcp-method", b"tools/call"), (b"mcp-method", b"tools/list")])

    def test_mcp_name_mismatch_refused(self) -> None:
        """An Mcp-Name that names another tool than the body is a header mismatch."""
        mismatched(call("drop_db"), [(b"mcp-method", b"tools/call"), (b"mcp-name", b"search")])

    def test_mcp_name_must_match_resources_read_uri(self) -> None:
        """For resources/read, Mcp-Name is compared with params.uri."""
        raw = body(id=1, method="resources/read", params={"uri": "file:///secret"})
        assert parse_message(raw, [(b"mcp-name", b"file:///secret")]).name == "file:///secret"
        mismatched(raw, [(b"mcp-name", b"file:///public")])

    def test_mcp_name_on_method_that_names_nothing_refused(self) -> None:
        """Mcp-Name on tools/list claims a target the body does not have."""
        mismatched(body(id=1, method="tools/list"), [(b"mcp-name", b"search")])

    def test_sentinel_encoded_mcp_name_matches_non_ascii_tool(self) -> None:
        """A non-ASCII tool name sent in the base64 sentinel form matches the body's name."""
        name = "résumé-lesen 検索"
        header = encode_header_value(name)
        assert header.startswith("=?base64?")
        headers = [(b"mcp-method", b"tools/call"), (b"mcp-name", header.encode("ascii"))]
        assert parse_message(call(name), headers).name == name

    def test_sentinel_encoded_mcp_name_for_another_tool_refused(self) -> None:
        """A sentinel header that decodes to another name than the body's is a mismatch."""
        header = encode_header_value("résumé-löschen")
        mismatched(call("résumé-lesen"), [(b"mcp-name", header.encode("ascii"))])

    def test_raw_sentinel_text_is_not_taken_literally(self) -> None:
        """A tool literally named like a sentinel must be matched by its encoding, not by its raw spelling."""
        name = "=?base64?c2VhcmNo?="
        mismatched(call(name), [(b"mcp-name", name.encode())])
        assert parse_message(call(name), [(b"mcp-name", encode_header_value(name).encode())]).name == name

    def test_sentinel_decoding_to_the_body_name_matches_even_for_ascii(self) -> None:
        """An ASCII name may also be sent in sentinel form; it is compared after decoding."""
        header = b"=?base64?" + base64.b64encode(b"search") + b"?="
        assert parse_message(call("search"), [(b"mcp-name", header)]).name == "search"

    @pytest.mark.parametrize(
        "header",
        [
            pytest.param(b"=?base64?!!!?=", id="bad-alphabet"),
            pytest.param(b"=?base64?YQ?=", id="unpadded"),
            pytest.param(b"=?base64?YR==?=", id="non-canonical"),
            pytest.param(b"=?base64?/w==?=", id="not-utf8"),
        ],
    )
    def test_malformed_sentinel_never_matches(self, header: bytes) -> None:
        """A malformed sentinel header (bad, unpadded or non-canonical base64, or not UTF-8) matches no name."""
        mismatched(call("a"), [(b"mcp-name", header)])

    @settings(max_examples=100)
    @given(name=st.text(min_size=1, max_size=30))
    def test_encoded_mcp_name_always_matches_its_own_tool(self, name: str) -> None:
        """Whatever the tool name, the header the SDK would send for it is accepted."""
        headers = [(b"mcp-name", encode_header_value(name).encode("latin-1"))]
        assert parse_message(call(name), headers).name == name

    @settings(max_examples=100)
    @given(name=st.text(min_size=1, max_size=20), other=st.text(min_size=1, max_size=20))
    def test_encoded_mcp_name_of_another_tool_never_matches(self, name: str, other: str) -> None:
        """A header built for a different name never passes for this one."""
        assume(name != other)
        mismatched(call(name), [(b"mcp-name", encode_header_value(other).encode("latin-1"))])

    @pytest.mark.parametrize("spelling", [b"MCP-METHOD", b"Mcp-Method", b"mCp-MeThOd"])
    def test_header_names_are_case_insensitive(self, spelling: bytes) -> None:
        """Mcp-Method in any letter case is checked, so an odd spelling cannot slip a mismatch through."""
        assert parse_message(call("t"), [(spelling, b"tools/call")]).method == "tools/call"
        mismatched(call("t"), [(spelling, b"tools/list")])

    def test_same_header_in_two_cases_is_sent_twice(self) -> None:
        """``Mcp-Name`` and ``mcp-name`` are one header sent twice."""
        mismatched(call("search"), [(b"Mcp-Name", b"search"), (b"mcp-name", b"search")])


def _utf16_units(char: str) -> list[int]:
    """The UTF-16 code units JSON uses to \\u-escape ``char``."""
    encoded = char.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(encoded[i : i + 2], "big") for i in range(0, len(encoded), 2)]


@pytest.mark.threat("T-AUDIT-GAP")
@pytest.mark.parametrize(
    "body",
    [
        rb'{"jsonrpc":"2.0","id":1,"method":"tools/\ud800"}',
        rb'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x\udfff"}}',
        rb'{"jsonrpc":"2.0","id":"\ud83d","method":"ping"}',
        rb'{"jsonrpc":"2.0","id":"\ude00","result":{}}',
    ],
)
def test_lone_surrogate_in_what_is_recorded_is_refused(body: bytes) -> None:
    """Valid JSON, but no Unicode text: a lone surrogate in the method, the name or the id never reaches the
    audit trail, the telemetry or a header, where it cannot be written."""
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        parse_message(body, [])


def test_surrogate_pair_escapes_are_text() -> None:
    """A pair of escapes is one character (an emoji, say), and such a name is accepted as it is."""
    body = rb'{"jsonrpc":"2.0","id":"\ud83d\ude00","method":"tools/call","params":{"name":"smile\ud83d\ude00"}}'
    message = parse_message(body, [])
    assert message.name == "smile\U0001f600"
    assert message.id == "\U0001f600"
