"""RFC 8414 authorization-server metadata: where a client learns every endpoint and what each accepts."""

from __future__ import annotations

from typing import Any

from mcpguard.oauth.settings import OAuthSettings

__all__ = [
    "AUTHORIZE_PATH",
    "JWKS_PATH",
    "METADATA_PATHS",
    "REGISTER_PATH",
    "REVOKE_PATH",
    "TOKEN_PATH",
    "authorization_server_metadata",
]

AUTHORIZE_PATH = "/authorize"
TOKEN_PATH = "/token"  # noqa: S105 - an endpoint path, not a secret
REGISTER_PATH = "/register"
REVOKE_PATH = "/oauth/revoke"
JWKS_PATH = "/jwks.json"
# RFC 8414 §3, and the OpenID discovery path that MCP clients also try (MCP authorization, 2025-11-25).
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
CLIENT_AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")


def authorization_server_metadata(settings: OAuthSettings, *, jwks: bool, documents: bool) -> dict[str, Any]:
    """The metadata document; ``jwks`` says whether tokens are signed with published public keys, ``documents``
    whether Client ID Metadata Documents are fetched (advertised only when they are, or clients would use
    an https client id that is then unknown)."""
    origin = settings.origin
    document: dict[str, Any] = {
        "issuer": origin,
        "authorization_endpoint": origin + AUTHORIZE_PATH,
        "token_endpoint": origin + TOKEN_PATH,
        "revocation_endpoint": origin + REVOKE_PATH,
        "scopes_supported": list(settings.scopes_supported),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(CLIENT_AUTH_METHODS),
        "code_challenge_methods_supported": ["S256"],
        # RFC 9207: authorization responses carry `iss`, so a client can tell which server answered.
        "authorization_response_iss_parameter_supported": True,
        "client_id_metadata_document_supported": settings.client_metadata_documents and documents,
    }
    if settings.dynamic_registration:
        document["registration_endpoint"] = origin + REGISTER_PATH
    if jwks:
        document["jwks_uri"] = origin + JWKS_PATH
    return document
