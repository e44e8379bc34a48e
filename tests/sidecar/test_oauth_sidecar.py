"""The sidecar with the built-in authorization server: its settings, checked as a whole, and the whole OAuth
flow of a real MCP client through the sidecar to a real upstream that never sees the client's token."""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from mcpguard import ClientMetadataFetcher
from sidecar.app import SidecarApp
from sidecar.cli import main
from sidecar.demo_server import http_app
from sidecar.serve import sidecar_from_settings
from sidecar.settings import OAuthClient, SettingsError
from tests.conftest import free_port, serve
from tests.oauth.consent_client import consent
from tests.oauth.flow_helpers import (
    MCP_HEADERS,
    PASSWORD,
    REDIRECT,
    STATELESS_LIST,
    MemoryTokens,
    Person,
    Pkce,
    call,
    provider_for,
)
from tests.sidecar.test_proxy import Capture
from tests.sidecar.test_settings import load, problems_of, write_toml

UPSTREAM = "http://127.0.0.1:9000/mcp"
SECRET = "canary-5b1e-hs256-secret-of-at-least-32-bytes"
CLIENT_SECRET = "canary-0d4c-preregistered-client-secret"
CHEAP = {"MCPGUARD_ARGON2_PROFILE": "cheapest"}


def mcp_headers(token: str) -> dict[str, str]:
    """Headers of a stateless MCP tools/list POST carrying ``token``."""
    return MCP_HEADERS | {"authorization": f"Bearer {token}"}


