"""AccessTokenIssuer and SharedSecret: tokens issued with every claim, verified, and refused when they should be."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard.errors import InvalidToken
from mcpguard.oauth import AccessTokenIssuer, IssuedToken, SharedSecret, SigningKeys
from mcpguard.principal import CredentialKind, Principal
from mcpguard.tokens import JWTVerifier, VerificationKeys
from tests.oauth.conftest import Clock

ISSUER = "https://auth.example.test"
AUDIENCE = "https://mcp.example.test/mcp"
SECRET = b"0123456789abcdef0123456789abcdef-test-only"
GRANT: dict[str, Any] = {
    "audience": AUDIENCE,
    "subject": "user-1",
    "tenant": "acme",
    "scopes": ("mcp:read", "mcp:write"),
    "client_id": "client-1",
    "grant_id": "grant-1",
}


def issuer_for(keys: SigningKeys | SharedSecret, clock: Clock, issuer: str = ISSUER) -> AccessTokenIssuer:
    return AccessTokenIssuer(issuer, keys, clock=clock)


def verifier_for(keys: SigningKeys | SharedSecret, **options: Any) -> JWTVerifier:
    return JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=keys, algorithms=[keys.algorithm], **options)


def issue(keys: SigningKeys | SharedSecret, clock: Clock, **overrides: Any) -> IssuedToken:
    return issuer_for(keys, clock).issue(**(GRANT | overrides))


def verify(verifier: JWTVerifier, token: str) -> Principal:
    return asyncio.run(verifier.verify(token))


def refusal(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verify(verifier, token)
    assert token not in info.value.description
    return info.value.description


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def payload(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def forged(header: dict[str, Any], claims: dict[str, Any], key: Ed25519PrivateKey | None = None) -> str:
    """A JWS with exactly ``header``, signed by ``key`` (another party's) or unsigned."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = key.sign(signing_input.encode()) if key is not None else b""
    return f"{signing_input}.{b64(signature)}"


def test_eddsa_round_trip(keys: SigningKeys, clock: Clock) -> None:
    """An issued EdDSA token carries every claim, names its key by kid, and verifies into the grant's principal."""
    issued = issue(keys, clock)
    assert issued.expires_in == 600
    assert issued.expires_at == clock.now + timedelta(minutes=10)
    header = jwt.get_unverified_header(issued.token)
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": keys.current_kid}
    claims = payload(issued.token)
    assert claims == {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "tenant": "acme",
        "scope": "mcp:read mcp:write",
        "client_id": "client-1",
        "gid": "grant-1",
        "jti": issued.jti,
        "iat": int(clock.now.timestamp()),
        "exp": int(clock.now.timestamp()) + 600,
    }
    assert verify(verifier_for(keys), issued.token) == Principal(
        tenant="acme",
        subject="user-1",
        credential_id="grant-1",
        client_id="client-1",
        scopes=frozenset({"mcp:read", "mcp:write"}),
        kind=CredentialKind.TOKEN,
    )


def test_hs256_round_trip(clock: Clock) -> None:
    """With a shared secret the token is HS256 without a kid, and a verifier holding the secret accepts it."""
    secret = SharedSecret(SECRET)
    issued = issue(secret, clock)
    assert jwt.get_unverified_header(issued.token) == {"alg": "HS256", "typ": "at+jwt"}
    assert verify(verifier_for(secret), issued.token).credential_id == "grant-1"
    plain = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=SECRET, algorithms=["HS256"])
    assert verify(plain, issued.token).tenant == "acme"


def test_each_token_has_its_own_jti(keys: SigningKeys, clock: Clock) -> None:
    """Two tokens of one grant differ in jti, so each can be told apart in the audit trail."""
    assert issue(keys, clock).jti != issue(keys, clock).jti


def test_key_sets_satisfy_the_verifier_protocol(keys: SigningKeys) -> None:
    """Both signing modes can be handed to JWTVerifier as a local key set."""
    assert isinstance(keys, VerificationKeys)
    assert isinstance(SharedSecret(SECRET), VerificationKeys)


