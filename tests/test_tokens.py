"""JWTVerifier: real signed tokens in, a Principal or a refusal out."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard.errors import InvalidToken, StorageUnavailable
from mcpguard.principal import CredentialKind, Principal
from mcpguard.tokens import JWTVerifier, TokenVerifier

ISSUER = "https://auth.example.test"
AUDIENCE = "https://mcp.example.test/mcp"
SECRET = b"0123456789abcdef0123456789abcdef-test-only"
KID = "key-1"


def claims(*, drop: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "jti": "token-1",
        "gid": "grant-1",
        "client_id": "client-1",
        "iat": now,
        "exp": now + 300,
        "tenant": "acme",
        "scope": "mcp:read mcp:write",
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if name not in drop}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


def public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hs256_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def verify(verifier: JWTVerifier, token: str) -> Principal:
    return asyncio.run(verifier.verify(token))


def refusal(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verify(verifier, token)
    description = info.value.description
    if token:
        assert token not in description
        assert token not in str(info.value.challenge(None))
    return description


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key: Ed25519PrivateKey) -> JWTVerifier:
    return JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key())


def sign(key: Ed25519PrivateKey, payload: dict[str, Any], kid: str | None = None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm="EdDSA", headers=headers)


def test_valid_token_yields_principal(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A well-formed EdDSA token becomes a Principal carrying its tenant, subject, grant, client and scopes."""
    principal = verify(verifier, sign(key, claims()))
    assert principal == Principal(
        tenant="acme",
        subject="user-1",
        credential_id="grant-1",
        client_id="client-1",
        scopes=frozenset({"mcp:read", "mcp:write"}),
        kind=CredentialKind.TOKEN,
    )


def test_credential_id_and_client_id_fallbacks(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """Without gid the credential is the jti; without client_id the client is azp, then the subject."""
    with_azp = verify(verifier, sign(key, claims(drop=("gid", "client_id"), azp="client-azp")))
    assert (with_azp.credential_id, with_azp.client_id) == ("token-1", "client-azp")
    bare = verify(verifier, sign(key, claims(drop=("gid", "client_id"))))
    assert bare.client_id == "user-1"


def test_scopes_from_scp_list_or_configured_claim(key: Ed25519PrivateKey) -> None:
    """Scopes come from the configured claim, else from `scp` as a list; none at all means no scopes."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), scope_claim="perms")
    scp = verify(verifier, sign(key, claims(drop=("scope",), scp=["mcp:read", "mcp:admin"])))
    assert scp.scopes == {"mcp:read", "mcp:admin"}
    perms = verify(verifier, sign(key, claims(drop=("scope",), perms="mcp:write")))
    assert perms.scopes == {"mcp:write"}
    assert verify(verifier, sign(key, claims(drop=("scope",)))).scopes == frozenset()


def test_configured_tenant_claim(key: Ed25519PrivateKey) -> None:
    """The tenant is read from the claim the operator names."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), tenant_claim="org")
    assert verify(verifier, sign(key, claims(org="globex"))).tenant == "globex"


@pytest.mark.threat("T-TENANT-SPOOF")
@pytest.mark.parametrize(
    "tenant",
    ["acme\ud800", "acme corp", "acme/globex", "acme\r\nx-mcpguard-tenant: globex", "ácme", "a" * 129],
)
def test_tenant_claim_that_is_not_a_tenant_name_is_refused(key: Ed25519PrivateKey, tenant: str) -> None:
    """A tenant claim outside the tenant-name rule is refused, never repaired into some tenant."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key())
    assert "tenant" in refusal(verifier, sign(key, claims(tenant=tenant)))
    assert verify(verifier, sign(key, claims(tenant="a" * 128))).tenant == "a" * 128


def test_pem_public_key(key: Ed25519PrivateKey) -> None:
    """A PEM public key works as the static key."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=public_pem(key).decode())
    assert verify(verifier, sign(key, claims())).tenant == "acme"


def test_hs256_shared_secret() -> None:
    """An HS256 verifier accepts tokens signed with its shared secret."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=SECRET, algorithms=["HS256"])
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert verify(verifier, token).subject == "user-1"


def test_satisfies_token_verifier_protocol(verifier: JWTVerifier) -> None:
    """JWTVerifier is a TokenVerifier."""
    assert isinstance(verifier, TokenVerifier)


def test_list_audience_including_ours_is_accepted(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """An `aud` list that contains this resource is accepted, as RFC 7519 §4.1.3 allows; one without it is not."""
    assert verify(verifier, sign(key, claims(aud=[AUDIENCE, "https://other.example.test"]))).tenant == "acme"
    other_only = sign(key, claims(aud=["https://other.example.test"]))
    assert refusal(verifier, other_only) == "token audience mismatch"


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_other_audience_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A token minted for another resource is refused, so no token is passed through (RFC 8707)."""
    token = sign(key, claims(aud="https://other.example.test/mcp"))
    assert refusal(verifier, token) == "token audience mismatch"


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_other_issuer_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A token from an issuer other than the configured one is refused, even with the right key."""
    token = sign(key, claims(iss="https://evil.example.test"))
    assert refusal(verifier, token) == "token issuer mismatch"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_refused(verifier: JWTVerifier, alg: str) -> None:
    """An unsigned token (`alg: none`, any case, empty signature) is refused."""
    token = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}."
    assert refusal(verifier, token) == "token algorithm not allowed"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("encoding", ["raw", "pem"])
def test_algorithm_confusion_refused(key: Ed25519PrivateKey, verifier: JWTVerifier, encoding: str) -> None:
    """An HS256 token whose HMAC secret is our public key is refused by an EdDSA verifier."""
    secret = public_raw(key) if encoding == "raw" else public_pem(key)
    assert refusal(verifier, hs256_by_hand(claims(), secret)) == "token algorithm not allowed"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_tampered_payload_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """Changing the tenant in a validly signed token breaks its signature."""
    header, _, signature = sign(key, claims()).split(".")
    token = f"{header}.{segment(claims(tenant='globex'))}.{signature}"
    assert refusal(verifier, token) == "token signature invalid"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_token_from_another_key_refused(verifier: JWTVerifier) -> None:
    """A token signed by a key other than the configured one is refused."""
    token = sign(Ed25519PrivateKey.generate(), claims())
    assert refusal(verifier, token) == "token signature invalid"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_oversize_token_refused_unparsed(key: Ed25519PrivateKey) -> None:
    """A token longer than `max_token_bytes` is refused before it is parsed."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), max_token_bytes=512)
    token = sign(key, claims(padding="x" * 600))
    assert refusal(verifier, token) == "token too large"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "..", "é.é.é", "bm90IGpzb24.e30.c2ln", "\x00" * 20])
