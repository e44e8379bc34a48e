"""The whole OAuth flow as a real MCP client runs it against the embedded guard on a real socket:
discovery, registration, consent, token, tool call, refresh, tool call, revocation, 401."""

from __future__ import annotations

import asyncio

import httpx

from tests.oauth.flow_helpers import Deployment, MemoryTokens, Person, call, provider_for


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


def test_insufficient_scope_steps_up_to_a_new_authorization(deployment: Deployment) -> None:
    """A read-only token calling a destructive tool gets 403 insufficient_scope naming mcp:admin; the SDK
    client asks for that scope in a new authorization, the person approves it, and the call goes through."""
    storage, person = MemoryTokens(), Person("bob@acme.test")
    provider = provider_for(deployment.url, storage, person)

    async def flow() -> None:
        assert (await call(deployment.url, provider, "whoami")).is_error is False
        assert storage.tokens is not None
        assert storage.tokens.scope == "mcp:read"
        wiped = await call(deployment.url, provider, "wipe")
        assert wiped.is_error is False
        assert wiped.content[0].text == "wiped"
        assert set(storage.tokens.scope.split()) == {"mcp:read", "mcp:admin"}

    asyncio.run(flow())
