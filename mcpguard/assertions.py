"""Signed identity assertions: a short-lived JWT an upstream can verify instead of trusting plain headers.

The ``X-MCPGuard-Tenant``/``-Subject``/``-Scopes`` headers are only as trustworthy as the network
between the guard and the server. With a signer configured, the guard also sends
``X-MCPGuard-Assertion``: the same facts, signed (EdDSA with a private key, or HS256 with a shared
secret), for this upstream only (``aud``), valid for ``lifetime`` seconds.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard.principal import Principal

__all__ = ["ASSERTION_HEADER", "AssertionSigner"]

ASSERTION_HEADER = b"x-mcpguard-assertion"
_CACHE_SIZE = 4096


class AssertionSigner:
    """Signs the principal of a request for one audience; a signature is reused for half its lifetime."""

    def __init__(
        self,
        *,
        key: Ed25519PrivateKey | bytes,
        issuer: str,
        audience: str,
        lifetime: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(key, bytes):
            if len(key) < 32:
                raise ValueError("an HS256 assertion secret needs at least 32 bytes")
            self._algorithm = "HS256"
        elif isinstance(key, Ed25519PrivateKey):
            self._algorithm = "EdDSA"
        else:
            raise TypeError("the assertion key is an Ed25519 private key or a shared secret (bytes)")
        if not 1 <= lifetime <= 300:
            raise ValueError("assertion lifetime must be between 1 and 300 seconds")
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._lifetime = lifetime
        self._clock = clock
        self._cache: OrderedDict[Principal, tuple[float, bytes]] = OrderedDict()

    def __repr__(self) -> str:
        return f"AssertionSigner(algorithm={self._algorithm!r}, issuer={self._issuer!r}, audience={self._audience!r})"

    def sign(self, principal: Principal) -> bytes:
        """The assertion for ``principal``, fresh or reused while it has more than half its lifetime left."""
        now = self._clock()
        cached = self._cache.get(principal)
        if cached is not None and now < cached[0]:
            return cached[1]
        issued = int(now)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": principal.subject,
            "tenant": principal.tenant,
            "scope": " ".join(sorted(principal.scopes)),
            "cid": principal.credential_id,
            "client_id": principal.client_id,
            "kind": str(principal.kind),
            "iat": issued,
            "exp": issued + int(self._lifetime),
            "jti": secrets.token_urlsafe(12),
        }
        token = jwt.encode(claims, self._key, algorithm=self._algorithm).encode()
        self._cache[principal] = (now + self._lifetime / 2, token)
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return token
