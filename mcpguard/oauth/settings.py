"""How the built-in authorization server behaves: one frozen dataclass, validated as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

from mcpguard.config import ConfigError
from mcpguard.oauth.redirect_uris import redirect_uri_allowed
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE

__all__ = ["OAuthSettings", "PreregisteredClient"]

MAX_CODE_LIFETIME = timedelta(seconds=60)
MAX_GRACE = timedelta(seconds=60)
MAX_ACCESS_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class PreregisteredClient:
    """A client the operator registered in configuration (a hosted assistant with a fixed callback list)."""

    client_id: str
    redirect_uris: tuple[str, ...]
    client_name: str | None = None
    # A confidential client's secret, as its SHA-256 hex digest; ``None`` for a public client (PKCE only).
    client_secret_sha256: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthSettings:
    """The authorization server's issuer, the one resource it issues tokens for, and its lifetimes.

    ``issuer`` is an origin (RFC 8414 issuer identifiers are compared exactly); ``resource`` is the MCP
    endpoint's URL, the only RFC 8707 resource accepted and every access token's ``aud``.
    """

    issuer: str
    resource: str
    scopes_supported: tuple[str, ...] = (READ, WRITE, ADMIN, AUDIT)
    default_scopes: tuple[str, ...] = (READ,)
    code_lifetime: timedelta = timedelta(seconds=60)
    access_token_lifetime: timedelta = timedelta(minutes=10)
    refresh_lifetime: timedelta = timedelta(days=30)
    # Off by default (RFC 9700 §4.14.2): a rotated refresh token presented again revokes its family.
    refresh_grace: timedelta = timedelta(0)
    dynamic_registration: bool = True
    client_metadata_documents: bool = True
    clients: tuple[PreregisteredClient, ...] = field(default=())

    def __post_init__(self) -> None:
        problems: list[str] = []
        issuer = urlsplit(self.issuer)
        if (
            issuer.scheme not in ("http", "https")
            or not issuer.netloc
            or issuer.path not in ("", "/")
            or issuer.query
            or issuer.fragment
        ):
            problems.append("issuer must be an http(s) origin without path, query or fragment")
        resource = urlsplit(self.resource)
        if resource.scheme not in ("http", "https") or not resource.netloc or resource.query or resource.fragment:
            problems.append("resource must be an absolute http(s) URL without query or fragment")
        if not timedelta(0) < self.code_lifetime <= MAX_CODE_LIFETIME:
            problems.append("code_lifetime must be more than 0 and at most 60 seconds")
        if not timedelta(0) < self.access_token_lifetime <= MAX_ACCESS_LIFETIME:
            problems.append("access_token_lifetime must be more than 0 and at most 1 hour")
        if self.refresh_lifetime <= timedelta(0):
            problems.append("refresh_lifetime must be more than 0")
        if not timedelta(0) <= self.refresh_grace <= MAX_GRACE:
            problems.append("refresh_grace must be between 0 (off) and 60 seconds")
        unknown = set(self.default_scopes) - set(self.scopes_supported)
        if unknown or not self.default_scopes:
            problems.append("default_scopes must be a non-empty subset of scopes_supported")
        seen: set[str] = set()
        for client in self.clients:
            if not client.client_id or client.client_id in seen:
                problems.append(f"preregistered client ids must be unique and non-empty, got {client.client_id!r}")
            seen.add(client.client_id)
            if not client.redirect_uris:
                problems.append(f"preregistered client {client.client_id!r} needs at least one redirect URI")
            if not all(redirect_uri_allowed(uri) for uri in client.redirect_uris):
                problems.append(
                    f"preregistered client {client.client_id!r}: each redirect URI must be https, or http on a"
                    " loopback host, without a fragment or user info"
                )
        if problems:
            raise ConfigError(problems)

    @property
    def origin(self) -> str:
        """``issuer`` without a trailing slash: how the issuer is written everywhere."""
        return self.issuer.rstrip("/")
