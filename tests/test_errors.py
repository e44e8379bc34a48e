"""The exception tree: each refusal's HTTP status, wire codes and WWW-Authenticate challenge."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcpguard.errors import (
    AuthenticationRequired,
    HeaderMismatch,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MCPGuardError,
    MethodNotAllowed,
    PayloadTooLarge,
    StorageUnavailable,
    TenantMismatch,
)

METADATA = "https://mcp.example.test/.well-known/oauth-protected-resource/mcp"

# RFC 9110 §11.2: auth-param = token BWS "=" BWS ( token / quoted-string ), comma-separated.
_AUTH_PARAM = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)="((?:[^"\\]|\\.)*)"(?:, |$)', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)

header_safe_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"))


def parse_challenge(challenge: str) -> tuple[str, dict[str, str]]:
    """Split a challenge into its scheme and unquoted params the way a strict client would."""
    scheme, _, rest = challenge.partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _AUTH_PARAM.match(rest, position)
        assert match is not None, f"unparseable challenge at {rest[position:]!r}"
        name = match.group(1)
        assert name not in params, f"parameter {name} appears twice"
        params[name] = _QUOTED_PAIR.sub(r"\1", match.group(2))
        position = match.end()
    return scheme, params


class TestStatusAndCodes:
    @pytest.mark.parametrize(
        ("error", "status", "code", "jsonrpc_code"),
        [
            (AuthenticationRequired("x"), 401, "unauthorized", -32001),
            (InvalidToken("x"), 401, "invalid_token", -32001),
            (InsufficientScope("x", required=("mcp:write",)), 403, "insufficient_scope", -32003),
            (TenantMismatch("x"), 403, "tenant_mismatch", -32003),
            (InvalidRequest("x"), 400, "invalid_request", -32600),
            (HeaderMismatch("x"), 400, "invalid_request", -32020),
            (PayloadTooLarge("x"), 413, "request_too_large", -32600),
            (MethodNotAllowed("x", allowed=("GET",)), 405, "method_not_allowed", -32600),
            (StorageUnavailable("x"), 503, "temporarily_unavailable", -32005),
        ],
        ids=lambda value: type(value).__name__ if isinstance(value, MCPGuardError) else None,
    )
    def test_wire_shape(self, error: MCPGuardError, status: int, code: str, jsonrpc_code: int) -> None:
        """Each refusal pairs its HTTP status with its RFC 6749/6750 code and its JSON-RPC code."""
        assert (error.status, error.error_code, error.jsonrpc_code) == (status, code, jsonrpc_code)

    def test_every_refusal_is_an_mcpguard_error(self) -> None:
        """One root catches them all, and HeaderMismatch is a kind of InvalidRequest."""
        for cls in (AuthenticationRequired, InvalidToken, TenantMismatch, InvalidRequest, StorageUnavailable):
            assert issubclass(cls, MCPGuardError)
        assert issubclass(HeaderMismatch, InvalidRequest)

    def test_description_is_the_message(self) -> None:
        """The description is kept as given and is the exception's text."""
        error = TenantMismatch("wrong tenant")
        assert (error.description, str(error)) == ("wrong tenant", "wrong tenant")

    def test_invalid_request_may_carry_a_parse_error_code(self) -> None:
        """A malformed body is reported as a JSON-RPC parse error without changing the class default."""
        assert InvalidRequest("bad", jsonrpc_code=-32700).jsonrpc_code == -32700
        assert InvalidRequest("bad").jsonrpc_code == -32600

    def test_root_is_a_server_error(self) -> None:
        """Should the root ever surface, it reads as a 500 server error with no challenge."""
        error = MCPGuardError("x")
        assert (error.status, error.error_code, error.challenge(METADATA)) == (500, "server_error", None)