class TestSettings:
    def test_off_by_default(self) -> None:
        """Without oauth the server is off and every oauth setting has its documented default."""
        settings = load(upstream=UPSTREAM)
        assert settings.oauth is False
        assert (settings.oauth_keys_dir, settings.jwt_secret_env, settings.oauth_clients) == (None, None, ())
        assert (
            settings.oauth_access_token_minutes,
            settings.oauth_refresh_days,
            settings.oauth_refresh_grace_seconds,
        ) == (10.0, 30.0, 0.0)
        assert settings.oauth_dynamic_registration is True
        assert settings.oauth_client_metadata_documents is True
        assert settings.oauth_cimd_allow_private is False

    def test_toml_with_preregistered_clients(self, tmp_path: Path) -> None:
        """The file turns the server on with a token lifetime and an array of client tables, read as written."""
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\npublic_url = "https://mcp.example.test"\noauth = true\n'
            "oauth_access_token_minutes = 5\noauth_refresh_grace_seconds = 10\n"
            '[[oauth_clients]]\nclient_id = "claude"\nclient_name = "Claude"\n'
            'redirect_uris = ["https://claude.ai/api/mcp/auth_callback"]\nclient_secret_env = "CLAUDE_SECRET"\n'
            '[[oauth_clients]]\nclient_id = "local"\nredirect_uris = ["http://127.0.0.1:3334/oauth/callback"]\n',
        )
        settings = load(config_file=config)
        assert settings.oauth_clients == (
            OAuthClient(
                client_id="claude",
                client_name="Claude",
                redirect_uris=("https://claude.ai/api/mcp/auth_callback",),
                client_secret_env="CLAUDE_SECRET",
            ),
            OAuthClient(client_id="local", redirect_uris=("http://127.0.0.1:3334/oauth/callback",)),
        )
        oauth = settings.oauth_settings({"CLAUDE_SECRET": CLIENT_SECRET})
        assert (oauth.issuer, oauth.resource) == ("https://mcp.example.test", "https://mcp.example.test/mcp")
        assert oauth.access_token_lifetime.total_seconds() == 300
        assert oauth.refresh_grace.total_seconds() == 10
        claude, local = oauth.clients
        assert claude.client_secret_sha256 == hashlib.sha256(CLIENT_SECRET.encode()).hexdigest()
        assert local.client_secret_sha256 is None

    def test_clients_from_the_environment_as_json(self) -> None:
        """MCPGUARD_OAUTH_CLIENTS takes the same tables as a JSON array."""
        env = {
            "MCPGUARD_OAUTH": "true",
            "MCPGUARD_OAUTH_CLIENTS": '[{"client_id": "gpt", "redirect_uris": ["https://chat.example.test/cb"]}]',
        }
        settings = load(env=env, upstream=UPSTREAM)
        assert settings.oauth_clients == (
            OAuthClient(client_id="gpt", redirect_uris=("https://chat.example.test/cb",)),
        )

    def test_keys_live_next_to_the_sqlite_state_by_default(self, tmp_path: Path) -> None:
        """With SQLite state and nothing else said, Ed25519 keys are made in ``<state>.keys``."""
        state = tmp_path / "state.db"
        settings = load(upstream=UPSTREAM, oauth=True, state=str(state))
        keys = settings.oauth_signing_key({})
        assert keys.algorithm == "EdDSA"
        assert len(list((tmp_path / "state.db.keys").glob("*.pem"))) == 1

    def test_every_problem_is_reported_at_once(self, tmp_path: Path) -> None:
        """Bad lifetimes, a grace over 60 s, a bad variable name and three bad clients: every one is reported."""
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\noauth = true\noauth_access_token_minutes = 90\noauth_refresh_days = 0\n'
            'oauth_refresh_grace_seconds = 61\njwt_secret_env = "not a name"\n'
            '[[oauth_clients]]\nclient_id = "a"\nredirect_uris = ["http://evil.example.test/cb"]\n'
            '[[oauth_clients]]\nclient_id = "a"\nredirect_uris = []\nclient_secret_env = "1BAD"\n',
        )
        problems = problems_of(config_file=config)
        expected = [
            f"{config}: oauth_access_token_minutes: must be more than 0 and at most 60",
            f"{config}: oauth_refresh_days: must be more than 0",
            f"{config}: oauth_refresh_grace_seconds: must be between 0 (off) and 60 seconds",
            f"{config}: jwt_secret_env: not a variable name",
            f"{config}: oauth_clients: [0]: redirect URI 'http://evil.example.test/cb' must be https",
            f"{config}: oauth_clients: [1]: client_id must be unique",
            f"{config}: oauth_clients: [1]: needs at least one redirect URI",
            f"{config}: oauth_clients: [1]: client_secret_env is not a variable name",
        ]
        assert len(problems) == len(expected), problems
        for start in expected:
            assert sum(problem.startswith(start) for problem in problems) == 1, (start, problems)

    @pytest.mark.parametrize("grace", ["61", "-1", "3600"])
    def test_grace_outside_0_to_60_seconds(self, grace: str) -> None:
        """A refresh grace window over a minute (or negative) is a problem, whatever else is right."""
        env = {"MCPGUARD_OAUTH": "true", "MCPGUARD_OAUTH_REFRESH_GRACE_SECONDS": grace}
        assert problems_of(env=env, upstream=UPSTREAM) == [
            "MCPGUARD_OAUTH_REFRESH_GRACE_SECONDS: must be between 0 (off) and 60 seconds"
        ]

    def test_memory_state_needs_a_keys_dir_or_a_secret(self, tmp_path: Path) -> None:
        """Keys kept in memory would change with every restart: memory state needs a directory or an HS256 secret."""
        problems = problems_of(upstream=UPSTREAM, oauth=True, state="memory://")
        assert problems == [
            "oauth_keys_dir: is required when state is not an SQLite file, unless jwt_secret_env names an HS256 secret"
        ]
        assert load(upstream=UPSTREAM, oauth=True, state="memory://", oauth_keys_dir=str(tmp_path / "k")).oauth
        both = problems_of(upstream=UPSTREAM, oauth=True, oauth_keys_dir="/k", jwt_secret_env="S")
        assert both == ["--oauth-keys-dir and --jwt-secret-env: set at most one of them"]

    def test_conventional_secret_variable_is_used_when_set(self) -> None:
        """MCPGUARD_JWT_SECRET, when set, makes tokens HS256 under it unless keys are configured otherwise."""
        env = {"MCPGUARD_JWT_SECRET": SECRET}
        settings = load(env=env, upstream=UPSTREAM, oauth=True, state="memory://")
        assert settings.jwt_secret_env == "MCPGUARD_JWT_SECRET"
        assert settings.oauth_signing_key(env).algorithm == "HS256"
        assert load(env=env, upstream=UPSTREAM).jwt_secret_env is None  # only with oauth on
        assert load(env=env, upstream=UPSTREAM, oauth=True, oauth_keys_dir="/k").jwt_secret_env is None

    def test_secrets_are_never_quoted(self, tmp_path: Path) -> None:
        """A short HS256 secret, a missing client secret and a secret pasted into the file are named, never shown."""
        settings = load(upstream=UPSTREAM, oauth=True, state="memory://", jwt_secret_env="JWT")
        with pytest.raises(SettingsError) as short:
            settings.oauth_signing_key({"JWT": "canary-short-secret"})
        assert short.value.problems == ["jwt_secret_env: the variable it names must hold at least 32 bytes"]
        assert "canary" not in str(short.value)
        clients = [
            OAuthClient(client_id="c", redirect_uris=("https://c.example.test/cb",), client_secret_env="C_SECRET")
        ]
        with_client = load(upstream=UPSTREAM, oauth=True, state=str(tmp_path / "s.db"), oauth_clients=clients)
        with pytest.raises(SettingsError) as missing:
            with_client.oauth_settings({})
        expected = "oauth_clients: [0]: client_secret_env: the variable it names is not set or empty"
        assert missing.value.problems == [expected]
        assert CLIENT_SECRET not in repr(with_client.oauth_settings({"C_SECRET": CLIENT_SECRET}))
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\noauth = true\n[[oauth_clients]]\nclient_id = "c"\n'
            f'redirect_uris = ["https://c.example.test/cb"]\nclient_secret = "{CLIENT_SECRET}"\n',
        )
        pasted = problems_of(config_file=config)
        assert pasted == [
            f"{config}: oauth_clients: [0]: a secret is never written here; name its variable in client_secret_env"
        ]

    def test_oauth_settings_need_oauth_on(self) -> None:
        """An oauth setting while the server is off is reported, as it would silently do nothing."""
        env = {"MCPGUARD_OAUTH_REFRESH_DAYS": "7", "MCPGUARD_JWT_SECRET_ENV": "S"}
        assert problems_of(env=env, upstream=UPSTREAM) == [
            "MCPGUARD_JWT_SECRET_ENV: applies to the built-in authorization server, but oauth is off",
            "MCPGUARD_OAUTH_REFRESH_DAYS: applies to the built-in authorization server, but oauth is off",
        ]

    def test_oauth_needs_https_off_loopback(self) -> None:
        """A plain-http public URL is accepted on loopback only, since the sign-in cookie is Secure."""
        problems = problems_of(upstream=UPSTREAM, oauth=True, public_url="http://mcp.example.test")
        assert problems == ["--oauth: needs an https public_url (plain http only on localhost, 127.0.0.1 or [::1])"]
        assert load(upstream=UPSTREAM, oauth=True, public_url="https://mcp.example.test").oauth
        assert load(upstream=UPSTREAM, oauth=True, listen="127.0.0.1:8080").oauth