def test_garbage_refused(verifier: JWTVerifier, token: str) -> None:
    """Strings that are not a JWS at all are refused as malformed."""
    assert refusal(verifier, token) == "token malformed"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("tenant", ""),
        ("tenant", 7),
        ("sub", ["user-1"]),
        ("sub", ""),
        ("jti", ""),
        ("gid", ""),
        ("client_id", 1),
        ("scope", 3),
        ("scope", ["mcp:read", 5]),
    ],
)
def test_ill_typed_claims_refused(key: Ed25519PrivateKey, verifier: JWTVerifier, name: str, value: Any) -> None:
    """A signed claim of the wrong type or empty is refused rather than coerced into a principal."""
    description = refusal(verifier, sign(key, claims(**{name: value})))
    assert description.startswith("token ")
    assert description.endswith(" malformed")


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_expired_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A token past `exp` plus the leeway is refused."""
    now = int(time.time())
    assert refusal(verifier, sign(key, claims(iat=now - 600, exp=now - 60))) == "token expired"


def test_expiry_within_leeway_is_tolerated(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A token expired by less than the leeway (30 s) still passes, for clock skew."""
    now = int(time.time())
    assert verify(verifier, sign(key, claims(iat=now - 600, exp=now - 10))).tenant == "acme"


@pytest.mark.threat("T-TOKEN-EXPIRED")
@pytest.mark.parametrize("missing", ["exp", "iat", "jti", "sub", "tenant", "iss", "aud"])
def test_missing_claim_refused(key: Ed25519PrivateKey, verifier: JWTVerifier, missing: str) -> None:
    """A token lacking any required claim is refused, naming the claim."""
    assert refusal(verifier, sign(key, claims(drop=(missing,)))) == f"token missing claim {missing}"


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_future_iat_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A token issued further in the future than the leeway is refused."""
    now = int(time.time())
    assert refusal(verifier, sign(key, claims(iat=now + 600, exp=now + 900))) == "token not yet valid"


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_string_exp_refused(key: Ed25519PrivateKey, verifier: JWTVerifier) -> None:
    """A NumericDate sent as a string is refused rather than coerced."""
    assert refusal(verifier, sign(key, claims(exp=str(int(time.time()) + 300)))) == "token claim exp malformed"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("algorithms", [["none"], ["EdDSA", "none"], ["NONE"]])
def test_none_algorithm_cannot_be_configured(key: Ed25519PrivateKey, algorithms: list[str]) -> None:
    """`none` is refused at construction, whatever its case or company."""
    with pytest.raises(ValueError, match="none"):
        JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), algorithms=algorithms)


@pytest.mark.threat("T-TOKEN-FORGE")
def test_mixing_hmac_and_asymmetric_cannot_be_configured(key: Ed25519PrivateKey) -> None:
    """HS256 and EdDSA in one verifier is refused at construction (algorithm confusion)."""
    with pytest.raises(ValueError, match="mixed"):
        JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), algorithms=["HS256", "EdDSA"])


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize(
    ("secret", "match"),
    [
        (b"short", "minimum"),
        ("https://auth.example.test/jwks.json", "URL"),
        (
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
            "-----END PUBLIC KEY-----\n",
            "does not suit",
        ),
    ],
)
def test_weak_or_public_hmac_secret_cannot_be_configured(secret: str | bytes, match: str) -> None:
    """An HS256 secret that is short, a URL or a public key is refused at construction."""
    with pytest.raises(ValueError, match=match):
        JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=secret, algorithms=["HS256"])


def test_misconfigurations_fail_at_construction(key: Ed25519PrivateKey) -> None:
    """A private key, a bare algorithm string, an unknown algorithm or a cleartext remote JWKS is a ValueError."""
    public = key.public_key()
    for kwargs in (
        {"key": key},
        {"key": public, "algorithms": "EdDSA"},
        {"key": public, "algorithms": ["XS999"]},
        {"key": public, "algorithms": ["ES256"]},
        {"key": "http://idp.example.test/jwks.json"},
        {"key": public, "leeway": -1},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message; any refusal will do
            JWTVerifier(issuer=ISSUER, audience=AUDIENCE, **kwargs)


@pytest.fixture
def jwks_url(key: Ed25519PrivateKey) -> Iterator[tuple[str, list[str]]]:
    jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    body = json.dumps({"keys": [{**jwk, "kid": KID, "alg": "EdDSA", "use": "sig"}]}).encode()
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_jwks_url_source(key: Ed25519PrivateKey, jwks_url: tuple[str, list[str]]) -> None:
    """A JWKS URL is fetched over HTTP, the token's `kid` picks the key, and the key set is cached."""
    url, hits = jwks_url
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=url)
    assert verify(verifier, sign(key, claims(), kid=KID)).tenant == "acme"
    assert verify(verifier, sign(key, claims(jti="token-2"), kid=KID)).credential_id == "grant-1"
    assert hits == ["/.well-known/jwks.json"]


