"""``/token`` (authorization code and refresh grants) and ``/oauth/revoke`` (RFC 7009).

The code is consumed before anything else is checked, so a wrong PKCE verifier or redirect URI burns
it; a code presented again revokes the grant it created. Refresh tokens rotate on every use in one
store call; a rotated token presented again (outside the optional grace window) revokes its whole
family, refresh and access tokens alike. Scope never widens on refresh and the resource never changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from mcpguard.errors import InvalidToken, OAuthError
from mcpguard.oauth.clients import Client, ClientRegistry
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.oauth.signing import AccessTokenIssuer
from mcpguard.principal import CredentialKind, Principal
from mcpguard.stores.base import (
    CodeOutcome,
    CodeStore,
    GrantRecord,
    GrantStore,
    RotationOutcome,
)
from mcpguard.tokens import TokenVerifier

__all__ = ["TokenEndpoint", "hash_secret"]

# Replays seen before their grant existed, remembered only as long as an exchange could still be under way.
_REPLAYED_KEPT = 1024
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def hash_secret(value: str) -> str:
    """How codes and refresh tokens are kept: their SHA-256 (they carry 256 random bits, so no salt or stretch)."""
    return hashlib.sha256(value.encode()).hexdigest()


def _pkce_matches(verifier: str, challenge: str) -> bool:
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return hmac.compare_digest(digest, challenge)


def principal_of(grant: GrantRecord) -> Principal:
    """The grant as an audit trail names it: its tenant, subject, client, and the grant as the credential."""
    return Principal(
        tenant=grant.tenant,
        subject=grant.subject,
        credential_id=grant.grant_id,
        client_id=grant.client_id,
        scopes=frozenset(grant.scopes),
        kind=CredentialKind.TOKEN,
    )


class TokenEndpoint:
    """Issues and revokes tokens; ``seen`` is told the grant a request concerns, for the audit trail."""

    def __init__(
        self,
        settings: OAuthSettings,
        clients: ClientRegistry,
        codes: CodeStore,
        grants: GrantStore,
        issuer: AccessTokenIssuer,
        access_tokens: TokenVerifier,
        *,
        active: Callable[[str, str], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        # Whether the grant's account may still act in its tenant (a disabled user's grants stop refreshing).
        self._active = active
        # Grants whose code was replayed before the first exchange had stored them: that exchange revokes them.
        self._replayed: OrderedDict[str, None] = OrderedDict()
        self._clients = clients
        self._codes = codes
        self._grants = grants
        self._issuer = issuer
        self._access_tokens = access_tokens
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def token(
        self, form: Mapping[str, str], authorization: str | None, seen: Callable[[GrantRecord], None]
    ) -> dict[str, Any]:
        """The token response for ``form`` or an ``OAuthError``/``InvalidClient``."""
        client = await self._clients.authenticate(form, authorization)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return await self._exchange_code(client, form, seen)
        if grant_type == "refresh_token":
            return await self._refresh(client, form, seen)
        raise OAuthError("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")

    async def _exchange_code(
        self, client: Client, form: Mapping[str, str], seen: Callable[[GrantRecord], None]
    ) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", "code is required")
        now = self._now()
        consumed = await self._codes.consume_code(hash_secret(code), now)
        record = consumed.record
        if consumed.outcome is CodeOutcome.REPLAYED and record is not None:
            revoked = await self._grants.revoke_grant(record.grant_id, now, "code_replay")
            if revoked is not None:
                seen(revoked)
            else:
                self._replayed[record.grant_id] = None
                if len(self._replayed) > _REPLAYED_KEPT:
                    self._replayed.popitem(last=False)
            raise OAuthError(
                "invalid_grant",
                "this code was already used; the tokens issued from it are revoked",
                audit_reason="replay",
            )
        if consumed.outcome is not CodeOutcome.FRESH or record is None:
            raise OAuthError("invalid_grant", "the code is unknown or expired")
        # The code is spent from here on, whatever is wrong with the rest of the request.
        if not hmac.compare_digest(record.client_id, client.client_id):
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not _VERIFIER.fullmatch(verifier) or not _pkce_matches(verifier, record.code_challenge):
            raise OAuthError("invalid_grant", "the PKCE code_verifier does not match the code_challenge")
        resource = form.get("resource")
        if resource is not None and resource != record.resource:
            raise OAuthError("invalid_target", "resource differs from the authorization request")
        grant = GrantRecord(
            grant_id=record.grant_id,
            tenant=record.tenant,
            subject=record.subject,
            client_id=record.client_id,
            scopes=record.scopes,
            resource=record.resource,
            created_at=now,
            expires_at=now + self._settings.refresh_lifetime,
            revoked_at=None,
            revoked_reason=None,
            generation=0,
        )
        await self._require_active(grant.subject, grant.tenant)
        refresh = self._new_refresh_token()
        await self._grants.add_grant(grant, hash_secret(refresh))
        seen(grant)
        if grant.grant_id in self._replayed:
            # The code was replayed while this exchange was under way: what it issued must not live.
            del self._replayed[grant.grant_id]
            await self._grants.revoke_grant(grant.grant_id, now, "code_replay")
            raise OAuthError("invalid_grant", "this code was used twice; the tokens issued from it are revoked")
        # A client that did not register the refresh grant gets none; its grant still ends with its access tokens.
        return self._response(grant, grant.scopes, refresh if client.refreshes else None)

    async def _refresh(
        self, client: Client, form: Mapping[str, str], seen: Callable[[GrantRecord], None]
    ) -> dict[str, Any]:
        if not client.refreshes:
            raise OAuthError("unauthorized_client", "this client did not register the refresh_token grant")
        presented = form.get("refresh_token")
        if not presented:
            raise OAuthError("invalid_request", "refresh_token is required")
        # Which family first, so another client presenting a stolen token rotates nothing.
        family = await self._grants.grant_for_refresh(hash_secret(presented))
        if family is None or not hmac.compare_digest(family.client_id, client.client_id):
            raise OAuthError("invalid_grant", "the refresh token is unknown or was issued to another client")
        seen(family)
        await self._require_active(family.subject, family.tenant)
        resource = form.get("resource")
        if resource is not None and resource != family.resource:
            raise OAuthError("invalid_target", "resource must stay the one the grant was made for")
        asked = tuple(dict.fromkeys(form.get("scope", "").split()))
        if asked and not set(asked) <= set(family.scopes):
            raise OAuthError("invalid_scope", "a refresh cannot widen the grant's scope")
        successor = self._new_refresh_token()
        rotation = await self._grants.rotate_refresh(
            hash_secret(presented), hash_secret(successor), self._now(), self._settings.refresh_grace
        )
        if rotation.outcome is RotationOutcome.REUSE_REVOKED:
            raise OAuthError(
                "invalid_grant", "this refresh token was already used; the grant is revoked", audit_reason="replay"
            )
        if rotation.outcome not in (RotationOutcome.ROTATED, RotationOutcome.GRACE_REISSUED) or rotation.grant is None:
            raise OAuthError("invalid_grant", "the refresh token is revoked or expired")
        return self._response(rotation.grant, asked or rotation.grant.scopes, successor)

    async def _require_active(self, subject: str, tenant: str) -> None:
        if self._active is not None and not await self._active(subject, tenant):
            raise OAuthError("invalid_grant", "the account behind this grant is disabled or no longer in its tenant")

    def _new_refresh_token(self) -> str:
        return "mcr_" + secrets.token_urlsafe(32)

    def _response(self, grant: GrantRecord, scopes: tuple[str, ...], refresh: str | None) -> dict[str, Any]:
        issued = self._issuer.issue(
            audience=grant.resource,
            subject=grant.subject,
            tenant=grant.tenant,
            scopes=scopes,
            client_id=grant.client_id,
            grant_id=grant.grant_id,
        )
        answer: dict[str, Any] = {
            "access_token": issued.token,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": " ".join(scopes),
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    async def revoke(
        self, form: Mapping[str, str], authorization: str | None, seen: Callable[[GrantRecord], None]
    ) -> None:
        """RFC 7009: end the grant behind an access or refresh token of this client; unknown tokens are no error."""
        client = await self._clients.authenticate(form, authorization)
        token = form.get("token")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        grant_id: str | None = None
        family = await self._grants.grant_for_refresh(hash_secret(token))
        if family is not None:
            grant_id = family.grant_id if family.client_id == client.client_id else None
        else:
            try:
                principal = await self._access_tokens.verify(token)
            except InvalidToken:
                return  # not ours, expired or already revoked: nothing left to end (RFC 7009 §2.2)
            if principal.client_id == client.client_id:
                grant_id = principal.credential_id
        if grant_id is None:
            return
        revoked = await self._grants.revoke_grant(grant_id, self._now(), "revoked")
        if revoked is not None:
            seen(revoked)