@dataclass
class Running:
    """A sidecar with the built-in authorization server in front of the demo server, and what it is made of."""

    url: str
    state: str
    app: SidecarApp
    capture: Capture


def add_user(monkeypatch: pytest.MonkeyPatch, state: str, email: str, *tenants: str) -> None:
    """Add a local user with ``PASSWORD`` through ``mcpguard users add --password-stdin``."""
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    tenant_flags = [flag for tenant in tenants for flag in ("--tenant", tenant)]
    assert main(["--state", state, "users", "add", "--email", email, *tenant_flags, "--password-stdin"]) == 0


@contextmanager
def oauth_sidecar(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> Iterator[Running]:
    """The sidecar, with oauth on and its state in ``tmp_path``, in front of the demo server behind a Capture."""
    capture = Capture(http_app())
    env = CHEAP | (env or {})
    with serve(capture) as upstream:
        port = free_port()
        values: dict[str, Any] = {"state": str(tmp_path / "state.db"), "oauth": True} | overrides
        settings = load(env=env, upstream=f"{upstream}/mcp", listen=f"127.0.0.1:{port}", **values)
        app = sidecar_from_settings(settings, env)
        with serve(app, port) as url:
            yield Running(url, settings.state, app, capture)


def test_full_flow_through_the_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK client discovers the sidecar's server, registers, is approved, calls a tool, refreshes and calls
    again; once revoked its access token is refused with 401; the upstream never sees any Authorization header."""
    add_user(monkeypatch, str(tmp_path / "state.db"), "ada@acme.test", "acme")
    storage, person = MemoryTokens(), Person()
    with oauth_sidecar(tmp_path) as running:
        provider = provider_for(running.url, storage, person)

        async def flow() -> httpx.Response:
            async with httpx.AsyncClient() as http:
                metadata = (await http.get(f"{running.url}/.well-known/oauth-protected-resource/mcp")).json()
            assert metadata["authorization_servers"] == [running.url]
            first = await call(running.url, provider, "echo", {"text": "first"})
            assert (first.is_error, first.content[0].text) == (False, "first")
            assert person.pages == [200, 200, 303]
            assert storage.tokens is not None
            assert storage.client is not None
            issued = storage.tokens
            provider.context.token_expiry_time = 1.0  # the next call refreshes first
            second = await call(running.url, provider, "echo", {"text": "second"})
            assert (second.is_error, second.content[0].text) == (False, "second")
            assert storage.tokens.refresh_token != issued.refresh_token
            assert storage.tokens.access_token != issued.access_token
            async with httpx.AsyncClient() as http:
                revoked = await http.post(
                    f"{running.url}/oauth/revoke",
                    data={"token": storage.tokens.refresh_token, "client_id": storage.client.client_id},
                )
                assert revoked.status_code == 200
                return await http.post(
                    f"{running.url}/mcp", headers=mcp_headers(storage.tokens.access_token), json=STATELESS_LIST
                )

        after = asyncio.run(flow())
    assert after.status_code == 401
    assert 'error="invalid_token"' in after.headers["www-authenticate"]
    forwarded = [seen for seen in running.capture.headers if seen]
    assert forwarded
    assert all("authorization" not in seen for seen in forwarded)


def test_preregistered_client_proves_its_secret_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client from the settings gets tokens with the secret its variable held, and a wrong one is 401."""
    add_user(monkeypatch, str(tmp_path / "state.db"), "ada@acme.test", "acme")
    clients = [OAuthClient(client_id="assistant", redirect_uris=(REDIRECT,), client_secret_env="ASSISTANT_SECRET")]
    with oauth_sidecar(tmp_path, {"ASSISTANT_SECRET": CLIENT_SECRET}, oauth_clients=clients) as running:

        async def exchange(secret: str) -> httpx.Response:
            pkce = Pkce.new()
            query = {
                "response_type": "code",
                "client_id": "assistant",
                "redirect_uri": REDIRECT,
                "state": "s1",
                "scope": "mcp:read",
                "resource": f"{running.url}/mcp",
                "code_challenge": pkce.challenge,
                "code_challenge_method": "S256",
            }
            async with httpx.AsyncClient() as http:
                result = await consent(
                    http, f"{running.url}/authorize?{urlencode(query)}", username="ada@acme.test", password=PASSWORD
                )
                assert result.location is not None
                code = parse_qs(urlsplit(result.location).query)["code"][0]
                return await http.post(
                    f"{running.url}/token",
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": REDIRECT,
                        "code_verifier": pkce.verifier,
                        "client_id": "assistant",
                        "client_secret": secret,
                    },
                )

        wrong = asyncio.run(exchange("not-" + CLIENT_SECRET))
        right = asyncio.run(exchange(CLIENT_SECRET))
    # 400, not 401: a secret sent in the body gets no challenge to answer (RFC 6749 §5.2).
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_client"
    assert right.status_code == 200
    assert right.json()["token_type"] == "Bearer"


