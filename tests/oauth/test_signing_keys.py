"""SigningKeys: Ed25519 keys persisted as private files, rotated and retired, published, and chosen only by kid."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard.errors import StorageUnavailable
from mcpguard.oauth import SigningKeys
from tests.oauth.conftest import Clock
from tests.oauth.test_signing import (
    b64,
    forged,
    issue,
    payload,
    refusal,
    segment,
    verifier_for,
    verify,
)


def key_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pem"))


def test_rotation_keeps_earlier_tokens_valid(keys: SigningKeys, clock: Clock) -> None:
    """After rotate() the new key signs, and a token signed by the previous key still verifies."""
    verifier = verifier_for(keys)
    first = issue(keys, clock)
    old_kid = keys.current_kid
    new_kid = keys.rotate()
    second = issue(keys, clock)
    assert new_kid != old_kid
    assert keys.kids == (new_kid, old_kid)
    assert jwt.get_unverified_header(second.token)["kid"] == new_kid
    assert verify(verifier, first.token).credential_id == "grant-1"
    assert verify(verifier, second.token).credential_id == "grant-1"
    assert [jwk["kid"] for jwk in keys.jwks()["keys"]] == [new_kid, old_kid]


@pytest.mark.threat("T-TOKEN-FORGE")
def test_token_of_retired_key_refused(keys: SigningKeys, clock: Clock, tmp_path: Path) -> None:
    """retire() keeps a replaced key for older_than (plus the reload interval), then its tokens are refused."""
    verifier = verifier_for(keys)
    old = issue(keys, clock)
    old_kid = keys.current_kid
    keys.rotate()
    new = issue(keys, clock)
    clock.advance(timedelta(minutes=10))
    assert keys.retire(timedelta(minutes=10)) == ()
    assert verify(verifier, old.token).subject == "user-1"
    clock.advance(timedelta(seconds=10))
    assert keys.retire(timedelta(minutes=10)) == (old_kid,)
    assert old_kid not in keys.kids
    assert [path.name.split("-", 1)[1] for path in key_files(tmp_path / "keys")] == [f"{keys.current_kid}.pem"]
    assert old_kid not in json.dumps(keys.jwks())
    clock.advance(timedelta(minutes=1))
    assert refusal(verifier, old.token) == "token signing key unknown"
    assert verify(verifier, new.token).subject == "user-1"


def test_retire_never_removes_the_signing_key(keys: SigningKeys, clock: Clock) -> None:
    """However old it is, the key that signs stays."""
    kid = keys.current_kid
    clock.advance(timedelta(days=365))
    assert keys.retire(timedelta(minutes=1)) == ()
    assert keys.kids == (kid,)


def test_keys_persist_private_and_shared(tmp_path: Path, clock: Clock) -> None:
    """Keys are 0600 PEM files named <created>-<kid>.pem in a 0700 directory, and a second load uses the same set."""
    directory = tmp_path / "keys"
    first = SigningKeys.load_or_create(directory, clock=clock)
    first.rotate()
    token = issue(first, clock).token
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = key_files(directory)
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        created, kid = path.stem.split("-", 1)
        assert kid in first.kids
        assert int(created) >= int(clock.now.timestamp())
    (directory / ".leftover.pem.0badc0de.tmp").write_text("interrupted write")
    (directory / "README").write_text("not a key")
    second = SigningKeys.load_or_create(directory, clock=clock)
    assert second.kids == first.kids
    assert second.current_kid == first.current_kid
    assert verify(verifier_for(second), token).tenant == "acme"


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path, clock: Clock) -> None:
    """Processes starting together on an empty directory end up with one shared first key, not one each."""
    directory = tmp_path / "keys"
    barrier = threading.Barrier(4)
    loaded: list[SigningKeys] = []

    def start() -> None:
        barrier.wait()
        loaded.append(SigningKeys.load_or_create(directory, clock=clock))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(key_files(directory)) == 1
    assert {keys.kids for keys in loaded} == {loaded[0].kids}


def test_rotation_by_another_process_is_seen_after_the_reload_interval(tmp_path: Path, clock: Clock) -> None:
    """A key another process rotated in verifies here once the reload interval has passed, and then also signs."""
    directory = tmp_path / "keys"
    here = SigningKeys.load_or_create(directory, clock=clock)
    there = SigningKeys.load_or_create(directory, clock=clock)
    verifier = verifier_for(here)
    rotated = there.rotate()
    token = issue(there, clock).token
    assert refusal(verifier, token) == "token signing key unknown"
    clock.advance(timedelta(seconds=5))
    assert verify(verifier, token).subject == "user-1"
    assert here.current_kid == rotated
    assert jwt.get_unverified_header(issue(here, clock).token)["kid"] == rotated


def test_retirement_by_another_process_is_seen_after_the_reload_interval(tmp_path: Path, clock: Clock) -> None:
    """A key another process retired stops verifying here at the next reload, even though this process never signs."""
    directory = tmp_path / "keys"
    here = SigningKeys.load_or_create(directory, clock=clock)
    there = SigningKeys.load_or_create(directory, clock=clock)
    verifier = verifier_for(here)
    old_kid = here.current_kid
    token = issue(there, clock).token
    assert verify(verifier, token).subject == "user-1"
    there.rotate()
    clock.advance(timedelta(minutes=11))
    assert there.retire(timedelta(minutes=10)) == (old_kid,)
    assert refusal(verifier, token) == "token signing key unknown"
    assert old_kid not in here.kids


@pytest.mark.threat("T-STORE-FAIL")
def test_unreadable_key_file_fails_closed(keys: SigningKeys, clock: Clock, tmp_path: Path) -> None:
    """A key file that cannot be parsed stops a start with ValueError and makes verification a 503, never a pass."""
    token = issue(keys, clock).token
    verifier = verifier_for(keys)
    (tmp_path / "keys" / f"1-{'A' * 43}.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(ValueError, match="not a readable private key"):
        SigningKeys.load_or_create(tmp_path / "keys", clock=clock)
    assert verify(verifier, token).subject == "user-1"
    clock.advance(timedelta(seconds=5))
    with pytest.raises(StorageUnavailable) as info:
        verify(verifier, token)
    assert info.value.description == "token signing keys unavailable"


def test_kid_is_the_rfc7638_thumbprint(tmp_path: Path, clock: Clock) -> None:
    """The kid of the RFC 8037 example key is its thumbprint as given in RFC 8037 appendix A.3."""
    private = jwt.algorithms.OKPAlgorithm.from_jwk(
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        }
    )
    assert isinstance(private, Ed25519PrivateKey)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    kid = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    (tmp_path / f"1700000000-{kid}.pem").write_bytes(pem)
    assert SigningKeys.load_or_create(tmp_path, clock=clock).kids == (kid,)


def test_key_file_named_for_another_key_is_an_error(tmp_path: Path, clock: Clock) -> None:
    """A key file whose name claims a kid its key does not have stops loading instead of publishing a wrong kid."""
    SigningKeys.load_or_create(tmp_path, clock=clock)
    (path,) = key_files(tmp_path)
    path.rename(tmp_path / f"{path.stem.split('-')[0]}-{'A' * 43}.pem")
    with pytest.raises(ValueError, match="named for a key"):
        SigningKeys.load_or_create(tmp_path, clock=clock)


def test_jwks_holds_public_keys_only(keys: SigningKeys) -> None:
    """Every published key is a public Ed25519 JWK with its kid, alg and use, and no private member."""
    keys.rotate()
    published = keys.jwks()
    assert len(published["keys"]) == 2
    for jwk in published["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
        assert "d" not in jwk
    published["keys"].clear()
    assert len(keys.jwks()["keys"]) == 2


@pytest.mark.threat("T-TOKEN-FORGE")
def test_unknown_kid_refused(keys: SigningKeys, clock: Clock) -> None:
    """A token signed by another key under a kid we never published is refused, even after a directory reload."""
    attacker = Ed25519PrivateKey.generate()
    token = forged({"alg": "EdDSA", "kid": "A" * 43}, payload(issue(keys, clock).token), attacker)
    verifier = verifier_for(keys)
    assert refusal(verifier, token) == "token signing key unknown"
    clock.advance(timedelta(minutes=1))
    assert refusal(verifier, token) == "token signing key unknown"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_our_kid_on_another_signature_refused(keys: SigningKeys, clock: Clock) -> None:
    """Naming our kid does not make another key's signature, or an altered payload, pass."""
    claims = payload(issue(keys, clock).token)
    attacker = Ed25519PrivateKey.generate()
    assert refusal(verifier_for(keys), forged({"alg": "EdDSA", "kid": keys.current_kid}, claims, attacker)) == (
        "token signature invalid"
    )


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("shape", ["relative", "absolute", "file-name", "traversal", "nul"])
def test_path_like_kid_refused(keys: SigningKeys, clock: Clock, tmp_path: Path, shape: str) -> None:
    """A kid shaped like a path to our key file, or to anything else, is only a name that matches no key."""
    clock.advance(timedelta(minutes=1))
    (key_file,) = key_files(tmp_path / "keys")
    kid = {
        "relative": f"keys/{key_file.name}",
        "absolute": str(key_file),
        "file-name": key_file.name,
        "traversal": f"../../{keys.current_kid}/../../../etc/passwd",
        "nul": f"{keys.current_kid}\x00",
    }[shape]
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    token = forged({"alg": "EdDSA", "kid": kid}, payload(issue(keys, clock).token), private)
    assert refusal(verifier_for(keys), token) == "token signing key unknown"
    assert key_files(tmp_path / "keys") == [key_file]


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("kid", [7, None, ["a"], {"kid": "a"}])
def test_kid_of_the_wrong_type_refused(keys: SigningKeys, clock: Clock, kid: Any) -> None:
    """A kid that is not a string (null included) is malformed, whatever signs the token."""
    token = forged({"alg": "EdDSA", "kid": kid}, payload(issue(keys, clock).token), Ed25519PrivateKey.generate())
    assert refusal(verifier_for(keys), token) == "token malformed"


