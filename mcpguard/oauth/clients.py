"""Which clients exist and how they prove it: dynamic registration (RFC 7591), clients from configuration,
and Client ID Metadata Documents (an https ``client_id`` naming its own metadata), all seen as one ``Client``.

Redirect URIs are compared exactly as registered: no normalisation, no prefix or port leniency. A
registered one is https, or http on a loopback host for native apps, and never has a fragment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote

from mcpguard.errors import InvalidClient, OAuthError
from mcpguard.oauth.discovery import CLIENT_AUTH_METHODS
from mcpguard.oauth.redirect_uris import redirect_uri_allowed
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.stores.base import ClientRecord, ClientStore

__all__ = ["Client", "ClientRegistry", "MetadataDocuments"]

_GRANT_TYPES = frozenset({"authorization_code", "refresh_token"})
_MAX_REDIRECT_URIS = 20
_MAX_NAME_LENGTH = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """A client as every endpoint sees it, wherever it was registered."""

    client_id: str
    client_name: str | None
    redirect_uris: tuple[str, ...]
    auth_method: str
    # SHA-256 hex of a confidential client's secret (the secret itself is never kept).
    secret_sha256: str | None = None
    # Registered by the operator: its redirect URIs are trusted with error redirects (RFC 9700 §4.11.2).
    configured: bool = False
    # The grants it registered (RFC 7591 §2); without refresh_token it is given no refresh token.
    grant_types: tuple[str, ...] = ("authorization_code", "refresh_token")

    @property
    def refreshes(self) -> bool:
        """Whether this client registered the refresh_token grant."""
        return "refresh_token" in self.grant_types

    def __repr__(self) -> str:
        return f"Client(client_id={self.client_id!r}, client_name={self.client_name!r}, auth={self.auth_method!r})"


class MetadataDocuments(Protocol):
    """Fetches and validates a Client ID Metadata Document (see ``ClientMetadataFetcher``)."""

    async def fetch(self, client_id: str) -> Any:
        """The validated document at ``client_id``; raises an ``MCPGuardError`` when it is refused."""
        ...


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _text(metadata: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = metadata.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise OAuthError("invalid_client_metadata", f"{name} must be a string of at most {limit} characters")
    return value


class ClientRegistry:
    """Registers clients and finds the one a request names, from configuration, the store or its URL."""

    def __init__(
        self,
        settings: OAuthSettings,
        store: ClientStore,
        *,
        documents: MetadataDocuments | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._store = store
        self._documents = documents if settings.client_metadata_documents else None
        self._clock = clock
        self._configured = {
            c.client_id: Client(
                client_id=c.client_id,
                client_name=c.client_name,
                redirect_uris=c.redirect_uris,
                auth_method="client_secret_post" if c.client_secret_sha256 else "none",
                secret_sha256=c.client_secret_sha256,
                configured=True,
            )
            for c in settings.clients
        }

    async def register(self, metadata: Any) -> dict[str, Any]:
        """Register a client from its RFC 7591 metadata; the answer holds its id (and secret, shown once)."""
        if not self._settings.dynamic_registration:
            raise OAuthError("access_denied", "dynamic client registration is disabled on this server")
        if not isinstance(metadata, dict):
            raise OAuthError("invalid_client_metadata", "the registration body must be a JSON object")
        redirect_uris = metadata.get("redirect_uris")
        if (
            not isinstance(redirect_uris, list)
            or not 0 < len(redirect_uris) <= _MAX_REDIRECT_URIS
            or not all(isinstance(u, str) for u in redirect_uris)
        ):
            raise OAuthError("invalid_redirect_uri", f"redirect_uris must list 1 to {_MAX_REDIRECT_URIS} URIs")
        refused = [u for u in redirect_uris if not redirect_uri_allowed(u)]
        if refused:
            raise OAuthError(
                "invalid_redirect_uri", "each redirect URI must be https, or http on localhost, without a fragment"
            )
        method = metadata.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in CLIENT_AUTH_METHODS:
            raise OAuthError(
                "invalid_client_metadata", f"token_endpoint_auth_method must be one of {CLIENT_AUTH_METHODS}"
            )
        grant_types = metadata.get("grant_types", ["authorization_code"])
        if not isinstance(grant_types, list) or not all(isinstance(g, str) and g in _GRANT_TYPES for g in grant_types):
            raise OAuthError("invalid_client_metadata", "grant_types may only be authorization_code and refresh_token")
        response_types = metadata.get("response_types", ["code"])
        if response_types != ["code"]:
            raise OAuthError("invalid_client_metadata", 'response_types must be ["code"]')
        name = _text(metadata, "client_name", _MAX_NAME_LENGTH)
        application_type = metadata.get("application_type", "web")
        if application_type not in ("web", "native"):
            raise OAuthError("invalid_client_metadata", "application_type must be web or native")
        client_id = "mc_" + secrets.token_urlsafe(18)
        secret = None if method == "none" else "mcs_" + secrets.token_urlsafe(32)
        issued_at = self._clock()
        registered: dict[str, Any] = {
            "client_id": client_id,
            "client_id_issued_at": int(issued_at.timestamp()),
            "redirect_uris": list(redirect_uris),
            "token_endpoint_auth_method": method,
            "grant_types": list(grant_types),
            "response_types": ["code"],
            "application_type": application_type,
        }
        if name is not None:
            registered["client_name"] = name
        record = ClientRecord(
            client_id=client_id,
            client_secret_hash=_sha256(secret) if secret is not None else None,
            metadata=json.dumps(registered, separators=(",", ":")),
            created_at=issued_at,
        )
        await self._store.add_client(record)
        if secret is not None:
            registered |= {"client_secret": secret, "client_secret_expires_at": 0}
        return registered

    async def find(self, client_id: str) -> Client | None:
        """The client ``client_id`` names, or ``None`` when there is none."""
        configured = self._configured.get(client_id)
        if configured is not None:
            return configured
        if client_id.startswith("https://"):
            if self._documents is None:
                return None
            document = await self._documents.fetch(client_id)
            return Client(
                client_id=client_id,
                client_name=document.client_name,
                redirect_uris=tuple(document.redirect_uris),
                auth_method="none",
                grant_types=document.grant_types,
            )
        record = await self._store.get_client(client_id)
        if record is None:
            return None
        metadata = json.loads(record.metadata)
        return Client(
            client_id=record.client_id,
            client_name=metadata.get("client_name"),
            redirect_uris=tuple(metadata["redirect_uris"]),
            auth_method=metadata["token_endpoint_auth_method"],
            secret_sha256=record.client_secret_hash,
            # RFC 7591 §2: a registration that named no grant types registered authorization_code alone.
            grant_types=tuple(metadata.get("grant_types", ["authorization_code"])),
        )

    async def authenticate(self, form: Mapping[str, str], authorization: str | None) -> Client:
        """The client a token or revocation request comes from, proven as it registered (RFC 6749 §2.3)."""
        basic = authorization is not None and authorization[:6].lower() == "basic "
        secret: str | None
        if authorization is not None and basic:
            client_id, secret = _basic_credentials(authorization[6:])
            if form.get("client_id") not in (None, client_id):
                raise InvalidClient("client_id in the body disagrees with the Authorization header", basic=True)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if not client_id:
            raise InvalidClient("client_id is required")
        client = await self.find(client_id)
        if client is None:
            raise InvalidClient("unknown client", basic=basic)
        if client.secret_sha256 is None:
            if secret is not None:
                raise InvalidClient("this client is public and has no secret", basic=basic)
            return client
        if secret is None or not hmac.compare_digest(_sha256(secret), client.secret_sha256):
            raise InvalidClient("client authentication failed", basic=basic)
        return client


def _basic_credentials(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials", basic=True) from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise InvalidClient("malformed Basic credentials", basic=True)
    # RFC 6749 §2.3.1: both parts are form-encoded before being joined.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
