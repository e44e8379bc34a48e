"""The authorization server's endpoints under attack, over every store backend, on a real socket: PKCE
downgrades, redirect-URI games, code and refresh replays, another resource or audience, forged consent
forms, tenants outside the membership, and scope widening."""

from __future__ import annotations

import asyncio
import html
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import argon2
import httpx
import pytest
from mcp.shared.auth import OAuthMetadata

from mcpguard import (
    AuditQuery,
    BuiltInAuthorizationServer,
    ConfigError,
    LocalUsers,
    OAuthSettings,
    PreregisteredClient,
    SigningKeys,
    SQLiteAuditStore,
    StorageUnavailable,
    open_store,
)
from mcpguard.oauth.authorize import Page, Redirect
from tests.oauth.consent_client import CSRF_COOKIE, consent, form_of
from tests.oauth.flow_helpers import (
    CONFIGURED_CLIENT,
    MCP_HEADERS,
    PASSWORD,
    REDIRECT,
    STATELESS_LIST,
    Deployment,
    Pkce,
    authorize_url,
    deploy,
    register,
)


def run(body: Any) -> Any:
    """Run ``body(http)`` with a fresh HTTP client."""

    async def main() -> Any:
        async with httpx.AsyncClient(timeout=20) as http:
            return await body(http)

    return asyncio.run(main())


def refused(answer: httpx.Response) -> dict[str, str]:
    """The error a self-registered client is told: never by redirect, only by a link on an error page."""
    assert answer.status_code == 400
    assert "location" not in answer.headers
    match = re.search(r'<a id="back" href="([^"]*)"', answer.text)
    assert match is not None
    return query_of(html.unescape(match[1]))


def query_of(location: str | None) -> dict[str, str]:
    """The query parameters of a redirect, one value each."""
    assert location is not None
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def code_for(
    http: httpx.AsyncClient,
    deployment: Deployment,
    client_id: str,
    pkce: Pkce,
    *,
    user: str = "ada@acme.test",
    **overrides: str | None,
) -> str:
    """Sign in as ``user``, approve, and return the authorization code."""
    result = await consent(
        http, authorize_url(deployment, client_id, pkce, **overrides), username=user, password=PASSWORD
    )
    return query_of(result.location)["code"]


async def exchange(
    http: httpx.AsyncClient, deployment: Deployment, client_id: str, code: str, verifier: str | None, **extra: str
) -> httpx.Response:
    """POST the code to /token."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": client_id}
    if verifier is not None:
        form["code_verifier"] = verifier
    return await http.post(f"{deployment.url}/token", data=form | extra)


async def refresh(
    http: httpx.AsyncClient, deployment: Deployment, client_id: str, token: str, **extra: str
) -> httpx.Response:
    """POST a refresh grant to /token."""
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id}
    return await http.post(f"{deployment.url}/token", data=form | extra)


async def tools_list(http: httpx.AsyncClient, deployment: Deployment, access_token: str) -> httpx.Response:
    """A tools/list call at the protected resource with ``access_token``."""
    return await http.post(
        deployment.resource,
        headers=MCP_HEADERS | {"authorization": f"Bearer {access_token}"},
        json=STATELESS_LIST,
    )


async def tokens_for(
    http: httpx.AsyncClient, deployment: Deployment, **overrides: str | None
) -> tuple[str, dict[str, Any]]:
    """A registered client id and the token response of a fresh approval."""
    client_id = (await register(http, deployment))["client_id"]
    pkce = Pkce.new()
    code = await code_for(http, deployment, client_id, pkce, **overrides)
    answer = await exchange(http, deployment, client_id, code, pkce.verifier)
    assert answer.status_code == 200, answer.text
    return client_id, answer.json()


def test_metadata_is_rfc8414_and_names_s256_only(deployment: Deployment) -> None:
    """Both discovery paths serve the same document: exact issuer, S256 only, RFC 9207 iss, every endpoint;
    the resource's RFC 9728 metadata names this issuer."""

    async def body(http: httpx.AsyncClient) -> None:
        for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
            document = (await http.get(deployment.url + path)).json()
            OAuthMetadata.model_validate(document)
            assert document["issuer"] == deployment.url
            assert document["code_challenge_methods_supported"] == ["S256"]
            assert document["authorization_response_iss_parameter_supported"] is True
            assert document["token_endpoint"] == f"{deployment.url}/token"
            # No metadata-document fetcher here, so https client ids are not advertised (they would be unknown).
            assert document["client_id_metadata_document_supported"] is False
        keys = (await http.get(f"{deployment.url}/jwks.json")).json()["keys"]
        assert keys
        assert all("d" not in key for key in keys)
        resource = (await http.get(f"{deployment.url}/.well-known/oauth-protected-resource/mcp")).json()
        assert resource["authorization_servers"] == [deployment.url]

    run(body)


