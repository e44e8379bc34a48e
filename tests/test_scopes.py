"""Scopes: the inclusion order, and which scope an HTTP route, an MCP method or a tool needs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE, ScopePolicy, scope_for_annotations

ALL = (READ, WRITE, ADMIN, AUDIT)
policy = ScopePolicy()

granted_sets = st.sets(st.sampled_from([*ALL, "mcp:other", "profile"]), max_size=6)
non_bool_json = st.recursive(
    st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


class TestHierarchy:
    @pytest.mark.parametrize(
        ("granted", "covered"),
        [
            (READ, {READ}),
            (WRITE, {READ, WRITE}),
            (ADMIN, {READ, WRITE, ADMIN, AUDIT}),
            (AUDIT, {AUDIT}),
        ],
    )
    def test_each_scope_covers_exactly_what_it_includes(self, granted: str, covered: set[str]) -> None:
        """read ⊂ write ⊂ admin; audit stands alone but admin includes it."""
        assert {required for required in ALL if policy.allows([granted], required)} == covered

    def test_audit_does_not_include_read(self) -> None:
        """An audit-only credential can review, not call tools."""
        assert not policy.allows([AUDIT], READ)

    def test_nothing_granted_covers_nothing(self) -> None:
        """An empty grant covers no scope at all."""
        assert not any(policy.allows([], required) for required in ALL)

    def test_effective_is_the_union_of_each_grant(self) -> None:
        """Granting read and audit yields both and nothing more."""
        assert policy.effective([READ, AUDIT]) == {READ, AUDIT}

    def test_unknown_granted_scope_includes_only_itself(self) -> None:
        """A scope the policy does not know grants nothing of the hierarchy, but still names itself."""
        assert policy.effective(["mcp:superuser"]) == {"mcp:superuser"}
        assert not policy.allows(["mcp:superuser"], READ)

    def test_scope_names_are_compared_exactly(self) -> None:
        """``MCP:ADMIN`` or ``mcp:admin `` is not ``mcp:admin``."""
        assert not policy.allows(["MCP:ADMIN", "mcp:admin "], READ)

    def test_custom_inclusion_order_is_honoured(self) -> None:
        """A policy with its own ``implies`` decides by it, not by the default order."""
        custom = ScopePolicy(implies={"ops": frozenset({"ops", READ}), READ: frozenset({READ})})
        assert custom.allows(["ops"], READ)
        assert not custom.allows(["ops"], WRITE)

    @settings(max_examples=100)
    @given(granted=granted_sets)
    def test_effective_is_closed(self, granted: set[str]) -> None:
        """Expanding an already expanded grant adds nothing: inclusion is transitive."""
        once = policy.effective(granted)
        assert policy.effective(once) == once
        assert set(granted) <= once

    @settings(max_examples=100)
    @given(smaller=granted_sets, extra=granted_sets, required=st.sampled_from(ALL))
    def test_more_grants_never_allow_less(self, smaller: set[str], extra: set[str], required: str) -> None:
        """Adding scopes to a grant can only widen what it allows."""
        if policy.allows(smaller, required):
            assert policy.allows(smaller | extra, required)


class TestHttp:
    @pytest.mark.parametrize(
        ("method", "scope"),
        [("GET", READ), ("HEAD", READ), ("POST", WRITE), ("PUT", WRITE), ("PATCH", WRITE), ("DELETE", ADMIN)],
    )
    def test_known_methods(self, method: str, scope: str) -> None:
        """Reads need read, changes need write, deletion needs admin."""
        assert policy.for_http(method) == scope

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize("method", ["PROPFIND", "OPTIONS", "TRACE", "CONNECT", "MKCOL", "", "GET "])
    def test_unknown_http_method_needs_admin(self, method: str) -> None:
        """A method outside the table needs admin rather than falling back to something weaker."""
        assert policy.for_http(method) == ADMIN

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize("method", ["delete", "Delete", "post", "get"])
    def test_method_letter_case_does_not_change_the_scope(self, method: str) -> None:
        """A lower-case spelling that a lenient server might honour needs what its canonical form needs."""
        assert policy.for_http(method) == policy.for_http(method.upper())


class TestRpc:
    @pytest.mark.parametrize(
        "method",
        [
            "initialize",
            "ping",
            "server/discover",
            "resources/read",
            "prompts/get",
            "completion/complete",
            "tools/list",
            "prompts/list",
            "resources/list",
            "resources/templates/list",
        ],
    )
    def test_reading_and_housekeeping_methods_need_read(self, method: str) -> None:
        """Handshake, ping, notifications, listings and reads need only read."""
        assert policy.for_rpc(method) == READ

    @pytest.mark.parametrize(
        "method", ["notifications/initialized", "notifications/cancelled", "notifications/roots/list_changed"]
    )
    def test_notifications_need_read_only_as_notifications(self, method: str) -> None:
        """A notification needs read; a request (it carries an id) by the same name needs admin."""
        assert policy.for_rpc(method, notification=True) == READ
        assert policy.for_rpc(method) == ADMIN

    def test_tools_call_is_decided_per_tool(self) -> None:
        """tools/call has no method-level scope; the tool decides."""
        assert policy.for_rpc("tools/call") is None

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize(
        "method",
        [
            "tasks/cancel",
            "admin/shutdown",
            "sampling/createMessage",
            "tools/call ",
            "Tools/Call",
            "Tools/List",
            "tools/list/",
            "initialize ",
            "notifications",
            "xnotifications/x",
            "x/list",
            "admin/users/list",
            "",
        ],
    )
    def test_unknown_method_needs_admin(self, method: str) -> None:
        """Any method not known to only read, including near-spellings of known ones, needs admin."""
        assert policy.for_rpc(method) == ADMIN


class TestToolAnnotations:
    @pytest.mark.parametrize(
        ("annotations", "scope"),
        [
            ({"readOnlyHint": True}, READ),
            ({"readOnlyHint": True, "destructiveHint": True}, READ),
            ({"destructiveHint": False}, WRITE),
            ({"readOnlyHint": False, "destructiveHint": False}, WRITE),
            ({"destructiveHint": True}, ADMIN),
            ({"readOnlyHint": False}, ADMIN),
            ({"idempotentHint": True, "openWorldHint": False}, ADMIN),
            ({}, ADMIN),
            (None, ADMIN),
        ],
        ids=[
            "read-only",
            "read-only-wins-over-destructive",
            "non-destructive",
            "not-read-only-non-destructive",
            "destructive",
            "not-read-only",
            "other-hints-only",
            "empty",
            "unannotated",
        ],
    )
    def test_hints_follow_the_spec_defaults(self, annotations: dict[str, Any] | None, scope: str) -> None:
        """Missing hints take the spec's defaults: not read-only, destructive, so admin."""
        assert scope_for_annotations(annotations) == scope

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize("hint", ["true", 1, 1.0, [True], {"value": True}])
    def test_hint_of_wrong_type_does_not_lower_the_scope_read_only(self, hint: Any) -> None:
        """A readOnlyHint that is truthy but not JSON ``true`` does not make a tool read-only."""
        assert scope_for_annotations({"readOnlyHint": hint}) == ADMIN

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @pytest.mark.parametrize("hint", ["false", 0, 0.0, None, "", []])
    def test_hint_of_wrong_type_does_not_lower_the_scope_destructive(self, hint: Any) -> None:
        """A destructiveHint that is falsy but not JSON ``false`` leaves the tool destructive."""
        assert scope_for_annotations({"destructiveHint": hint}) == ADMIN

    @pytest.mark.threat("T-SCOPE-ESCALATE")
    @settings(max_examples=100)
    @given(read_only=non_bool_json, destructive=non_bool_json)
    def test_hint_of_wrong_type_never_lowers_the_scope(self, read_only: Any, destructive: Any) -> None:
        """With neither hint a JSON boolean, every tool needs admin."""
        assert scope_for_annotations({"readOnlyHint": read_only, "destructiveHint": destructive}) == ADMIN


