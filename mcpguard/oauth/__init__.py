"""The built-in OAuth 2.1 authorization server that issues access tokens for the guarded MCP resource."""

from __future__ import annotations

from mcpguard.oauth.client_metadata import ClientMetadataDocument, ClientMetadataError, ClientMetadataFetcher
from mcpguard.oauth.signing import AccessTokenIssuer, IssuedToken, SharedSecret, SigningKeys

__all__ = [
    "AccessTokenIssuer",
    "ClientMetadataDocument",
    "ClientMetadataError",
    "ClientMetadataFetcher",
    "IssuedToken",
    "SharedSecret",
    "SigningKeys",
]