@pytest.mark.threat("T-PKCE-DOWNGRADE")
@pytest.mark.parametrize(
    "overrides",
    [
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},
        {"code_challenge": None},
        {"code_challenge": "short"},
    ],
)
def test_authorize_refuses_pkce_downgrade(deployment: Deployment, overrides: dict[str, str | None]) -> None:
    """Without an S256 challenge the request is refused as invalid_request (with state and iss for the client)."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), state="s1", **overrides))
        query = refused(answer)
        assert (query["error"], query["state"], query["iss"]) == ("invalid_request", "s1", deployment.url)
        assert "code" not in query

    run(body)


@pytest.mark.threat("T-PKCE-DOWNGRADE")
@pytest.mark.parametrize("verifier", [None, "wrong-" + "x" * 60, "short"])
def test_token_refuses_missing_or_wrong_verifier_and_burns_the_code(
    deployment: Deployment, verifier: str | None
) -> None:
    """A missing or wrong code_verifier is invalid_grant, and the code cannot be tried again with the right one."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        wrong = await exchange(http, deployment, client_id, code, verifier)
        assert (wrong.status_code, wrong.json()["error"]) == (400, "invalid_grant")
        right = await exchange(http, deployment, client_id, code, pkce.verifier)
        assert (right.status_code, right.json()["error"]) == (400, "invalid_grant")

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
@pytest.mark.parametrize(
    "redirect_uri",
    [
        REDIRECT + "/",
        REDIRECT.upper(),
        REDIRECT.replace("callback", "CALLBACK"),
        REDIRECT + "?x=1",
        REDIRECT + "#frag",
        "https://evil.example/callback",
        "http://127.0.0.1:1/callback/../evil",
        "",
        None,
    ],
)
def test_authorize_refuses_redirect_uri_variants_without_redirecting(
    deployment: Deployment, redirect_uri: str | None
) -> None:
    """Any redirect URI but the registered one, byte for byte, is answered here with an error page, never a
    redirect (so an attacker cannot steer a code or an error to a place of their choosing)."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), redirect_uri=redirect_uri))
        assert answer.status_code == 400
        assert "location" not in answer.headers
        assert answer.headers["content-type"].startswith("text/html")

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
@pytest.mark.parametrize(
    "uris",
    [
        ["http://evil.example/cb"],
        ["https://ok.example/cb#frag"],
        ["javascript:alert(1)"],
        [],
        ["https://u:p@h.example/"],
        ["not a url"],
    ],
)
def test_registration_refuses_unsafe_redirect_uris(deployment: Deployment, uris: list[str]) -> None:
    """Registration takes only https redirect URIs, or http on a loopback host, without fragment or userinfo."""

    async def body(http: httpx.AsyncClient) -> None:
        answer = await http.post(f"{deployment.url}/register", json={"redirect_uris": uris})
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_redirect_uri")

    run(body)


@pytest.mark.threat("T-DEEP-JSON")
def test_registration_refuses_json_nested_too_deep_to_read(deployment: Deployment) -> None:
    """A registration body nested past what the JSON parser can go is a client error, not a server failure."""

    async def body(http: httpx.AsyncClient) -> None:
        nested = b"[" * 5000 + b"]" * 5000
        headers = {"content-type": "application/json"}
        answer = await http.post(f"{deployment.url}/register", content=nested, headers=headers)
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_client_metadata")

    run(body)


@pytest.mark.threat("T-CODE-REPLAY")
def test_code_replay_revokes_what_the_code_issued(deployment: Deployment) -> None:
    """The second exchange of a code fails, and the tokens of the first stop working at once."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        first = await exchange(http, deployment, client_id, code, pkce.verifier)
        assert first.status_code == 200
        tokens = first.json()
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 200
        again = await exchange(http, deployment, client_id, code, pkce.verifier)
        assert (again.status_code, again.json()["error"]) == (400, "invalid_grant")
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 401
        dead = await refresh(http, deployment, client_id, tokens["refresh_token"])
        assert dead.json()["error"] == "invalid_grant"

    run(body)


