"""Bearer access tokens: a JWT counts only if the configured issuer signed it for this resource."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import numbers
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from jwt.types import Options

from mcpguard.errors import InvalidToken, StorageUnavailable
from mcpguard.json_input import is_text, read_json
from mcpguard.principal import CredentialKind, Principal, is_tenant_name

__all__ = ["GrantCheck", "JWTVerifier", "TokenVerifier", "VerificationKeys"]

GrantCheck: TypeAlias = Callable[[str], Awaitable[bool]]
"""Whether the grant with this id is still live; raises ``StorageUnavailable`` when its store cannot answer."""

_REQUIRED_CLAIMS = ("exp", "iat", "jti", "iss", "aud", "sub")
_NUMERIC_DATES = ("exp", "iat", "nbf")
_PRIVATE_KEYS = (Ed25519PrivateKey, Ed448PrivateKey, EllipticCurvePrivateKey, RSAPrivateKey)
_JWKS_TIMEOUT_SECONDS = 5.0

# Most specific first: InvalidSignatureError is a DecodeError, PyJWKClientConnectionError a PyJWKClientError.
_DESCRIPTIONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience mismatch"),
    (jwt.InvalidIssuerError, "token issuer mismatch"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.InvalidKeyError, "token signing key unusable"),
    (jwt.PyJWKClientError, "token signing key unknown"),
)


@runtime_checkable
class TokenVerifier(Protocol):
    """Turns a bearer token into the principal it proves, or refuses it."""

    async def verify(self, token: str) -> Principal:
        """The principal ``token`` proves; raises ``InvalidToken`` for anything not acceptable."""
        ...


@runtime_checkable
class VerificationKeys(Protocol):
    """A local key set that picks a token's key by its ``kid`` header, asked on every token so a key rotated in
    is used without rebuilding the verifier (``mcpguard.oauth.SigningKeys`` and ``SharedSecret`` are ones).
    """

    def verification_key(self, kid: str | None, /) -> jwt.PyJWK | None:
        """The public key named ``kid``; for no kid, the only key when there is exactly one; else ``None``."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class _Verified:
    principal: Principal
    grant_id: str | None
    # When the token expires (leeway included) and when its cached verification must be redone.
    expires: float
    until: float
    key: Any


