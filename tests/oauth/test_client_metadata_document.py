"""The rules a fetched Client ID Metadata Document must meet before its client is trusted."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp.shared.auth import OAuthClientMetadata

from mcpguard.errors import MCPGuardError
from mcpguard.oauth.client_metadata_document import ClientMetadataError, parse_document

CLIENT_ID = "https://client.example/oauth/client.json"
CANARY = "canary-7f3e9d1c-never-echoed"


def document(**members: Any) -> dict[str, Any]:
    """A valid document for ``CLIENT_ID``, with ``members`` replacing (or, when ``None``, removing) members."""
    base: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_name": "Example Assistant",
        "redirect_uris": ["http://127.0.0.1:33418/callback", "https://client.example/oauth/done"],
    }
    base.update(members)
    return {name: value for name, value in base.items() if value is not None}


def encoded(members: dict[str, Any]) -> bytes:
    """``members`` as the UTF-8 JSON body a server would send."""
    return json.dumps(members).encode()


def test_valid_document_yields_public_client() -> None:
    """A minimal document gives the RFC 7591 defaults, auth method none, and redirect URIs exactly as written."""
    parsed = parse_document(encoded(document(redirect_uris=["http://localhost:8080", "http://[::1]/cb"])), CLIENT_ID)
    assert parsed.client_id == CLIENT_ID
    assert parsed.client_name == "Example Assistant"
    assert parsed.redirect_uris == ("http://localhost:8080", "http://[::1]/cb")
    assert parsed.grant_types == ("authorization_code", "refresh_token")
    assert parsed.response_types == ("code",)
    assert parsed.token_endpoint_auth_method == "none"
    assert parsed.scope is None
    assert isinstance(parsed.metadata, OAuthClientMetadata)


def test_declared_metadata_is_kept() -> None:
    """Explicit grant types, response types, scope and auth method none are read from the document."""
    parsed = parse_document(
        encoded(
            document(
                grant_types=["authorization_code"],
                response_types=["code"],
                scope="mcp:read mcp:write",
                token_endpoint_auth_method="none",
                logo_uri="https://client.example/logo.png",
            )
        ),
        CLIENT_ID,
    )
    assert parsed.grant_types == ("authorization_code",)
    assert parsed.scope == "mcp:read mcp:write"
    assert str(parsed.metadata.logo_uri) == "https://client.example/logo.png"


def test_refusal_is_an_invalid_client_error() -> None:
    """A refused document is an MCPGuardError that the endpoints answer as invalid_client."""
    with pytest.raises(ClientMetadataError) as refused:
        parse_document(b"[]", CLIENT_ID)
    assert isinstance(refused.value, MCPGuardError)
    assert (refused.value.error_code, refused.value.status) == ("invalid_client", 400)


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize(
    "claimed",
    [
        CLIENT_ID + "/",
        "https://client.example/OAuth/client.json",
        "https://CLIENT.example/oauth/client.json",
        "HTTPS://client.example/oauth/client.json",
        "https://client.example:443/oauth/client.json",
        "https://client.example/oauth/client.json?",
        "https://other.example/oauth/client.json",
        None,
        ["https://client.example/oauth/client.json"],
    ],
)
def test_client_id_other_than_the_url_refused(claimed: Any) -> None:
    """The document's client_id must equal the URL character for character: no case, slash or port leniency."""
    with pytest.raises(ClientMetadataError, match="does not equal the URL"):
        parse_document(encoded(document(client_id=claimed)), CLIENT_ID)


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize(
    ("members", "rule"),
    [
        ({"client_secret": "s3cret"}, "must not carry a client secret"),
        ({"client_secret_expires_at": 0}, "must not carry a client secret"),
        ({"token_endpoint_auth_method": "client_secret_basic"}, "must be none"),
        ({"token_endpoint_auth_method": "client_secret_post"}, "must be none"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "must be none"),
        ({"token_endpoint_auth_method": None, "client_secret": "s3cret"}, "must not carry a client secret"),
    ],
)
def test_document_with_client_secret_refused(members: dict[str, Any], rule: str) -> None:
    """A public document can neither hold a secret nor ask for a secret-based token endpoint method."""
    with pytest.raises(ClientMetadataError, match=rule):
        parse_document(encoded(document(**members)), CLIENT_ID)


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize(
    "redirect_uris",
    [
        [],
        "https://client.example/cb",
        [7],
        ["http://client.example/cb"],
        ["http://127.0.0.2/cb"],
        ["http://localhost.client.example/cb"],
        ["https://client.example/cb#done"],
        ["https://client.example/cb#"],
        ["/oauth/callback"],
        ["https:///callback"],
        ["https://trusted.example@evil.example/cb"],
        ["javascript:alert(1)"],
        ["com.example.app:/callback"],
        ["https://client.example/c b"],
        ["https://client.example:99999/cb"],
        ["https://client.example/ok", "ftp://client.example/cb"],
    ],
)
def test_bad_redirect_uris_refused(redirect_uris: Any) -> None:
    """Redirect URIs must be a non-empty list of absolute https, or http loopback, URIs without fragment."""
    with pytest.raises(ClientMetadataError, match="redirect"):
        parse_document(encoded(document(redirect_uris=redirect_uris)), CLIENT_ID)


@pytest.mark.threat("T-CIMD-SSRF")
@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"{", "not valid UTF-8 JSON"),
        (b'{"client_id": NaN}', "not valid UTF-8 JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid UTF-8 JSON"),
        (b'"https://client.example/oauth/client.json"', "must be a JSON object"),
        (f'{{"client_id": "{CLIENT_ID}", "client_id": "{CLIENT_ID}"}}'.encode(), "repeats a member"),
    ],
)
def test_malformed_document_refused(body: bytes, rule: str) -> None:
    """Only a UTF-8 JSON object with no repeated member and no NaN or Infinity is read."""
    with pytest.raises(ClientMetadataError, match=rule):
        parse_document(body, CLIENT_ID)


@pytest.mark.parametrize(
    ("members", "field"),
    [
        ({"logo_uri": f"not a url {CANARY}"}, "logo_uri"),
        ({"client_name": [CANARY]}, "client_name"),
        ({"grant_types": CANARY}, "grant_types"),
        ({"application_type": CANARY}, "application_type"),
    ],
)
def test_invalid_field_named_without_quoting_its_value(members: dict[str, Any], field: str) -> None:
    """A field the SDK model rejects is named in the description, and its value never appears there."""
    with pytest.raises(ClientMetadataError, match=f"invalid: {field}") as refused:
        parse_document(encoded(document(**members)), CLIENT_ID)
    assert CANARY not in str(refused.value)
    assert CANARY not in repr(refused.value)
    assert refused.value.__cause__ is None
    assert refused.value.__suppress_context__