@pytest.mark.threat("T-CODE-REPLAY")
def test_code_from_another_client_is_refused(deployment: Deployment) -> None:
    """A code stolen by another registered client cannot be exchanged by it."""

    async def body(http: httpx.AsyncClient) -> None:
        victim = (await register(http, deployment))["client_id"]
        thief = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, victim, pkce)
        stolen = await exchange(http, deployment, thief, code, pkce.verifier)
        assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")

    run(body)


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_resource_of_another_server_is_refused(deployment: Deployment) -> None:
    """Authorizing for another resource, or naming one at the token endpoint, is invalid_target."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), resource="https://other.example/mcp"))
        assert refused(answer)["error"] == "invalid_target"
        missing = await http.get(authorize_url(deployment, client_id, Pkce.new(), resource=None))
        assert refused(missing)["error"] == "invalid_request"
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        other = await exchange(http, deployment, client_id, code, pkce.verifier, resource="https://other.example/mcp")
        assert (other.status_code, other.json()["error"]) == (400, "invalid_target")

    run(body)


@pytest.mark.threat("T-TOKEN-PASSTHROUGH")
def test_token_for_another_audience_is_refused_at_the_resource(deployment: Deployment) -> None:
    """A token signed by this very issuer but for another resource is refused (401)."""

    async def body(http: httpx.AsyncClient) -> None:
        _, tokens = await tokens_for(http, deployment)
        grants = await deployment.store.list_grants("acme")
        foreign = deployment.oauth.issuer.issue(
            audience="https://other.example/mcp",
            subject="user:x",
            tenant="acme",
            scopes=["mcp:read"],
            client_id="c",
            grant_id=grants[0].grant_id,
        )
        assert (await tools_list(http, deployment, foreign.token)).status_code == 401
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 200

    run(body)


@pytest.mark.threat("T-REFRESH-REPLAY")
def test_sequential_refresh_replay_revokes_the_family(deployment: Deployment) -> None:
    """A rotated refresh token presented again revokes the family: the newest refresh and access tokens die."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, deployment)
        second = (await refresh(http, deployment, client_id, first["refresh_token"])).json()
        assert second["refresh_token"] != first["refresh_token"]
        assert (await tools_list(http, deployment, second["access_token"])).status_code == 200
        replay = await refresh(http, deployment, client_id, first["refresh_token"])
        assert (replay.status_code, replay.json()["error"]) == (400, "invalid_grant")
        assert (await refresh(http, deployment, client_id, second["refresh_token"])).status_code == 400
        assert (await tools_list(http, deployment, second["access_token"])).status_code == 401
        grants = await deployment.store.list_grants("acme")
        assert [g.revoked_reason for g in grants] == ["reuse"]

    run(body)


@pytest.mark.threat("T-REFRESH-REPLAY")
def test_twenty_concurrent_refreshes_leave_no_live_token(deployment: Deployment) -> None:
    """Twenty refreshes of one token at once: at most one gets tokens, the reuse revokes the family, and no
    token of it works afterwards (never two live refresh tokens, never tokens from a revoked family)."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, deployment)
        answers = await asyncio.gather(
            *(refresh(http, deployment, client_id, first["refresh_token"]) for _ in range(20))
        )
        winners = [a.json() for a in answers if a.status_code == 200]
        assert len(winners) <= 1
        assert all(a.json()["error"] == "invalid_grant" for a in answers if a.status_code != 200)
        for won in winners:
            assert (await tools_list(http, deployment, won["access_token"])).status_code == 401
            assert (await refresh(http, deployment, client_id, won["refresh_token"])).status_code == 400
        grants = await deployment.store.list_grants("acme")
        assert grants[0].revoked_reason == "reuse"

    run(body)


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_refresh_cannot_widen_scope_or_change_resource(deployment: Deployment) -> None:
    """Asking for more scope on refresh is invalid_scope; naming another resource is invalid_target."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, first = await tokens_for(http, deployment)
        wider = await refresh(http, deployment, client_id, first["refresh_token"], scope="mcp:read mcp:admin")
        assert (wider.status_code, wider.json()["error"]) == (400, "invalid_scope")
        other = await refresh(http, deployment, client_id, first["refresh_token"], resource="https://other.example/mcp")
        assert (other.status_code, other.json()["error"]) == (400, "invalid_target")
        same = await refresh(http, deployment, client_id, first["refresh_token"], scope="mcp:read")
        assert same.json()["scope"] == "mcp:read"

    run(body)