@pytest.mark.threat("T-TOKEN-FORGE")
def test_missing_kid_refused_once_two_keys_exist(keys: SigningKeys, clock: Clock, tmp_path: Path) -> None:
    """A token without kid passes only while one key exists; with two the verifier will not guess."""
    (key_file,) = key_files(tmp_path / "keys")
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    token = jwt.encode(payload(issue(keys, clock).token), private, algorithm="EdDSA")
    verifier = verifier_for(keys)
    assert verify(verifier, token).subject == "user-1"
    keys.rotate()
    assert refusal(verifier, token) == "token key id missing"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("alg", ["none", "None"])
def test_alg_none_with_our_kid_refused(keys: SigningKeys, clock: Clock, alg: str) -> None:
    """An unsigned token naming our kid is refused."""
    token = forged({"alg": alg, "kid": keys.current_kid}, payload(issue(keys, clock).token))
    assert refusal(verifier_for(keys), token) == "token algorithm not allowed"


@pytest.mark.threat("T-TOKEN-FORGE")
@pytest.mark.parametrize("encoding", ["raw", "pem", "jwk-x"])
def test_hs256_signed_with_our_public_key_refused(keys: SigningKeys, clock: Clock, encoding: str) -> None:
    """An HS256 token whose HMAC key is our published public key (algorithm confusion) is refused."""
    jwk = keys.jwks()["keys"][0]
    public = jwt.PyJWK(jwk).key
    secret = {
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "jwk-x": jwk["x"].encode(),
    }[encoding]
    signing_input = f"{segment({'alg': 'HS256', 'kid': jwk['kid']})}.{segment(payload(issue(keys, clock).token))}"
    token = f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"
    assert refusal(verifier_for(keys), token) == "token algorithm not allowed"