def test_shared_secret_signs_and_publishes_no_jwks(tmp_path: Path) -> None:
    """With an HS256 secret and memory state the metadata names the sidecar as issuer and offers no JWKS."""
    with oauth_sidecar(tmp_path, {"MCPGUARD_JWT_SECRET": SECRET}, state="memory://") as running:
        metadata = httpx.get(f"{running.url}/.well-known/oauth-authorization-server").json()
        jwks = httpx.get(f"{running.url}/jwks.json")
    assert metadata["issuer"] == running.url
    assert metadata["registration_endpoint"] == f"{running.url}/register"
    assert "jwks_uri" not in metadata
    assert jwks.status_code == 401  # not served: the path is guarded like any other


def test_signing_keys_are_published_and_kept_next_to_the_state(tmp_path: Path) -> None:
    """With SQLite state the Ed25519 key made in ``<state>.keys`` is the one the JWKS publishes."""
    with oauth_sidecar(tmp_path) as running:
        metadata = httpx.get(f"{running.url}/.well-known/oauth-authorization-server").json()
        keys = httpx.get(metadata["jwks_uri"]).json()["keys"]
    files = list((tmp_path / "state.db.keys").glob("*.pem"))
    assert len(files) == 1
    assert [key["kid"] for key in keys] == [files[0].stem.split("-", 1)[1]]