@pytest.mark.threat("T-SCOPE-ESCALATE")
def test_user_grants_only_the_scopes_they_hold(deployment: Deployment) -> None:
    """ada (read only) approving a request for read and admin grants read alone; a wipe call is refused."""

    async def body(http: httpx.AsyncClient) -> None:
        _, tokens = await tokens_for(http, deployment, scope="mcp:read mcp:admin")
        assert tokens["scope"] == "mcp:read"

    run(body)


@pytest.mark.threat("T-TENANT-SPOOF")
def test_grant_is_bound_to_the_chosen_tenant_and_only_a_member_one(deployment: Deployment) -> None:
    """bob picks globex and his token is bound to it; a forged form naming a tenant he is not in is refused."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        result = await consent(
            http,
            authorize_url(deployment, client_id, pkce),
            username="bob@acme.test",
            password=PASSWORD,
            tenant="globex",
        )
        code = query_of(result.location)["code"]
        tokens = (await exchange(http, deployment, client_id, code, pkce.verifier)).json()
        principal = await deployment.oauth.verifier.verify(tokens["access_token"])
        assert principal.tenant == "globex"
        forged = await consent(
            http,
            authorize_url(deployment, client_id, Pkce.new()),
            username="bob@acme.test",
            password=PASSWORD,
            tenant="initech",
        )
        assert forged.responses[-1].status_code == 403
        assert forged.location is None

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
def test_consent_post_without_the_csrf_cookie_or_token_is_refused(deployment: Deployment) -> None:
    """A cross-site form post (no cookie, or a token that is not the cookie's) never signs in or approves."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        page = await http.get(authorize_url(deployment, client_id, Pkce.new()))
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"{CSRF_COOKIE}=")
        assert all(flag in cookie for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"))
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        fields = form_of(page.text).fields | {"username": "ada@acme.test", "password": PASSWORD}
        async with httpx.AsyncClient() as bare:
            no_cookie = await bare.post(f"{deployment.url}/authorize", data=fields)
            assert no_cookie.status_code == 403
            other = await bare.post(
                f"{deployment.url}/authorize",
                data=fields | {"csrf": "x" * 43},
                headers={"cookie": f"{CSRF_COOKIE}={'y' * 43}"},
            )
            assert other.status_code == 403

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
def test_forged_sign_in_ticket_is_refused(deployment: Deployment) -> None:
    """The consent step needs the ticket the server MACed at sign-in: an altered one is refused."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        page = await http.get(authorize_url(deployment, client_id, Pkce.new()))
        cookie = (
            {"cookie": f"{CSRF_COOKIE}={page.cookies[CSRF_COOKIE]}"}
            if CSRF_COOKIE in page.cookies
            else {"cookie": page.headers["set-cookie"].split(";")[0]}
        )
        fields = form_of(page.text).fields | {"username": "ada@acme.test", "password": PASSWORD}
        consent_page = await http.post(f"{deployment.url}/authorize", data=fields, headers=cookie)
        decide = form_of(consent_page.text).fields | {"decision": "approve", "tenant": "acme"}
        encoded, _, mac = decide["ticket"].partition(".")
        decide["ticket"] = encoded[:-2] + ("AA" if encoded[-2:] != "AA" else "BB") + "." + mac
        answer = await http.post(f"{deployment.url}/authorize", data=decide, headers=cookie)
        assert answer.status_code == 403
        assert "location" not in answer.headers

    run(body)


def test_wrong_password_shows_the_form_again_without_a_code(deployment: Deployment) -> None:
    """A wrong password is answered with the sign-in form (401) and no redirect."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        result = await consent(
            http,
            authorize_url(deployment, client_id, Pkce.new()),
            username="ada@acme.test",
            password="not the password at all",
        )
        assert [r.status_code for r in result.responses] == [200, 401]
        assert result.location is None

    run(body)