@pytest.mark.threat("T-TOKEN-FORGE")
def test_jwks_unknown_kid_or_key_refused(key: Ed25519PrivateKey, jwks_url: tuple[str, list[str]]) -> None:
    """With a JWKS, a token naming an unpublished kid, or signed by another key under our kid, is refused."""
    url, _ = jwks_url
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=jwt.PyJWKClient(url))
    assert refusal(verifier, sign(key, claims(), kid="key-unknown")) == "token signing key unknown"
    forged = sign(Ed25519PrivateKey.generate(), claims(), kid=KID)
    assert refusal(verifier, forged) == "token signature invalid"


def test_unreachable_jwks_fails_closed(key: Ed25519PrivateKey) -> None:
    """When the JWKS cannot be fetched the request fails closed with 503, not 401."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=f"http://127.0.0.1:{port}/jwks.json")
    with pytest.raises(StorageUnavailable):
        verify(verifier, sign(key, claims(), kid=KID))


class KeySet:
    """A local key set keyed by kid, which can gain keys while a verifier holds it."""

    def __init__(self, **keys: Ed25519PrivateKey) -> None:
        self.keys: dict[str, jwt.PyJWK] = {}
        for kid, private in keys.items():
            self.add(kid, private)

    def add(self, kid: str, private: Ed25519PrivateKey) -> None:
        self.keys[kid] = jwt.PyJWK(jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True), "EdDSA")

    def verification_key(self, kid: str | None, /) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)


def test_key_set_picks_the_key_by_kid(key: Ed25519PrivateKey) -> None:
    """With a local key set the token's kid selects the key, and a key added later is used without a new verifier."""
    keys = KeySet(first=key)
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=keys)
    assert verify(verifier, sign(key, claims(), kid="first")).subject == "user-1"
    second = Ed25519PrivateKey.generate()
    keys.add("second", second)
    assert verify(verifier, sign(second, claims(), kid="second")).subject == "user-1"
    assert verify(verifier, sign(key, claims(), kid="first")).subject == "user-1"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_key_set_unknown_or_crossed_kid_refused(key: Ed25519PrivateKey) -> None:
    """An unknown kid is refused as such, and one key's signature under the other key's kid fails."""
    other = Ed25519PrivateKey.generate()
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=KeySet(first=key, second=other))
    assert refusal(verifier, sign(key, claims(), kid="third")) == "token signing key unknown"
    assert refusal(verifier, sign(key, claims(), kid="second")) == "token signature invalid"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_key_set_missing_kid_refused_when_ambiguous(key: Ed25519PrivateKey) -> None:
    """Without a kid the only key is used, but with two keys the token is refused rather than tried on each."""
    keys = KeySet(first=key)
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=keys)
    assert verify(verifier, sign(key, claims())).subject == "user-1"
    keys.add("second", Ed25519PrivateKey.generate())
    assert refusal(verifier, sign(key, claims())) == "token key id missing"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize(
    "header",
    [b64(b"[" * 5000), b64(b"[]"), b64(b"not json"), b64(b'{"kid": 7}'), "!!!", "", b64(b"\xff\xfe")],
)
def test_key_set_malformed_header_refused(key: Ed25519PrivateKey, header: str) -> None:
    """A header that is not a JSON object with a string kid is malformed, however deeply it nests."""
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=KeySet(first=key))
    assert refusal(verifier, f"{header}.{segment(claims())}.c2ln") == "token malformed"


