"""Access tokens of the built-in authorization server: short-lived JWTs for one resource that name their grant,
signed by the rotating Ed25519 ``SigningKeys`` or, for a single service, an HS256 ``SharedSecret``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from mcpguard.oauth.signing_keys import SigningKeys

__all__ = ["MAX_ACCESS_TOKEN_LIFETIME", "AccessTokenIssuer", "IssuedToken", "SharedSecret", "SigningKeys"]

MAX_ACCESS_TOKEN_LIFETIME = timedelta(hours=1)
_MIN_SECRET_BYTES = 32


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SharedSecret:
    """One HS256 secret shared by the issuer and the single service that verifies its tokens; it has no JWKS.

    Usable as the ``key`` of a ``JWTVerifier`` with ``algorithms=["HS256"]``.
    """

    algorithm = "HS256"

    __slots__ = ("_jwk", "_secret")

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        # RFC 7518 §3.2: an HS256 key shorter than the hash output weakens it.
        if len(raw) < _MIN_SECRET_BYTES:
            raise ValueError(f"the shared secret must be at least {_MIN_SECRET_BYTES} bytes")
        self._secret = raw
        self._jwk = jwt.PyJWK({"kty": "oct", "k": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}, "HS256")

    def __repr__(self) -> str:
        return "SharedSecret(algorithm='HS256')"

    def sign(self, claims: Mapping[str, Any]) -> str:
        """``claims`` as a compact JWS under this secret."""
        return jwt.encode(dict(claims), self._secret, algorithm="HS256", headers={"typ": "at+jwt"})

    def derive(self, label: bytes) -> bytes:
        """A secret for ``label`` derived from this one, alike in every process that shares it."""
        return hmac.new(self._secret, label, hashlib.sha256).digest()

    def verification_key(self, kid: str | None, /) -> jwt.PyJWK | None:
        """The secret as a key for tokens without a ``kid`` (the only kind it signs); ``None`` for any kid."""
        return self._jwk if kid is None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedToken:
    """An access token as the token endpoint answers with it."""

    token: str = field(repr=False)
    jti: str
    expires_at: datetime
    expires_in: int


class AccessTokenIssuer:
    """Mints the access tokens of one issuer: ``iss``, ``aud`` (the resource, RFC 8707), ``sub``, ``tenant``,
    ``scope``, ``client_id``, ``gid`` (the grant), a random ``jti``, ``iat`` and ``exp``.
    """

    __slots__ = ("_clock", "_issuer", "_keys", "_lifetime")

    def __init__(
        self,
        issuer: str,
        keys: SigningKeys | SharedSecret,
        *,
        lifetime: timedelta = timedelta(minutes=10),
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not issuer:
            raise ValueError("issuer must be non-empty")
        # A bearer token cannot be recalled once issued, so only a short life bounds the harm of a leaked one.
        if not timedelta(seconds=1) <= lifetime <= MAX_ACCESS_TOKEN_LIFETIME:
            raise ValueError(f"lifetime must be between 1 second and {MAX_ACCESS_TOKEN_LIFETIME}")
        self._issuer = issuer
        self._keys = keys
        self._lifetime = int(lifetime.total_seconds())
        self._clock = clock

    def __repr__(self) -> str:
        return f"AccessTokenIssuer(issuer={self._issuer!r}, keys={self._keys!r}, lifetime={self._lifetime}s)"

    def issue(
        self,
        *,
        audience: str,
        subject: str,
        tenant: str,
        scopes: Iterable[str],
        client_id: str,
        grant_id: str,
    ) -> IssuedToken:
        """A signed access token for ``subject`` in ``tenant`` to call ``audience`` with ``scopes``."""
        for name, value in (
            ("audience", audience),
            ("subject", subject),
            ("tenant", tenant),
            ("client_id", client_id),
            ("grant_id", grant_id),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if isinstance(scopes, str):
            raise ValueError("scopes must be an iterable of scope names, not one string")
        granted = tuple(dict.fromkeys(scopes))
        if not all(isinstance(scope, str) and scope.split() == [scope] for scope in granted):
            raise ValueError("each scope must be one non-empty name without spaces")
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        issued_at = int(now.timestamp())
        expires = issued_at + self._lifetime
        jti = secrets.token_urlsafe(16)
        token = self._keys.sign(
            {
                "iss": self._issuer,
                "aud": audience,
                "sub": subject,
                "tenant": tenant,
                "scope": " ".join(granted),
                "client_id": client_id,
                "gid": grant_id,
                "jti": jti,
                "iat": issued_at,
                "exp": expires,
            }
        )
        return IssuedToken(
            token=token,
            jti=jti,
            expires_at=datetime.fromtimestamp(expires, UTC),
            expires_in=self._lifetime,
        )