def test_denied_consent_offers_access_denied(deployment: Deployment) -> None:
    """Deny gives the self-registered client access_denied with its state and no code, through a link."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        result = await consent(
            http,
            authorize_url(deployment, client_id, Pkce.new(), state="keep"),
            username="ada@acme.test",
            password=PASSWORD,
            decision="deny",
        )
        query = refused(result.responses[-1])
        assert (query["error"], query["state"]) == ("access_denied", "keep")
        assert "code" not in query

    run(body)


def test_revoking_the_access_token_ends_the_grant(deployment: Deployment) -> None:
    """RFC 7009 with the access token: the grant ends, so its refresh token dies too; unknown tokens are 200."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, deployment)
        form = {"token": tokens["access_token"], "client_id": client_id}
        assert (await http.post(f"{deployment.url}/oauth/revoke", data=form)).status_code == 200
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 401
        assert (await refresh(http, deployment, client_id, tokens["refresh_token"])).status_code == 400
        unknown = {"token": "nothing-of-ours", "client_id": client_id}
        assert (await http.post(f"{deployment.url}/oauth/revoke", data=unknown)).status_code == 200

    run(body)


@pytest.mark.threat("T-REFRESH-REPLAY")
def test_another_client_cannot_revoke_or_refresh_a_grant(deployment: Deployment) -> None:
    """A second client holding a stolen refresh token can neither use nor revoke it."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, deployment)
        thief = (await register(http, deployment))["client_id"]
        stolen = await refresh(http, deployment, thief, tokens["refresh_token"])
        assert stolen.json()["error"] == "invalid_grant"
        await http.post(f"{deployment.url}/oauth/revoke", data={"token": tokens["refresh_token"], "client_id": thief})
        assert (await refresh(http, deployment, client_id, tokens["refresh_token"])).status_code == 200

    run(body)


def test_grace_window_lets_the_previous_token_refresh_once_more(tmp_path: Path) -> None:
    """With a grace window, the token just rotated still refreshes (a second tab); its earlier successor dies."""
    with deploy("memory", tmp_path, grace=timedelta(seconds=30)) as deployment:

        async def body(http: httpx.AsyncClient) -> None:
            client_id, first = await tokens_for(http, deployment)
            second = (await refresh(http, deployment, client_id, first["refresh_token"])).json()
            third = await refresh(http, deployment, client_id, first["refresh_token"])
            assert third.status_code == 200
            assert (await refresh(http, deployment, client_id, third.json()["refresh_token"])).status_code == 200
            assert (await refresh(http, deployment, client_id, second["refresh_token"])).status_code == 400

        run(body)


@pytest.mark.threat("T-REFRESH-REPLAY", "T-CODE-REPLAY")
def test_replays_are_in_the_tenants_audit_trail(tmp_path: Path) -> None:
    """A replayed refresh token and a replayed code are each recorded as denied with reason "replay", under
    the grant's tenant, subject and grant id, so the tenant's reviewer sees them."""
    audit = SQLiteAuditStore(str(tmp_path / "audit.db"))
    with deploy("memory", tmp_path, audit=audit) as deployment:

        async def body(http: httpx.AsyncClient) -> list[dict[str, Any]]:
            client_id, first = await tokens_for(http, deployment)
            await refresh(http, deployment, client_id, first["refresh_token"])
            await refresh(http, deployment, client_id, first["refresh_token"])
            pkce = Pkce.new()
            code = await code_for(http, deployment, client_id, pkce)
            await exchange(http, deployment, client_id, code, pkce.verifier)
            await exchange(http, deployment, client_id, code, pkce.verifier)
            # An entry is written once its answer has gone, so the last one may still be on its way.
            for _ in range(100):
                calls = (await audit.query(AuditQuery(tenant="acme", limit=100))).calls
                if sum(c["reason"] == "replay" for c in calls) == 2:
                    break
                await asyncio.sleep(0.05)
            return calls

        calls = run(body)
    asyncio.run(audit.close())
    replays = [c for c in calls if c["reason"] == "replay"]
    assert len(replays) == 2
    assert all((c["path"], c["status"], c["decision"]) == ("/token", 400, "denied") for c in replays)
    assert all(c["subject"].startswith("user:") and c["credential_id"].startswith("g_") for c in replays)
    assert len({c["credential_id"] for c in replays}) == 2


@pytest.mark.threat("T-PASSWORD-GUESS")
def test_password_guessing_is_limited_per_address(tmp_path: Path) -> None:
    """Failed sign-ins count against the per-address limit: past it, even the right password gets 429 and
    no password is checked, for the guessing address."""
    # Four attempts a minute: the client's registration is one, then three sign-ins.
    with deploy("memory", tmp_path, failed_auth_limit="4/minute") as deployment:

        async def body(http: httpx.AsyncClient) -> list[int]:
            client_id = (await register(http, deployment))["client_id"]
            statuses = []
            for password in ["wrong password 1", "wrong password 2", "wrong password 3", PASSWORD]:
                result = await consent(
                    http, authorize_url(deployment, client_id, Pkce.new()), username="ada@acme.test", password=password
                )
                statuses.append(result.responses[-1].status_code)
            return statuses

        assert run(body) == [401, 401, 401, 429]


@pytest.mark.threat("T-REDIRECT-URI")
def test_only_configured_clients_get_error_redirects(deployment: Deployment) -> None:
    """A self-registered client (anyone can register any https URI) is never redirected to without a person
    choosing to follow a link; a client the operator configured gets the error by redirect."""

    async def body(http: httpx.AsyncClient) -> None:
        registered = (await register(http, deployment, redirect_uris=["https://evil.example/phish"]))["client_id"]
        lure = authorize_url(
            deployment, registered, Pkce.new(), response_type="nope", redirect_uri="https://evil.example/phish"
        )
        assert refused(await http.get(lure))["error"] == "unsupported_response_type"
        configured = authorize_url(deployment, CONFIGURED_CLIENT, Pkce.new(), response_type="nope")
        answer = await http.get(configured)
        assert answer.status_code == 303
        assert query_of(answer.headers["location"])["error"] == "unsupported_response_type"

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
def test_loopback_redirect_may_use_any_port_but_nothing_else(deployment: Deployment) -> None:
    """RFC 8252: a native app's loopback IP redirect URI matches on any port, and the code is bound to the one
    used; another host name, path or scheme still does not match."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        other_port = "http://127.0.0.1:5555/callback"
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce, redirect_uri=other_port)
        assert (await exchange(http, deployment, client_id, code, pkce.verifier)).json()["error"] == "invalid_grant"
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce, redirect_uri=other_port)
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": other_port, "client_id": client_id}
        assert (
            await http.post(f"{deployment.url}/token", data=form | {"code_verifier": pkce.verifier})
        ).status_code == 200
        for wrong in (
            "http://localhost:5555/callback",
            "http://127.0.0.1:5555/other",
            "https://127.0.0.1:5555/callback",
        ):
            answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), redirect_uri=wrong))
            assert answer.status_code == 400
            assert 'id="back"' not in answer.text

    run(body)