class Grants:
    """Grant liveness as a store would answer it, counting every question."""

    def __init__(self, *live: str, failing: bool = False) -> None:
        self.live = set(live)
        self.failing = failing
        self.asked: list[str] = []

    async def check(self, grant_id: str) -> bool:
        self.asked.append(grant_id)
        if self.failing:
            raise StorageUnavailable("the grant store is unavailable; try again shortly")
        return grant_id in self.live


def grant_verifier(key: Ed25519PrivateKey, grants: Grants) -> JWTVerifier:
    return JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), grant_check=grants.check)


def test_live_grant_is_asked_on_every_request(key: Ed25519PrivateKey) -> None:
    """A token of a live grant passes, and the grant is asked once per verification, never remembered."""
    grants = Grants("grant-1")
    verifier = grant_verifier(key, grants)
    token = sign(key, claims())
    assert verify(verifier, token).credential_id == "grant-1"
    assert verify(verifier, token).credential_id == "grant-1"
    assert grants.asked == ["grant-1", "grant-1"]


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revoked_grant_refused_at_once(key: Ed25519PrivateKey) -> None:
    """A token that passed a moment ago is refused as revoked on the first request after its grant ends."""
    grants = Grants("grant-1")
    verifier = grant_verifier(key, grants)
    token = sign(key, claims())
    assert verify(verifier, token).subject == "user-1"
    grants.live.clear()
    assert refusal(verifier, token) == "token revoked"


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_token_without_grant_refused_when_grants_are_checked(key: Ed25519PrivateKey) -> None:
    """With grant checks on, a token naming no grant (so not revocable) is refused before any store call."""
    grants = Grants("token-1", "grant-1")
    assert refusal(grant_verifier(key, grants), sign(key, claims(drop=("gid",)))) == "token missing claim gid"
    assert grants.asked == []


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN", "T-STORE-FAIL")
def test_grant_store_outage_fails_closed(key: Ed25519PrivateKey) -> None:
    """When the grant store cannot answer, verification raises StorageUnavailable (503) instead of passing."""
    with pytest.raises(StorageUnavailable):
        verify(grant_verifier(key, Grants("grant-1", failing=True)), sign(key, claims()))


@pytest.mark.threat("T-TOKEN-FORGE")
def test_forged_token_refused_before_grant_store(key: Ed25519PrivateKey) -> None:
    """A token with a bad signature never reaches the grant store, so forgeries cannot load it."""
    grants = Grants("grant-1")
    assert refusal(grant_verifier(key, grants), sign(Ed25519PrivateKey.generate(), claims())) == (
        "token signature invalid"
    )
    assert grants.asked == []


class Signatures:
    """A key set that counts how often a signature is actually checked with its key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.jwk = jwt.PyJWK.from_json(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
        self.asked = 0

    def verification_key(self, kid: str | None, /) -> jwt.PyJWK | None:
        self.asked += 1
        return self.jwk


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_remembered_verification_never_outlives_the_token(key: Ed25519PrivateKey) -> None:
    """A token verified once is remembered (its signature is not checked again), but never past its expiry."""
    now = [time.time()]
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=key.public_key(), leeway=0, clock=lambda: now[0])
    token = sign(key, claims(exp=int(now[0]) + 60))
    assert verify(verifier, token).subject == "user-1"
    assert verify(verifier, token).subject == "user-1"
    now[0] += 61
    assert refusal(verifier, token) == "token expired"


def test_remembered_verification_skips_the_signature_until_its_ttl(key: Ed25519PrivateKey) -> None:
    """Within ``cache_ttl`` a second verify reuses the first; after it, the token is verified afresh."""
    now = [time.time()]
    keys = Signatures(key)
    verifier = JWTVerifier(issuer=ISSUER, audience=AUDIENCE, key=keys, cache_ttl=30, clock=lambda: now[0])
    token = sign(key, claims())
    decodes = []
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return real_decode(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jwt, "decode", counting_decode)
        verify(verifier, token)
        verify(verifier, token)
        assert len(decodes) == 1
        now[0] += 31
        verify(verifier, token)
        assert len(decodes) == 2