def test_dynamic_registration_can_be_switched_off(tmp_path: Path) -> None:
    """With oauth_dynamic_registration = false the metadata offers no registration and /register refuses."""
    with oauth_sidecar(tmp_path, oauth_dynamic_registration=False) as running:
        metadata = httpx.get(f"{running.url}/.well-known/oauth-authorization-server").json()
        answer = httpx.post(f"{running.url}/register", json={"redirect_uris": [REDIRECT]})
    assert "registration_endpoint" not in metadata
    assert (answer.status_code, answer.json()["error"]) == (400, "access_denied")


def test_client_metadata_fetcher_is_closed_at_shutdown(tmp_path: Path) -> None:
    """The fetcher made for client metadata documents is closed when the sidecar stops, and only then."""
    with oauth_sidecar(tmp_path) as running:
        owners = [getattr(close, "__self__", None) for close in running.app.on_shutdown]
        fetchers = [owner for owner in owners if isinstance(owner, ClientMetadataFetcher)]
        assert len(fetchers) == 1
        assert httpx.get(f"{running.url}/healthz").status_code == 200
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(fetchers[0].fetch("https://client.example.test/metadata.json"))
    with oauth_sidecar(tmp_path, state=str(tmp_path / "off.db"), oauth_client_metadata_documents=False) as without:
        assert without.app.on_shutdown == ()


def test_stdio_sidecar_serves_the_authorization_server(tmp_path: Path) -> None:
    """In front of a stdio upstream the sidecar serves the same metadata and names itself as the issuer."""
    port = free_port()
    settings = load(
        upstream_cmd=f"{sys.executable} -m sidecar.demo_server",
        listen=f"127.0.0.1:{port}",
        state=str(tmp_path / "state.db"),
        oauth=True,
    )
    with serve(sidecar_from_settings(settings, CHEAP), port) as url:
        resource = httpx.get(f"{url}/.well-known/oauth-protected-resource/mcp").json()
        metadata = httpx.get(f"{url}/.well-known/oauth-authorization-server").json()
        challenge = httpx.post(f"{url}/mcp", headers=MCP_HEADERS, json=STATELESS_LIST)
    assert resource["authorization_servers"] == [url]
    assert (metadata["issuer"], metadata["token_endpoint"]) == (url, f"{url}/token")
    assert challenge.status_code == 401
