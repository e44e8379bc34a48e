"""What a Client ID Metadata Document must say before its client is trusted, and the refusal when it does not.

The document is public, so it describes a public client: its ``client_id`` is its own URL, it
authenticates with PKCE only (no secret), and it redirects only to https or to a loopback host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

import pydantic
from mcp.shared.auth import OAuthClientMetadata

from mcpguard.errors import MCPGuardError
from mcpguard.oauth.redirect_uris import redirect_uri_allowed

__all__ = ["ClientMetadataDocument", "ClientMetadataError", "parse_document"]

# The only token endpoint authentication a public document can describe: none, with PKCE.
_NO_CLIENT_AUTH = "none"


class ClientMetadataError(MCPGuardError):
    """A ``client_id`` URL, or the metadata document it serves, is not acceptable.

    The authorization endpoints answer it as ``invalid_client``. Descriptions name the rule that failed
    and never quote what the client's server sent.
    """

    error_code = "invalid_client"
    status = 400


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientMetadataDocument:
    """A validated client metadata document; ``redirect_uris`` are kept exactly as written, for exact matching."""

    client_id: str
    client_name: str | None
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    response_types: tuple[str, ...]
    token_endpoint_auth_method: str
    scope: str | None
    # The whole document as the ``mcp`` SDK models RFC 7591 client metadata.
    metadata: OAuthClientMetadata


def parse_document(body: bytes, client_id: str) -> ClientMetadataDocument:
    """The document in ``body``, fetched from ``client_id``; raises ``ClientMetadataError`` naming the broken rule."""
    try:
        raw = json.loads(body.decode("utf-8"), object_pairs_hook=_members, parse_constant=_no_constant)
    except _DuplicateMember:
        raise ClientMetadataError("client metadata document repeats a member") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ClientMetadataError("client metadata document is not valid UTF-8 JSON") from None
    if not isinstance(raw, dict):
        raise ClientMetadataError("client metadata document must be a JSON object")
    # Simple string comparison (RFC 3986 §6.2.1), as the draft requires: no normalisation of either side.
    if raw.get("client_id") != client_id:
        raise ClientMetadataError("client_id in the metadata document does not equal the URL it was fetched from")
    if any(name.startswith("client_secret") for name in raw):
        raise ClientMetadataError("a client metadata document is public and must not carry a client secret")
    if raw.get("token_endpoint_auth_method", _NO_CLIENT_AUTH) != _NO_CLIENT_AUTH:
        raise ClientMetadataError("token_endpoint_auth_method must be none: the client proves itself with PKCE")
    redirect_uris = raw.get("redirect_uris")
    if not isinstance(redirect_uris, list) or not redirect_uris or not all(isinstance(u, str) for u in redirect_uris):
        raise ClientMetadataError("redirect_uris must be a non-empty list of strings")
    if not all(redirect_uri_allowed(uri) for uri in redirect_uris):
        raise ClientMetadataError(
            "each redirect URI must be absolute https, or http on localhost, 127.0.0.1 or [::1], without a fragment"
        )
    try:
        metadata = OAuthClientMetadata.model_validate(raw)
    except pydantic.ValidationError as exc:
        # Field names come from the model, never from the document; the offending values are not repeated.
        fields = ", ".join(sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]}))
        raise ClientMetadataError(f"client metadata fields are invalid: {fields or 'document'}") from None
    return ClientMetadataDocument(
        client_id=client_id,
        client_name=metadata.client_name,
        redirect_uris=tuple(redirect_uris),
        grant_types=tuple(metadata.grant_types),
        response_types=tuple(metadata.response_types),
        token_endpoint_auth_method=_NO_CLIENT_AUTH,
        scope=metadata.scope,
        metadata=metadata,
    )


class _DuplicateMember(ValueError):
    pass


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    # A repeated member is read differently by different parsers; refusing it leaves one reading.
    if len(members) != len(pairs):
        raise _DuplicateMember
    return members


def _no_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON (RFC 8259); Python's parser accepts them unless told not to.
    raise ValueError("not JSON")
