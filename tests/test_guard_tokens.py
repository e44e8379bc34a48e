"""Bearer JWTs through the guard on a real socket: the tenant comes from the token, bad tokens get 401."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard import GuardConfig, JWTVerifier, MCPGuard
from tests.conftest import free_port, serve
from tests.test_guard import RecordingApp, list_tools, rpc

ISSUER = "https://auth.example.com"


def claims(audience: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": audience,
        "sub": "user-1",
        "tenant": "acme",
        "scope": "mcp:read",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    return base | overrides


class Served:
    def __init__(self, url: str, app: RecordingApp, key: Ed25519PrivateKey) -> None:
        self.url = url
        self.app = app
        self.key = key

    @property
    def resource(self) -> str:
        return self.url + "/mcp"

    def token(self, **overrides: Any) -> str:
        return jwt.encode(claims(self.resource, **overrides), self.key, algorithm="EdDSA")

    def post(self, token: str, path: str = "/mcp") -> httpx.Response:
        return httpx.post(self.url + path, json=rpc("ping"), headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    key = Ed25519PrivateKey.generate()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    verifier = JWTVerifier(issuer=ISSUER, audience=url + "/mcp", key=key.public_key())
    app = RecordingApp()
    with serve(MCPGuard(app, GuardConfig(public_url=url), tokens=verifier, tool_lister=list_tools), port):
        yield Served(url, app, key)


def test_token_principal_reaches_the_app(served: Served) -> None:
    """A valid token is accepted and the app sees the token's tenant."""
    before = len(served.app.seen)
    assert served.post(served.token()).status_code == 200
    assert served.app.seen[before].tenant == "acme"


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
@pytest.mark.parametrize("overrides", [{"aud": "https://other.example.com/mcp"}, {"iss": "https://evil.example"}])
def test_token_for_another_resource_or_issuer_rejected(served: Served, overrides: dict[str, str]) -> None:
    """A token minted for another audience or by another issuer is 401 invalid_token."""
    response = served.post(served.token(**overrides))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.threat("T-TOKEN-FORGE")
def test_alg_none_token_rejected(served: Served) -> None:
    """An unsigned token (alg none) is refused by the guard."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    unsigned = f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims(served.resource))}."
    assert served.post(unsigned).status_code == 401


@pytest.mark.threat("T-TOKEN-EXPIRED")
def test_expired_token_rejected(served: Served) -> None:
    """A token past its expiry (beyond the leeway) is refused."""
    past = int(time.time()) - 3600
    assert served.post(served.token(iat=past - 600, exp=past)).status_code == 401


@pytest.mark.threat("T-TENANT-SPOOF")
def test_token_tenant_cannot_be_swapped_by_path(served: Served) -> None:
    """A token for acme cannot reach globex's per-tenant URL."""
    assert served.post(served.token(), path="/globex/mcp").status_code == 403