def test_a_step_up_may_ask_for_scopes_the_held_ones_include(deployment: Deployment) -> None:
    """bob holds mcp:admin, which includes mcp:write: he can grant write although he does not hold it by name."""

    async def body(http: httpx.AsyncClient) -> None:
        _, tokens = await tokens_for(http, deployment, user="bob@acme.test", scope="mcp:write")
        assert tokens["scope"] == "mcp:write"

    run(body)


@pytest.mark.threat("T-STORE-FAIL")
def test_revocation_fails_closed_when_the_grant_store_fails(deployment: Deployment) -> None:
    """If the grant cannot be looked up, revocation answers 503 rather than a 200 that revoked nothing."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, deployment)

        async def broken(grant_id: str) -> None:
            raise StorageUnavailable("storage unavailable")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(deployment.store, "get_grant", broken)
            form = {"token": tokens["access_token"], "client_id": client_id}
            answer = await http.post(f"{deployment.url}/oauth/revoke", data=form)
        assert answer.status_code == 503
        assert (await refresh(http, deployment, client_id, tokens["refresh_token"])).status_code == 200

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
def test_ticket_from_another_browser_and_non_ascii_fields_are_refused(deployment: Deployment) -> None:
    """A consent ticket only works with the CSRF cookie it was issued with, and non-ASCII in the MACed fields
    is a plain refusal, never a server error."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        url = authorize_url(deployment, client_id, Pkce.new())
        page = await http.get(url)
        mine = page.headers["set-cookie"].split(";")[0]
        fields = form_of(page.text).fields | {"username": "ada@acme.test", "password": PASSWORD}
        consent_page = await http.post(f"{deployment.url}/authorize", data=fields, headers={"cookie": mine})
        decide = form_of(consent_page.text).fields | {"decision": "approve", "tenant": "acme"}
        async with httpx.AsyncClient() as other:
            theirs_page = await other.get(url)
            theirs = theirs_page.headers["set-cookie"].split(";")[0]
            stolen = decide | {"csrf": form_of(theirs_page.text).fields["csrf"]}
            answer = await other.post(f"{deployment.url}/authorize", data=stolen, headers={"cookie": theirs})
            assert answer.status_code == 403
            for name in ("csrf", "ticket"):
                odd = await other.post(
                    f"{deployment.url}/authorize", data=decide | {name: "é"}, headers={"cookie": mine}
                )
                assert odd.status_code == 403

    run(body)


