"""The authorization server's Ed25519 signing keys, kept as private PEM files in one directory so every process
and restart signs and verifies with the same set, rotated in and retired without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard.errors import StorageUnavailable

__all__ = ["SigningKeys"]

ALGORITHM = "EdDSA"
# `<created-unix>-<kid>.pem`; a kid is an RFC 7638 thumbprint, 43 base64url characters, so it is safe in a name.
_KEY_FILE = re.compile(r"(?P<created>[0-9]{1,12})-(?P<kid>[A-Za-z0-9_-]{43})\.pem")
_LOCK_FILE = ".lock"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Key:
    kid: str
    created: int
    private: Ed25519PrivateKey = field(repr=False)
    public: jwt.PyJWK = field(repr=False)
    jwk: Mapping[str, str] = field(repr=False)


class SigningKeys:
    """The issuer's Ed25519 keys; the newest signs, every key still held verifies and is published in the JWKS.

    Made by ``load_or_create``. Another process's rotation or retirement is seen at the next read of the
    directory, which happens at most once per ``reload_interval``, when the keys are next used; a directory
    that cannot be read then raises ``StorageUnavailable`` (503), so tokens are refused rather than guessed at.
    """

    algorithm = ALGORITHM

    __slots__ = ("_clock", "_directory", "_keys", "_reload_interval", "_reloaded_at")

    def __init__(
        self,
        directory: Path,
        keys: dict[str, _Key],
        *,
        clock: Callable[[], datetime],
        reload_interval: timedelta,
    ) -> None:
        self._directory = directory
        self._keys = keys
        self._clock = clock
        self._reload_interval = reload_interval
        self._reloaded_at = _unix(clock())

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] = _utc_now,
        reload_interval: timedelta = timedelta(seconds=5),
    ) -> SigningKeys:
        """Every key in ``directory`` (created 0700 if absent); when it holds none, a first key is made there."""
        if reload_interval <= timedelta(0):
            raise ValueError("reload_interval must be positive")
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The lock makes concurrent first starts agree on one key instead of each creating its own.
        with _locked(path):
            keys = _read(path, {})
            if not keys:
                _write(path, Ed25519PrivateKey.generate(), _unix(clock()))
                keys = _read(path, {})
        return cls(path, keys, clock=clock, reload_interval=reload_interval)

    def __repr__(self) -> str:
        return f"SigningKeys(directory={str(self._directory)!r}, kids={list(self._keys)!r})"

    @property
    def current_kid(self) -> str:
        """The kid of the key that signs new tokens."""
        return self._current().kid

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid held, newest first."""
        return tuple(self._keys)

    def rotate(self) -> str:
        """Add a new key that signs from now on and return its kid; older keys stay until ``retire``."""
        with _locked(self._directory):
            keys = _read(self._directory, self._keys)
            created = _unix(self._clock())
            if keys:
                # File order is creation order, so a second rotation within one second still sorts after the first.
                created = max(created, next(iter(keys.values())).created + 1)
            _write(self._directory, Ed25519PrivateKey.generate(), created)
            self._replace(_read(self._directory, keys))
        return self.current_kid

    def retire(self, older_than: timedelta) -> tuple[str, ...]:
        """Delete the keys replaced more than ``older_than`` ago (at least the longest token lifetime plus the
        verifier's leeway); the signing key always stays. Returns the retired kids.
        """
        if older_than <= timedelta(0):
            raise ValueError("older_than must be positive")
        with _locked(self._directory):
            keys = _read(self._directory, self._keys)
            # Another process may sign with a replaced key until its next reload, so that interval is added.
            cutoff = _unix(self._clock()) - older_than.total_seconds() - self._reload_interval.total_seconds()
            retired: list[str] = []
            for successor, key in itertools.pairwise(keys.values()):
                if successor.created <= cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        (self._directory / _file_name(key.created, key.kid)).unlink()
                    retired.append(key.kid)
            if retired:
                _sync_directory(self._directory)
            self._replace(_read(self._directory, keys))
        return tuple(retired)

    def reload(self) -> None:
        """Read the directory again now, to see another process's rotation or retirement."""
        self._replace(_read(self._directory, self._keys))

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set to publish at ``/jwks.json``: public halves only, newest first."""
        self._refresh()
        return {"keys": [dict(key.jwk) for key in self._keys.values()]}

    def derive(self, label: bytes) -> bytes:
        """A secret for ``label`` that every process sharing the directory derives alike (from the oldest key,
        so it changes only when that key is retired)."""
        self._refresh()
        oldest = min(self._keys.values(), key=lambda key: (key.created, key.kid))
        raw = oldest.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return hmac.new(raw, label, hashlib.sha256).digest()

    def sign(self, claims: Mapping[str, Any]) -> str:
        """``claims`` as a compact JWS signed by the current key, which the header names by ``kid``."""
        self._refresh()
        key = self._current()
        return jwt.encode(dict(claims), key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "at+jwt"})

    def verification_key(self, kid: str | None, /) -> jwt.PyJWK | None:
        """The public key named ``kid``; for no kid, the only key if there is exactly one; else ``None``."""
        self._refresh()
        keys = self._keys
        if kid is None:
            return next(iter(keys.values())).public if len(keys) == 1 else None
        key = keys.get(kid)
        return key.public if key is not None else None

    def _current(self) -> _Key:
        return next(iter(self._keys.values()))

    def _refresh(self) -> None:
        # Bounded by the interval so that no request pattern can make every request read the directory.
        if _unix(self._clock()) - self._reloaded_at < self._reload_interval.total_seconds():
            return
        try:
            self.reload()
        except (OSError, ValueError):
            # `from None`: the cause names files of the key directory, which clients must not learn.
            raise StorageUnavailable("token signing keys unavailable") from None

    def _replace(self, keys: dict[str, _Key]) -> None:
        if not keys:
            raise ValueError(f"no signing key left in {self._directory}")
        self._keys = keys
        self._reloaded_at = _unix(self._clock())


def _unix(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("the clock must return timezone-aware datetimes")
    return int(moment.timestamp())


def _file_name(created: int, kid: str) -> str:
    return f"{created}-{kid}.pem"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _thumbprint(jwk: Mapping[str, str]) -> str:
    # RFC 7638 §3.2: the required members of an OKP key, sorted, with no whitespace.
    members = {name: jwk[name] for name in ("crv", "kty", "x")}
    return _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def _key(private: Ed25519PrivateKey, created: int) -> _Key:
    public_jwk: dict[str, str] = jwt.algorithms.OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    kid = _thumbprint(public_jwk)
    jwk = {**public_jwk, "kid": kid, "alg": ALGORITHM, "use": "sig"}
    return _Key(kid=kid, created=created, private=private, public=jwt.PyJWK(jwk, algorithm=ALGORITHM), jwk=jwk)


def _read(directory: Path, known: Mapping[str, _Key]) -> dict[str, _Key]:
    """The keys in ``directory``, newest first; files already parsed in ``known`` are not read again."""
    keys: list[_Key] = []
    for entry in os.scandir(directory):
        match = _KEY_FILE.fullmatch(entry.name)
        if match is None:
            continue
        created, kid = int(match["created"]), match["kid"]
        previous = known.get(kid)
        if previous is not None and previous.created == created:
            keys.append(previous)
            continue
        try:
            data = Path(entry.path).read_bytes()
        except FileNotFoundError:
            # Retired by another process between the listing and the read.
            continue
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError):
            # `from None`: the parser's message could quote key material.
            raise ValueError(f"{entry.name} in {directory} is not a readable private key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{entry.name} in {directory} is not an Ed25519 private key")
        key = _key(private, created)
        if key.kid != kid:
            raise ValueError(f"{entry.name} in {directory} is named for a key it does not hold")
        keys.append(key)
    keys.sort(key=lambda key: (key.created, key.kid), reverse=True)
    return {key.kid: key for key in keys}


def _write(directory: Path, private: Ed25519PrivateKey, created: int) -> None:
    """Store ``private`` readable by its owner only, appearing under its final name complete or not at all."""
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    final = directory / _file_name(created, _key(private, created).kid)
    temporary = directory / f".{final.name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    # A rename or unlink is durable only once the directory itself is flushed.
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    descriptor = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
