"""The built-in authorization server assembled from its parts: what ``MCPGuard(oauth=...)`` takes.

It gives the guard two things: the layer serving the OAuth endpoints, and the verifier that accepts its
access tokens on the resource side (this issuer, this resource as audience, and a live grant, asked of
the store on every request so that a revocation cuts access at once).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from starlette.types import ASGIApp

from mcpguard.oauth.authorize import Authorizer
from mcpguard.oauth.clients import ClientRegistry, MetadataDocuments
from mcpguard.oauth.server import AuthorizationServer
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.oauth.signing import AccessTokenIssuer, SharedSecret, SigningKeys
from mcpguard.oauth.tokens_endpoint import TokenEndpoint
from mcpguard.oauth.users import Authenticator
from mcpguard.ratelimit import FailedAuthLimiter
from mcpguard.stores.base import ClientStore, CodeStore, GrantStore
from mcpguard.tokens import JWTVerifier

__all__ = ["BuiltInAuthorizationServer", "OAuthStore"]

# The consent forms' MAC key is derived from the signing keys, so every replica sharing them accepts them.
_FORM_LABEL = b"mcpguard consent forms"


class OAuthStore(ClientStore, CodeStore, GrantStore, Protocol):
    """What the authorization server keeps: clients, codes, and grants with their refresh families."""


class BuiltInAuthorizationServer:
    """An OAuth 2.1 authorization server for the guarded resource, signing with ``keys``.

    ``documents`` enables Client ID Metadata Documents (a ``ClientMetadataFetcher``); without it an https
    ``client_id`` is unknown.
    """

    def __init__(
        self,
        settings: OAuthSettings,
        *,
        store: OAuthStore,
        keys: SigningKeys | SharedSecret,
        authenticator: Authenticator,
        documents: MetadataDocuments | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._store = store
        self._keys = keys
        self._clock = clock
        self._documents = documents is not None and settings.client_metadata_documents
        self.clients = ClientRegistry(
            settings, store, documents=documents, clock=lambda: datetime.fromtimestamp(clock(), UTC)
        )
        self.issuer = AccessTokenIssuer(
            settings.origin,
            keys,
            lifetime=settings.access_token_lifetime,
            clock=lambda: datetime.fromtimestamp(clock(), UTC),
        )
        self.authorizer = Authorizer(
            settings, self.clients, store, authenticator, form_key=lambda: keys.derive(_FORM_LABEL), clock=clock
        )
        self.verifier = JWTVerifier(
            issuer=settings.origin,
            audience=settings.resource,
            key=keys,
            algorithms=(keys.algorithm,),
            grant_check=self._grant_live,
        )
        self.tokens = TokenEndpoint(
            settings, self.clients, store, store, self.issuer, self.verifier, active=authenticator.active, clock=clock
        )

    async def _grant_live(self, grant_id: str) -> bool:
        grant = await self._store.get_grant(grant_id)
        if grant is None or grant.revoked_at is not None:
            return False
        return grant.expires_at > datetime.fromtimestamp(self._clock(), UTC)

    def layer(
        self, *, failed_auth: FailedAuthLimiter, trusted_proxies: frozenset[str] = frozenset()
    ) -> Callable[[ASGIApp], ASGIApp]:
        """The guard's authorization-server slot: serves the endpoints in front of ``app``; ``failed_auth``
        limits sign-in attempts (and registrations) per client address."""
        jwks = self._keys.jwks if isinstance(self._keys, SigningKeys) else None

        def wrap(app: ASGIApp) -> ASGIApp:
            return AuthorizationServer(
                app,
                self.settings,
                clients=self.clients,
                authorizer=self.authorizer,
                tokens=self.tokens,
                jwks=jwks,
                failed_auth=failed_auth,
                trusted_proxies=trusted_proxies,
                documents=self._documents,
            )

        return wrap