@pytest.mark.threat("T-PASSWORD-GUESS")
def test_parallel_password_guesses_cannot_pass_the_limit_together(tmp_path: Path) -> None:
    """Ten wrong passwords sent at once against a limit of three: at most three are checked, the rest get 429."""
    with deploy("memory", tmp_path, failed_auth_limit="3/minute") as deployment:

        async def body(http: httpx.AsyncClient) -> list[int]:
            client_id = (await register(http, deployment))["client_id"]
            url = authorize_url(deployment, client_id, Pkce.new())
            page = await http.get(url)
            cookie = {"cookie": page.headers["set-cookie"].split(";")[0]}
            fields = form_of(page.text).fields | {"username": "ada@acme.test"}
            answers = await asyncio.gather(
                *(
                    http.post(
                        f"{deployment.url}/authorize",
                        data=fields | {"password": f"guess {i:03d} wrong"},
                        headers=cookie,
                    )
                    for i in range(10)
                )
            )
            return sorted(a.status_code for a in answers)

        statuses = run(body)
    assert statuses.count(401) <= 3
    assert statuses.count(429) >= 7


def test_a_form_from_one_replica_is_accepted_by_another(tmp_path: Path) -> None:
    """Replicas sharing the signing keys derive the same form key: a sign-in page served by one may be posted
    to another (no sticky sessions); a replica with other keys refuses it."""
    store = open_store("memory://")
    users = LocalUsers(store, hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))
    settings = OAuthSettings(
        issuer="https://mcp.example.test",
        resource="https://mcp.example.test/mcp",
        clients=(PreregisteredClient(client_id="c", redirect_uris=(REDIRECT,)),),
    )

    def replica(keys: Path) -> BuiltInAuthorizationServer:
        return BuiltInAuthorizationServer(
            settings, store=store, keys=SigningKeys.load_or_create(keys), authenticator=users
        )

    async def body() -> list[int]:
        await users.add(email="ada@acme.test", password=PASSWORD, tenants=["acme"])
        one, two, stranger = replica(tmp_path / "keys"), replica(tmp_path / "keys"), replica(tmp_path / "other")
        params = parse_qs(urlsplit(authorize_url_for(settings, "c")).query)
        request = await one.authorizer.check({k: v[0] for k, v in params.items()})
        assert not isinstance(request, Page | Redirect)
        page = one.authorizer.sign_in_page(request, None)
        assert page.set_cookie is not None
        form = form_of(page.html).fields | {"username": "ada@acme.test", "password": PASSWORD}
        answers = [await other.authorizer.submit(form, page.set_cookie) for other in (two, stranger)]
        return [answer.status for answer in answers if isinstance(answer, Page)]

    assert asyncio.run(body()) == [200, 403]


