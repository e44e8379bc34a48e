"""Bearer JWTs through the guard on a real socket: the tenant comes from the token, bad tokens get 401."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard import GuardConfig, JWTVerifier, MCPGuard
from mcpguard.authentication import RECHECK_SECONDS
from tests.conftest import free_port, serve
from tests.test_credentials_limits_audit_attacks import ticking_stream
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


def _ticks_after(response: httpx.Response, event: Callable[[], None], give_up: float) -> list[float]:
    """Seconds after ``event`` (run once the first tick arrived) at which the stream's later ticks arrived, up to
    ``give_up`` seconds."""
    ticks = response.iter_raw()
    next(ticks)
    event()
    happened = time.monotonic()
    arrivals = []
    for _ in ticks:
        arrivals.append(time.monotonic() - happened)
        if arrivals[-1] > give_up:
            break  # still flowing: the caller's assertion says so
    return arrivals


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
@pytest.mark.parametrize("ending", ["grant revoked", "token expired"])
def test_an_open_stream_ends_with_its_token(ending: str) -> None:
    """A stream opened with a token carries nothing more than a recheck interval after the token's grant is revoked
    or the token expires, and then ends."""
    key = Ed25519PrivateKey.generate()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    revoked: set[str] = set()

    async def grant_live(grant_id: str) -> bool:
        return grant_id not in revoked

    verifier = JWTVerifier(issuer=ISSUER, audience=url + "/mcp", key=key.public_key(), leeway=0, grant_check=grant_live)
    guard = MCPGuard(ticking_stream, GuardConfig(public_url=url), tokens=verifier, tool_lister=list_tools)
    lifetime = 300 if ending == "grant revoked" else 2
    token = jwt.encode(claims(url + "/mcp", gid="g1", exp=int(time.time()) + lifetime), key, algorithm="EdDSA")
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    with (
        serve(guard, port),
        httpx.Client(timeout=10) as client,
        client.stream("GET", url + "/mcp", headers=headers) as stream,
    ):
        assert stream.status_code == 200
        if ending == "grant revoked":
            arrivals = _ticks_after(stream, lambda: revoked.add("g1"), RECHECK_SECONDS + 2)
            assert [t for t in arrivals if t > RECHECK_SECONDS + 0.5] == []
        else:
            arrivals = _ticks_after(stream, lambda: None, lifetime + RECHECK_SECONDS + 2)
            assert [t for t in arrivals if t > lifetime + RECHECK_SECONDS + 0.5] == []