class TestChallenges:
    def test_authentication_required_names_the_base_scope_and_the_metadata(self) -> None:
        """Without a credential the challenge carries no error (RFC 6750 §3.1): the least scope that opens the
        server, so a client asks for no more at first, and where to find metadata."""
        assert AuthenticationRequired("authentication required").challenge(METADATA) == (
            f'Bearer scope="mcp:read", resource_metadata="{METADATA}"'
        )

    def test_authentication_required_without_metadata_names_the_scope(self) -> None:
        """With no metadata URL configured the challenge names only the base scope."""
        assert AuthenticationRequired("authentication required").challenge(None) == 'Bearer scope="mcp:read"'

    def test_invalid_token(self) -> None:
        """A bad token gets ``error="invalid_token"`` with its description and the metadata URL."""
        scheme, params = parse_challenge(InvalidToken("token expired").challenge(METADATA) or "")
        assert scheme == "Bearer"
        assert params == {
            "error": "invalid_token",
            "error_description": "token expired",
            "scope": "mcp:read",
            "resource_metadata": METADATA,
        }

    def test_invalid_token_without_metadata(self) -> None:
        """Without a metadata URL the error params still come through."""
        _, params = parse_challenge(InvalidToken("token expired").challenge(None) or "")
        assert params == {"error": "invalid_token", "error_description": "token expired", "scope": "mcp:read"}

    def test_insufficient_scope_names_the_scope(self) -> None:
        """A missing scope gets ``error="insufficient_scope"`` and ``scope`` naming what the call needs."""
        error = InsufficientScope("this call needs the mcp:write scope", required=("mcp:write",))
        _, params = parse_challenge(error.challenge(METADATA) or "")
        assert params["error"] == "insufficient_scope"
        assert params["scope"] == "mcp:write"
        assert params["resource_metadata"] == METADATA

    def test_insufficient_scope_lists_every_required_scope(self) -> None:
        """Several required scopes are space-separated in one ``scope`` param (RFC 6750 §3)."""
        error = InsufficientScope("needs both", required=("mcp:write", "mcp:audit"))
        assert parse_challenge(error.challenge(None) or "")[1]["scope"] == "mcp:write mcp:audit"

    @pytest.mark.parametrize(
        "error", [TenantMismatch("x"), InvalidRequest("x"), PayloadTooLarge("x"), StorageUnavailable("x")]
    )
    def test_non_authentication_errors_have_no_challenge(self, error: MCPGuardError) -> None:
        """Only authentication and scope refusals send WWW-Authenticate."""
        assert error.challenge(METADATA) is None

    def test_quote_in_description_cannot_add_a_parameter(self) -> None:
        """A description holding ``", scope="mcp:admin`` stays inside error_description."""
        description = 'nope", scope="mcp:admin'
        error = InsufficientScope(description, required=("mcp:read",))
        _, params = parse_challenge(error.challenge(None) or "")
        assert params["error_description"] == description
        assert params["scope"] == "mcp:read"

    def test_trailing_backslash_cannot_swallow_the_closing_quote(self) -> None:
        """A description ending in a backslash is escaped, so the quoted-string still ends where it should."""
        _, params = parse_challenge(InvalidToken("ends with \\").challenge(METADATA) or "")
        assert params["error_description"] == "ends with \\"
        assert params["resource_metadata"] == METADATA

    def test_quotes_in_metadata_url_are_escaped_too(self) -> None:
        """Every param value is quoted the same way, the metadata URL included."""
        url = 'https://mcp.example.test/"x\\'
        params = parse_challenge(AuthenticationRequired("x").challenge(url) or "")[1]
        assert params == {"scope": "mcp:read", "resource_metadata": url}

    @settings(max_examples=200)
    @given(description=header_safe_text, metadata=header_safe_text)
    def test_any_description_round_trips_through_the_challenge(self, description: str, metadata: str) -> None:
        """Whatever printable text the description and URL hold, a strict parser reads back exactly those params."""
        error = InsufficientScope(description, required=("mcp:write",))
        scheme, params = parse_challenge(error.challenge(metadata) or "")
        assert scheme == "Bearer"
        assert params == {
            "error": "insufficient_scope",
            "error_description": description,
            "resource_metadata": metadata,
            "scope": "mcp:write",
        }
