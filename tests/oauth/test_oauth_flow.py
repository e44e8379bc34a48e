"""The whole OAuth flow as a real MCP client runs it against the embedded guard on a real socket:
discovery, registration, consent, token, tool call, refresh, tool call, revocation, 401."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from tests.oauth.flow_helpers import REDIRECT, Deployment, MemoryTokens, Person, deploy


@pytest.fixture(params=["memory", "sqlite"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """The guarded notes server with the built-in authorization server, over each store backend."""
    with deploy(request.param, tmp_path) as running:
        yield running


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


async def call(url: str, provider: OAuthClientProvider, tool: str) -> Any:
    """Call ``tool`` over a fresh MCP session authorised by ``provider``."""
    async with (
        httpx2.AsyncClient(auth=provider) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="auto") as client,
    ):
        return await client.call_tool(tool, {})


def test_full_flow_discovery_to_revocation(deployment: Deployment) -> None:
    """The SDK client discovers, registers, is approved, calls a tool, refreshes, calls again; once its
    grant is revoked, the access token it still holds is refused with 401."""
    storage, person = MemoryTokens(), Person()
    provider = provider_for(deployment.url, storage, person)

    async def flow() -> None:
        first = await call(deployment.url, provider, "whoami")
        assert first.is_error is False
        assert first.content[0].text.startswith("acme/user:")
        assert person.pages == [200, 200, 303]
        assert storage.tokens is not None
        assert storage.client is not None
        issued = storage.tokens
        # The client thinks its access token expired, so the next call refreshes it first.
        provider.context.token_expiry_time = 1.0
        second = await call(deployment.url, provider, "whoami")
        assert second.is_error is False
        assert storage.tokens.refresh_token != issued.refresh_token
        assert storage.tokens.access_token != issued.access_token
        async with httpx.AsyncClient() as http:
            revoked = await http.post(
                f"{deployment.url}/oauth/revoke",
                data={"token": storage.tokens.refresh_token, "client_id": storage.client.client_id},
            )
            assert revoked.status_code == 200
            after = await http.post(
                f"{deployment.url}/mcp",
                headers={
                    "authorization": f"Bearer {storage.tokens.access_token}",
                    "content-type": "application/json",
                    "accept": "application/json, text/event-stream",
                },
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
            )
        assert after.status_code == 401
        assert 'error="invalid_token"' in after.headers["www-authenticate"]

    asyncio.run(flow())