@pytest.mark.threat("T-TOKEN-FORGE")
def test_short_shared_secret_refused() -> None:
    """A shared secret under 32 bytes is refused, and the secret never shows in a repr."""
    with pytest.raises(ValueError, match="32 bytes"):
        SharedSecret(SECRET[:31])
    secret = SharedSecret(SECRET.decode())
    issuer = AccessTokenIssuer(ISSUER, secret)
    for text in (repr(secret), repr(issuer)):
        assert SECRET.decode() not in text
        assert b64(SECRET) not in text


def test_lifetime_is_capped_at_one_hour(keys: SigningKeys, clock: Clock) -> None:
    """A lifetime up to one hour is taken and stamped into exp; a longer or sub-second one is a ValueError."""
    issued = AccessTokenIssuer(ISSUER, keys, lifetime=timedelta(hours=1), clock=clock).issue(**GRANT)
    assert issued.expires_in == 3600
    assert payload(issued.token)["exp"] - payload(issued.token)["iat"] == 3600
    for lifetime in (timedelta(hours=1, seconds=1), timedelta(0), timedelta(milliseconds=500)):
        with pytest.raises(ValueError, match="lifetime"):
            AccessTokenIssuer(ISSUER, keys, lifetime=lifetime)


@pytest.mark.parametrize(
    "overrides",
    [{"subject": ""}, {"grant_id": ""}, {"scopes": "mcp:read"}, {"scopes": ["mcp:read mcp:admin"]}, {"scopes": [""]}],
)
def test_issue_checks_its_arguments(keys: SigningKeys, clock: Clock, overrides: dict[str, Any]) -> None:
    """An empty claim value or a scope list that is one string or holds a spaced name is a ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message; any refusal will do
        issue(keys, clock, **overrides)


def test_naive_clock_is_an_error(keys: SigningKeys) -> None:
    """A clock without a timezone would stamp local time as UTC, so the issuer will not use it."""
    issuer = AccessTokenIssuer(ISSUER, keys, clock=lambda: datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="timezone"):
        issuer.issue(**GRANT)


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_token_for_another_audience_or_issuer_refused(keys: SigningKeys, clock: Clock) -> None:
    """Our own signature does not save a token minted for another resource or under another issuer name."""
    verifier = verifier_for(keys)
    other_resource = issue(keys, clock, audience="https://other.example.test/mcp").token
    assert refusal(verifier, other_resource) == "token audience mismatch"
    other_issuer = issuer_for(keys, clock, issuer="https://evil.example.test").issue(**GRANT).token
    assert refusal(verifier, other_issuer) == "token issuer mismatch"


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_expired_token_refused(keys: SigningKeys, clock: Clock) -> None:
    """A token whose ten minutes (plus the verifier's leeway) are over is refused."""
    clock.advance(timedelta(minutes=-11))
    assert refusal(verifier_for(keys), issue(keys, clock).token) == "token expired"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_eddsa_token_refused_by_shared_secret_verifier(keys: SigningKeys, clock: Clock) -> None:
    """A verifier of the HS256 mode refuses EdDSA tokens and HS256 tokens under another secret or with a kid."""
    secret = SharedSecret(SECRET)
    verifier = verifier_for(secret)
    eddsa = issue(keys, clock).token
    assert refusal(verifier, eddsa) == "token signing key unknown"
    attacker = Ed25519PrivateKey.generate()
    assert refusal(verifier, forged({"alg": "EdDSA"}, payload(eddsa), attacker)) == "token algorithm not allowed"
    other = issue(SharedSecret(b"another-secret-of-at-least-32-bytes!!"), clock).token
    assert refusal(verifier, other) == "token signature invalid"
    with_kid = jwt.encode(payload(other), SECRET, algorithm="HS256", headers={"kid": "k"})
    assert refusal(verifier, with_kid) == "token signing key unknown"


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_token_of_revoked_grant_refused(keys: SigningKeys, clock: Clock) -> None:
    """Once its grant is revoked, an issued token that still has minutes to live is refused on the next request."""
    live = {"grant-1"}

    async def grant_live(grant_id: str) -> bool:
        return grant_id in live

    verifier = verifier_for(keys, grant_check=grant_live)
    token = issue(keys, clock).token
    assert verify(verifier, token).credential_id == "grant-1"
    live.clear()
    assert refusal(verifier, token) == "token revoked"