def authorize_url_for(settings: OAuthSettings, client_id: str) -> str:
    """An authorization request for ``client_id`` at ``settings``' server."""
    pkce = Pkce.new()
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "resource": settings.resource,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
    }
    return f"{settings.origin}/authorize?" + urlencode(query)


def test_token_errors_are_readable_cross_origin(deployment: Deployment) -> None:
    """A browser-based client can read a token error (CORS on refusals too), not only a success."""

    async def body(http: httpx.AsyncClient) -> None:
        answer = await http.post(
            f"{deployment.url}/token",
            data={"grant_type": "refresh_token", "refresh_token": "nope", "client_id": "nobody"},
            headers={"origin": "http://localhost:6274"},
        )
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_client")
        assert answer.headers["access-control-allow-origin"] == "*"

    run(body)


def test_configured_clients_need_safe_redirect_uris() -> None:
    """A client in configuration with a plain-http remote or fragment redirect URI is a configuration error."""
    for uri in ("http://evil.example/cb", "https://ok.example/cb#x"):
        with pytest.raises(ConfigError, match="redirect URI"):
            OAuthSettings(
                issuer="https://mcp.example.test",
                resource="https://mcp.example.test/mcp",
                clients=(PreregisteredClient(client_id="c", redirect_uris=(uri,)),),
            )


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_a_disabled_user_can_neither_exchange_nor_refresh(deployment: Deployment) -> None:
    """Disabling a user in the store (however it is done) stops their grants refreshing and their codes
    being exchanged: the account is asked again on every exchange and refresh."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, deployment)
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        ada = await deployment.store.get_user_by_email("ada@acme.test")
        assert ada is not None
        await deployment.store.disable_user(ada.user_id, datetime.now(UTC))
        refreshed = await refresh(http, deployment, client_id, tokens["refresh_token"])
        assert (refreshed.status_code, refreshed.json()["error"]) == (400, "invalid_grant")
        exchanged = await exchange(http, deployment, client_id, code, pkce.verifier)
        assert (exchanged.status_code, exchanged.json()["error"]) == (400, "invalid_grant")

    run(body)


@pytest.mark.threat("T-CODE-REPLAY")
def test_a_code_replayed_during_its_first_exchange_leaves_nothing_alive(deployment: Deployment) -> None:
    """A replay that arrives while the first exchange is still storing its grant makes that exchange fail
    too, and the grant it stored is revoked: nothing issued from a replayed code lives."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        real_add = deployment.store.add_grant

        async def slow_add(grant: Any, refresh_hash: str) -> None:
            await asyncio.sleep(0.3)  # widens the one-store-call window so the replay lands inside it
            await real_add(grant, refresh_hash)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(deployment.store, "add_grant", slow_add)
            first, replay = await asyncio.gather(
                exchange(http, deployment, client_id, code, pkce.verifier),
                exchange(http, deployment, client_id, code, pkce.verifier),
            )
        assert [first.status_code, replay.status_code] == [400, 400]
        [grant] = await deployment.store.list_grants("acme")
        assert grant.revoked_reason == "code_replay"

    run(body)


@pytest.mark.threat("T-BODY-EXHAUST")
def test_oversized_bodies_are_refused_at_the_oauth_endpoints(deployment: Deployment) -> None:
    """A registration or token body past 64 KiB is 413, declared or streamed, before anything is parsed."""

    async def body(http: httpx.AsyncClient) -> None:
        huge = {"redirect_uris": [REDIRECT], "client_name": "x" * 70_000}
        assert (await http.post(f"{deployment.url}/register", json=huge)).status_code == 413

        async def streamed() -> Any:
            for _ in range(20):
                yield b"a=" + b"b" * 4096 + b"&"

        answer = await http.post(
            f"{deployment.url}/token",
            content=streamed(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 413

    run(body)
