"""Router: which paths are MCP traffic, and which tenant a per-tenant path names."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpguard.config import ConfigError, GuardConfig
from mcpguard.errors import InvalidRequest
from mcpguard.routing import MCPRoute, Router

router = Router(GuardConfig())

tenants = st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=["Cs"]), min_size=1).filter(
    lambda t: t not in (".", "..")
)


def spelled(segments: list[str], gaps: list[int], trailing: int) -> str:
    """``segments`` joined by runs of ``gaps`` slashes, with ``trailing`` extra slashes at the end."""
    return "".join("/" * gap + segment for segment, gap in zip(segments, gaps, strict=True)) + "/" * trailing


class TestClassification:
    def test_plain_endpoint(self) -> None:
        """``/mcp`` is the plain MCP endpoint, naming no tenant."""
        assert router.route("/mcp") == MCPRoute(path_tenant=None)

    def test_tenant_endpoint(self) -> None:
        """``/acme/mcp`` is the MCP endpoint of tenant acme."""
        assert router.route("/acme/mcp") == MCPRoute(path_tenant="acme")

    def test_tenant_may_contain_dots(self) -> None:
        """A dot inside a segment is not a dot segment."""
        assert router.route("/v1.2/mcp") == MCPRoute(path_tenant="v1.2")

    @pytest.mark.parametrize(
        "path",
        [
            "/",
            "/health",
            "/mcpx",
            "/mcp/x",
            "/acme/mcp/x",
            "/a/b/mcp",
            "/acme/mcpx",
            "/.well-known/oauth-authorization",
        ],
    )
    def test_other_paths_are_plain_http(self, path: str) -> None:
        """Paths that are not the MCP endpoint (or a tenant's) are plain HTTP routes."""
        assert router.route(path) is None

    def test_well_known_metadata_is_not_a_dot_segment(self) -> None:
        """``/.well-known/...`` starts with a dot but is an ordinary segment."""
        assert router.route("/.well-known/oauth-protected-resource/mcp") is None

    def test_tenant_routes_can_be_disabled(self) -> None:
        """With ``tenant_path=None`` only the plain endpoint is MCP."""
        plain = Router(GuardConfig(tenant_path=None))
        assert plain.route("/acme/mcp") is None
        assert plain.route("/mcp") == MCPRoute(path_tenant=None)

    def test_custom_mcp_path(self) -> None:
        """A custom ``mcp_path`` replaces ``/mcp`` as the plain endpoint."""
        custom = Router(GuardConfig(mcp_path="/api/rpc", tenant_path=None))
        assert custom.route("/api/rpc") == MCPRoute(path_tenant=None)
        assert custom.route("/mcp") is None

    def test_custom_tenant_path(self) -> None:
        """A custom ``tenant_path`` puts the tenant where its placeholder is."""
        custom = Router(GuardConfig(tenant_path="/t/{tenant}/rpc"))
        assert custom.route("/t/acme/rpc") == MCPRoute(path_tenant="acme")
        assert custom.route("/acme/mcp") is None

    def test_tenant_path_is_literal_not_a_pattern(self) -> None:
        """Regex characters in ``tenant_path`` match only themselves."""
        custom = Router(GuardConfig(tenant_path="/v1.0/{tenant}/mcp"))
        assert custom.route("/v1.0/acme/mcp") == MCPRoute(path_tenant="acme")
        assert custom.route("/v1x0/acme/mcp") is None

    @settings(max_examples=100)
    @given(tenant=tenants)
    def test_any_single_segment_is_a_tenant(self, tenant: str) -> None:
        """Whatever one segment holds (bar dot segments), it is read back as the tenant."""
        assert router.route(f"/{tenant}/mcp") == MCPRoute(path_tenant=tenant)


@pytest.mark.threat("T-PATH-EVASION")
class TestSpellingEvasion:
    @pytest.mark.parametrize("path", ["/mcp/", "//mcp", "/mcp//", "///mcp///", "//mcp/"])
    def test_slash_spellings_of_plain_endpoint_are_mcp(self, path: str) -> None:
        """Extra and trailing slashes do not turn the MCP endpoint into a plain route."""
        assert router.route(path) == MCPRoute(path_tenant=None)

    @pytest.mark.parametrize("path", ["/acme//mcp/", "//acme/mcp", "/acme/mcp/", "/acme///mcp"])
    def test_slash_spellings_of_tenant_endpoint_are_mcp(self, path: str) -> None:
        """Extra and trailing slashes still name the tenant's MCP endpoint."""
        assert router.route(path) == MCPRoute(path_tenant="acme")

    def test_slash_spellings_of_custom_path_are_mcp(self) -> None:
        """Collapsing also applies to a multi-segment custom ``mcp_path``."""
        custom = Router(GuardConfig(mcp_path="/api/mcp", tenant_path=None))
        assert custom.route("/api//mcp/") == MCPRoute(path_tenant=None)

    @pytest.mark.parametrize(
        "path", ["/x/../mcp", "/./mcp", "/mcp/.", "/mcp/..", "/../mcp", "/acme/./mcp", "/.", "/..", "/a/b/../../mcp"]
    )
    def test_dot_segments_refused(self, path: str) -> None:
        """A path with ``.`` or ``..`` segments is refused, since a server behind may resolve it to MCP."""
        with pytest.raises(InvalidRequest) as info:
            router.route(path)
        assert (info.value.status, info.value.jsonrpc_code) == (400, -32600)

    def test_dot_segments_refused_even_off_the_mcp_endpoint(self) -> None:
        """Dot segments are refused on any path, not only those that resolve to MCP."""
        with pytest.raises(InvalidRequest):
            router.route("/static/../health")

    @settings(max_examples=100)
    @given(
        tenant=tenants,
        gaps=st.lists(st.integers(min_value=1, max_value=4), min_size=2, max_size=2),
        trailing=st.integers(min_value=0, max_value=3),
    )
    def test_any_slash_spelling_routes_like_the_canonical_one(
        self, tenant: str, gaps: list[int], trailing: int
    ) -> None:
        """However many slashes separate or end the segments, the route is the canonical path's."""
        assert router.route(spelled([tenant, "mcp"], gaps, trailing)) == MCPRoute(path_tenant=tenant)
        assert router.route(spelled(["mcp"], gaps[:1], trailing)) == MCPRoute(path_tenant=None)

    @settings(max_examples=100)
    @given(
        before=st.lists(st.sampled_from(["a", "mcp", "acme", "x.y"]), max_size=3),
        after=st.lists(st.sampled_from(["a", "mcp", "acme", "x.y"]), max_size=3),
        dots=st.sampled_from([".", ".."]),
    )
    def test_any_path_with_a_dot_segment_refused(self, before: list[str], after: list[str], dots: str) -> None:
        """A ``.`` or ``..`` segment anywhere in the path is refused."""
        with pytest.raises(InvalidRequest):
            router.route("/" + "/".join([*before, dots, *after]))

    @pytest.mark.parametrize(
        ("settings_", "path", "expected"),
        [
            pytest.param({"mcp_path": "/a//mcp", "tenant_path": None}, "/a//mcp", MCPRoute(None), id="mcp-path"),
            pytest.param({"tenant_path": "/{tenant}/mcp/"}, "/acme/mcp/", MCPRoute("acme"), id="tenant-trailing"),
            pytest.param({"tenant_path": "/{tenant}//mcp"}, "/acme//mcp", MCPRoute("acme"), id="tenant-doubled"),
        ],
    )
    def test_configured_endpoint_is_never_a_plain_route(
        self, settings_: dict[str, Any], path: str, expected: MCPRoute
    ) -> None:
        """An endpoint spelled with extra slashes in the config is either refused by it or routed as MCP."""
        try:
            configured = Router(GuardConfig(**settings_))
        except ConfigError:
            return
        assert configured.route(path) == expected
