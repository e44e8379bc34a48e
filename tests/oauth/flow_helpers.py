"""What the OAuth tests share: a guarded MCP app with the built-in authorization server on a real socket,
a local user to sign in as, and the pieces an MCP client's OAuth flow needs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import argon2
import httpx
import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp.types import ToolAnnotations

from mcpguard import AuditStore, GuardConfig, MCPGuard, Store, current_principal, open_store
from mcpguard.oauth.builtin import BuiltInAuthorizationServer
from mcpguard.oauth.settings import OAuthSettings, PreregisteredClient
from mcpguard.oauth.signing import SigningKeys
from mcpguard.oauth.users import LocalUsers
from tests.conftest import cheap_keyring, free_port, serve
from tests.oauth.consent_client import consent

PASSWORD = "correct horse battery staple"
REDIRECT = "http://127.0.0.1:1/callback"
# A public client the operator configured (its redirect URI is trusted with error redirects).
CONFIGURED_CLIENT = "configured-client"
# A stateless (2026-07-28) tools/list: one POST, no session to open first.
MCP_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/list",
}
STATELESS_LIST = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/list",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    },
}

server = MCPServer("oauth-notes")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def whoami() -> str:
    """The tenant and subject the guard bound this call to."""
    principal = current_principal()
    assert principal is not None
    return f"{principal.tenant}/{principal.subject}"


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def wipe() -> str:
    """A destructive tool: needs mcp:admin."""
    return "wiped"


@dataclass
class Deployment:
    """A running guard with the built-in authorization server, and the store behind it."""

    url: str
    store: Store
    oauth: BuiltInAuthorizationServer

    @property
    def resource(self) -> str:
        return f"{self.url}/mcp"


def store_url(kind: str, tmp_path: Path) -> str:
    """A store of ``kind`` (memory or sqlite) in ``tmp_path``."""
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path / 'state.db'}"


@contextmanager
def deploy(
    kind: str,
    tmp_path: Path,
    *,
    grace: timedelta = timedelta(0),
    audit: AuditStore | None = None,
    failed_auth_limit: str = "20/minute",
) -> Iterator[Deployment]:
    """The notes server behind the guard with the built-in authorization server, over a ``kind`` store, with
    users ada (acme, read) and bob (acme and globex, read and admin); audited into ``audit`` when given."""
    store = open_store(store_url(kind, tmp_path))
    users = LocalUsers(store, hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))

    async def add_users() -> None:
        await users.add(email="ada@acme.test", password=PASSWORD, tenants=["acme"], scopes=["mcp:read"])
        await users.add(
            email="bob@acme.test", password=PASSWORD, tenants=["acme", "globex"], scopes=["mcp:read", "mcp:admin"]
        )

    asyncio.run(add_users())
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    oauth = BuiltInAuthorizationServer(
        OAuthSettings(
            issuer=origin,
            resource=f"{origin}/mcp",
            refresh_grace=grace,
            clients=(PreregisteredClient(client_id=CONFIGURED_CLIENT, redirect_uris=(REDIRECT,)),),
        ),
        store=store,
        keys=SigningKeys.load_or_create(tmp_path / "keys"),
        authenticator=users,
    )
    app = MCPGuard(
        server.streamable_http_app(host="127.0.0.1"),
        GuardConfig(public_url=origin),
        keys=cheap_keyring(store),
        oauth=oauth,
        audit=audit,
        failed_auth_limit=failed_auth_limit,
    )
    with serve(app, port) as url:
        yield Deployment(url, store, oauth)


class MemoryTokens:
    """An MCP client's token storage, kept in memory so a test can read what it holds."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class Person:
    """Plays the person at the browser: signs in and approves, and hands the code back to the client."""

    def __init__(self, username: str = "ada@acme.test") -> None:
        self.username = username
        self.callback: dict[str, list[str]] = {}
        self.pages: list[int] = []

    async def redirect(self, authorization_url: str) -> None:
        async with httpx.AsyncClient() as http:
            result = await consent(http, authorization_url, username=self.username, password=PASSWORD)
        self.pages = [r.status_code for r in result.responses]
        assert result.location is not None, self.pages
        assert result.location.startswith(REDIRECT)
        self.callback = parse_qs(urlsplit(result.location).query)

    async def code(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=self.callback["code"][0], state=self.callback["state"][0], iss=self.callback["iss"][0]
        )


def provider_for(url: str, storage: MemoryTokens, person: Person) -> OAuthClientProvider:
    """The SDK's OAuth client for the guard at ``url``, registering itself as a public client."""
    return OAuthClientProvider(
        server_url=f"{url}/mcp",
        client_metadata=OAuthClientMetadata(
            client_name="flow test",
            redirect_uris=[REDIRECT],  # type: ignore[list-item]  # pydantic parses the string
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
            scope="mcp:read",
        ),
        storage=storage,
        redirect_handler=person.redirect,
        callback_handler=person.code,
    )


async def call(url: str, provider: OAuthClientProvider, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    """Call ``tool`` with ``arguments`` over a fresh MCP session authorised by ``provider``."""
    async with (
        httpx2.AsyncClient(auth=provider) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="auto") as client,
    ):
        return await client.call_tool(tool, arguments or {})


@dataclass
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode()).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


def authorize_url(deployment: Deployment, client_id: str, pkce: Pkce, **overrides: str | None) -> str:
    """An authorization request URL with every required parameter, changed or dropped (None) by ``overrides``."""
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "state": "st-" + secrets.token_hex(4),
        "scope": "mcp:read",
        "resource": deployment.resource,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
    } | overrides
    return f"{deployment.url}/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


async def register(http: httpx.AsyncClient, deployment: Deployment, **metadata: Any) -> dict[str, Any]:
    """Register a public client redirecting to ``REDIRECT`` (metadata overrides any field)."""
    body = {
        "client_name": "adversary test",
        "redirect_uris": [REDIRECT],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
    } | metadata
    answer = await http.post(f"{deployment.url}/register", json=body)
    assert answer.status_code == 201, answer.text
    registered: dict[str, Any] = answer.json()
    return registered