class JWTVerifier:
    """Verifies JWT access tokens from one issuer, for one audience, with one key source.

    ``key`` is an HMAC secret when ``algorithms`` are HS*, and otherwise a public key (object, PEM or
    JWK), a ``jwt.PyJWKClient``, or the ``https://`` URL of the issuer's JWKS; or a local
    ``VerificationKeys`` set. With ``grant_check``, every token must name its grant (``gid``) and that grant
    must still be live, asked once per token: a revoked grant stops its access tokens at once.
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_cache",
        "_cache_size",
        "_cache_ttl",
        "_clock",
        "_grant_check",
        "_issuer",
        "_jwks",
        "_key",
        "_key_set",
        "_leeway",
        "_max_token_bytes",
        "_options",
        "_scope_claim",
        "_tenant_claim",
    )

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        key: str | bytes | PublicKeyTypes | jwt.PyJWK | jwt.PyJWKClient | VerificationKeys,
        algorithms: Sequence[str] = ("EdDSA",),
        tenant_claim: str = "tenant",
        scope_claim: str = "scope",
        leeway: float = 30,
        max_token_bytes: int = 8192,
        grant_check: GrantCheck | None = None,
        cache_ttl: float = 60.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("issuer and audience must be non-empty")
        if not tenant_claim or not scope_claim:
            raise ValueError("tenant_claim and scope_claim must be non-empty")
        if leeway < 0 or max_token_bytes <= 0:
            raise ValueError("leeway must be >= 0 and max_token_bytes > 0")
        if cache_ttl < 0 or cache_size < 0:
            raise ValueError("cache_ttl and cache_size must be >= 0 (0 turns the cache off)")
        self._algorithms = _checked_algorithms(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._tenant_claim = tenant_claim
        self._scope_claim = scope_claim
        self._leeway = leeway
        self._max_token_bytes = max_token_bytes
        self._grant_check = grant_check
        # Verified tokens by digest: the signature check is most of a verify, and a token never changes.
        # Expiry and the grant check are still applied on every request; ``cache_ttl`` bounds how long a key
        # retired or removed at the issuer keeps accepting a token it already verified.
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        # Without its grant id a token could not be revoked, so a revocation-checking verifier requires one.
        required = (*_REQUIRED_CLAIMS, tenant_claim, *(("gid",) if grant_check is not None else ()))
        self._options: Options = {
            "require": list(dict.fromkeys(required)),
            "enforce_minimum_key_length": True,
        }
        self._jwks: jwt.PyJWKClient | None = None
        self._key_set: VerificationKeys | None = None
        self._key: Any = None
        if isinstance(key, jwt.PyJWKClient):
            self._jwks = key
        elif isinstance(key, VerificationKeys):
            self._key_set = key
        elif isinstance(key, str) and key.startswith(("https://", "http://")) and not _symmetric(self._algorithms):
            self._jwks = jwt.PyJWKClient(_checked_jwks_url(key), timeout=_JWKS_TIMEOUT_SECONDS)
        else:
            self._key = _prepared_key(key, self._algorithms)

    async def verify(self, token: str) -> Principal:
        """The principal ``token`` proves, or ``InvalidToken`` when it is refused.

        An unreachable JWKS, or a grant store that cannot answer, raises ``StorageUnavailable`` (503): the
        token may be fine, so fail closed.
        """
        # Compared before parsing so an oversized token costs nothing; a non-ASCII one is no JWS at all.
        if len(token) > self._max_token_bytes:
            raise InvalidToken("token too large")
        if not token.isascii():
            raise InvalidToken("token malformed")
        digest = hashlib.sha256(token.encode()).digest()
        verified = self._cache.get(digest)
        now = self._clock()
        if verified is not None and now >= verified.expires:
            del self._cache[digest]
            raise InvalidToken("token expired")
        # A key set is asked again on every hit (a dictionary lookup), so a key retired there ends its tokens.
        if (
            verified is None
            or now >= verified.until
            or (self._key_set is not None and self._local_key(self._key_set, token) is not verified.key)
        ):
            verified = await self._verify_signed(token, until=now + self._cache_ttl)
            if self._cache_ttl and self._cache_size:
                self._cache[digest] = verified
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        # Asked on every request, after the signature and claims hold, so forged tokens never reach the store.
        if self._grant_check is not None and await self._grant_check(verified.grant_id or "") is not True:
            raise InvalidToken("token revoked")
        return verified.principal

    async def _verify_signed(self, token: str, *, until: float) -> _Verified:
        """What a token whose signature and claims hold proves, and until when that may be remembered."""
        # `from None` throughout: library messages can quote token segments, which must not reach logs.
        try:
            key = self._key
            if self._jwks is not None:
                key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            elif self._key_set is not None:
                key = self._local_key(self._key_set, token)
            claims = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.PyJWKClientConnectionError:
            raise StorageUnavailable("token signing keys unavailable") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token missing claim {exc.claim}") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(_describe(exc)) from None
        return _Verified(
            principal=self._principal(claims),
            grant_id=_text(claims, "gid") if self._grant_check is not None else None,
            expires=float(claims["exp"]) + self._leeway,
            until=until,
            key=key,
        )

    @staticmethod
    def _local_key(key_set: VerificationKeys, token: str) -> jwt.PyJWK:
        # The kid is only a lookup key into the set, never a path or URL, so its content cannot steer anything.
        kid = _unverified_kid(token)
        key = key_set.verification_key(kid)
        if key is None:
            raise InvalidToken("token signing key unknown" if kid is not None else "token key id missing")
        return key

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        for name in _NUMERIC_DATES:
            value = claims.get(name)
            # pyjwt coerces with int(), which would also take "123" or true.
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise InvalidToken(f"token claim {name} malformed")
        subject = _text(claims, "sub")
        token_id = _text(claims, "jti")
        client_id = _optional_text(claims, "client_id") or _optional_text(claims, "azp") or subject
        tenant = _text(claims, self._tenant_claim)
        if not is_tenant_name(tenant):
            # Refused, not repaired: whatever the issuer meant, no other tenant may come of it.
            raise InvalidToken(f"token claim {self._tenant_claim} is not a tenant name")
        return Principal(
            tenant=tenant,
            subject=subject,
            # The grant id lets one revocation stop every access token of the grant.
            credential_id=_optional_text(claims, "gid") or token_id,
            client_id=client_id,
            scopes=self._scopes(claims),
            kind=CredentialKind.TOKEN,
        )

    def _scopes(self, claims: Mapping[str, Any]) -> frozenset[str]:
        name = self._scope_claim if self._scope_claim in claims else "scp"
        raw = claims.get(name)
        if raw is None:
            return frozenset()
        if isinstance(raw, str):
            return frozenset(raw.split())
        if isinstance(raw, list) and all(isinstance(scope, str) and scope for scope in raw):
            return frozenset(raw)
        raise InvalidToken("token scope malformed")


def _unverified_kid(token: str) -> str | None:
    # Only the header segment is read: jwt.get_unverified_header would decode and check the whole token,
    # which decode() then does again, and the signature check that follows covers these header bytes.
    try:
        # A header of a few thousand nested brackets is refused like any unreadable one.
        header = read_json(jwt.utils.base64url_decode(token.partition(".")[0]))
    except ValueError:
        raise InvalidToken("token malformed") from None
    if not isinstance(header, dict):
        raise InvalidToken("token malformed")
    kid = header.get("kid")
    if "kid" in header and not isinstance(kid, str):
        raise InvalidToken("token malformed")
    return kid


def _describe(exc: jwt.PyJWTError) -> str:
    for kind, description in _DESCRIPTIONS:
        if isinstance(exc, kind):
            return description
    return "token malformed"


def _text(claims: Mapping[str, Any], name: str) -> str:
    value = _optional_text(claims, name)
    if value is None:
        raise InvalidToken(f"token claim {name} malformed")
    return value


def _optional_text(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or not is_text(value):
        # A lone surrogate escape would reach the identity headers and the audit trail, which cannot hold it.
        raise InvalidToken(f"token claim {name} malformed")
    return value


def _symmetric(algorithms: tuple[str, ...]) -> bool:
    return algorithms[0].startswith("HS")


def _checked_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str):
        raise ValueError("algorithms must be a sequence of names, not one string")
    names = tuple(algorithms)
    if not names:
        raise ValueError("algorithms must name at least one algorithm")
    if any(name.lower() == "none" for name in names):
        raise ValueError('the "none" algorithm is never accepted')
    known = jwt.algorithms.get_default_algorithms()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown algorithms: {', '.join(unknown)}")
    # One key read as an HMAC secret by one algorithm and as a public key by another is the
    # algorithm-confusion attack (RFC 8725 §2.1), so a verifier is either symmetric or not.
    if len({name.startswith("HS") for name in names}) > 1:
        raise ValueError("HS* algorithms cannot be mixed with asymmetric ones in one verifier")
    return names


def _checked_jwks_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return url
    # Keys fetched in the clear could be swapped by anyone on the path; loopback is exempt for local setups.
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError("a JWKS URL must use https (plain http only on loopback)")
    return url


def _prepared_key(key: object, algorithms: tuple[str, ...]) -> Any:
    if _symmetric(algorithms):
        if not isinstance(key, str | bytes):
            raise ValueError("HS* algorithms need a str or bytes shared secret")
        # A URL is public, so taking one as the shared secret would let anyone mint tokens.
        if isinstance(key, str) and key.startswith(("https://", "http://")):
            raise ValueError("HS* algorithms need a shared secret, not a JWKS URL")
    if isinstance(key, jwt.PyJWK):
        if key.algorithm_name not in algorithms:
            raise ValueError(f"the JWK is for {key.algorithm_name}, which algorithms does not allow")
        _check_prepared(key.key, key.Algorithm)
        return key
    prepared: Any = None
    for name in algorithms:
        algorithm = jwt.get_algorithm_by_name(name)
        try:
            prepared = algorithm.prepare_key(key)
        except (jwt.InvalidKeyError, TypeError, ValueError):
            # `from None`: the underlying message could echo secret material.
            raise ValueError(f"the key does not suit {name}") from None
        _check_prepared(prepared, algorithm)
    return prepared


def _check_prepared(prepared: object, algorithm: jwt.algorithms.Algorithm) -> None:
    if isinstance(prepared, _PRIVATE_KEYS):
        raise ValueError("pass the public key: a verifier must not hold the signing key")
    weakness = algorithm.check_key_length(prepared)
    if weakness is not None:
        raise ValueError(weakness)