class TestOverrides:
    def test_override_wins_over_read_only_hint(self) -> None:
        """An operator can demand admin for a tool the server calls read-only."""
        overrides = ScopePolicy(tool_overrides={"export_all": ADMIN})
        assert overrides.for_tool("export_all", {"readOnlyHint": True}) == ADMIN

    def test_override_wins_over_destructive_hint(self) -> None:
        """An operator can lower a tool the server calls destructive."""
        overrides = ScopePolicy(tool_overrides={"scratch_reset": WRITE})
        assert overrides.for_tool("scratch_reset", {"destructiveHint": True}) == WRITE

    def test_override_applies_only_to_its_tool(self) -> None:
        """Other tools keep the scope their annotations give them."""
        overrides = ScopePolicy(tool_overrides={"export_all": ADMIN})
        assert overrides.for_tool("search", {"readOnlyHint": True}) == READ
        assert overrides.for_tool("search", None) == ADMIN

    def test_override_may_name_audit(self) -> None:
        """Every scope of the inclusion order, audit included, is a valid override."""
        assert ScopePolicy(tool_overrides={"audit_log": AUDIT}).for_tool("audit_log", None) == AUDIT

    def test_unknown_override_scope_is_a_value_error(self) -> None:
        """An override naming scopes the policy does not know fails at construction, naming them all."""
        with pytest.raises(ValueError, match="mcp:root, mcp:superuser"):
            ScopePolicy(tool_overrides={"a": "mcp:superuser", "b": READ, "c": "mcp:root"})

    def test_override_checked_against_a_custom_order(self) -> None:
        """With a custom ``implies``, overrides are checked against its scopes, not the defaults."""
        implies = {"ops": frozenset({"ops"})}
        assert ScopePolicy(implies=implies, tool_overrides={"t": "ops"}).for_tool("t", None) == "ops"
        with pytest.raises(ValueError, match="mcp:read"):
            ScopePolicy(implies=implies, tool_overrides={"t": READ})
