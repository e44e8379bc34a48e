"""The authorization server probed the way an attacker would, beyond the basic attacks: loopback redirect
URIs that only look registered, error paths that must never redirect, registration metadata of the
wrong shape, consent fields changed after sign-in, tokens and revocations across clients, and what the
answers disclose or let a cache keep."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.oauth.consent_client import consent, form_of
from tests.oauth.flow_helpers import (
    CONFIGURED_CLIENT,
    PASSWORD,
    REDIRECT,
    Deployment,
    Pkce,
    authorize_url,
    deploy,
    register,
)
from tests.oauth.test_authorization_server import (
    code_for,
    exchange,
    query_of,
    refresh,
    run,
    tokens_for,
    tools_list,
)

FRAMING = "frame-ancestors 'none'"


def assert_error_page(answer: httpx.Response) -> None:
    """An error shown here: 400, HTML, no redirect, and not frameable."""
    assert answer.status_code == 400, answer.text
    assert "location" not in answer.headers
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["x-frame-options"] == "DENY"
    assert FRAMING in answer.headers["content-security-policy"]


def cookie_of(page: httpx.Response) -> dict[str, str]:
    """The CSRF cookie the sign-in page set, as a request header."""
    return {"cookie": page.headers["set-cookie"].split(";")[0]}


@pytest.mark.threat("T-REDIRECT-URI")
@pytest.mark.parametrize(
    "presented",
    [
        "http://127.0.0.1:5555/call\tback",
        "http://127.0.0.1:5555/call\r\nback",
        "http://127.0.0.1:1/callback\n",
        "http://attacker@127.0.0.1:5555/callback",
        "http://127.0.0.1:5555/callback#",
        "http://127.0.0.1:5555/callback?",
    ],
)
def test_loopback_port_leniency_keeps_the_rest_byte_for_byte(deployment: Deployment, presented: str) -> None:
    """RFC 8252 lets only the port of a loopback redirect URI vary: a URI that differs in anything else
    (tab or line break characters a URL parser drops, user info, an empty fragment or query) is not the
    registered one and is answered with an error page, never with a sign-in form that leads to a redirect."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), redirect_uri=presented))
        assert_error_page(answer)

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
def test_approval_with_a_line_break_in_the_redirect_uri_still_gets_an_answer(tmp_path: Path) -> None:
    """A person who signs in and approves a request whose loopback redirect URI carries CR LF is answered
    (an error page or a well-formed redirect), never with a dropped connection after a code was minted."""
    with deploy("memory", tmp_path) as deployment:

        async def body(http: httpx.AsyncClient) -> None:
            client_id = (await register(http, deployment))["client_id"]
            url = authorize_url(deployment, client_id, Pkce.new(), redirect_uri="http://127.0.0.1:5555/call\r\nback")
            try:
                result = await consent(http, url, username="ada@acme.test", password=PASSWORD)
            except httpx.RemoteProtocolError as exc:
                pytest.fail(f"the server dropped the connection instead of answering: {exc}")
            location = result.location or ""
            assert "\r" not in location
            assert "\n" not in location

        run(body)


@pytest.mark.parametrize(
    ("registered", "presented"),
    [
        ("http://127.0.0.1/callback", "http://127.0.0.1:5555/callback"),
        ("http://[::1]:1/callback", "http://[::1]:5555/callback"),
    ],
)
def test_loopback_redirect_accepts_any_port_at_request_time(
    deployment: Deployment, registered: str, presented: str
) -> None:
    """RFC 8252 §7.3: a loopback IP redirect URI, registered with or without a port, matches a request on
    any port (a native app listens on whatever ephemeral port it gets), for IPv4 and IPv6 alike."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment, redirect_uris=[registered]))["client_id"]
        answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), redirect_uri=presented))
        assert answer.status_code == 200, answer.text
        assert 'name="password"' in answer.text

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "mc_not-registered", "redirect_uri": "https://evil.example/cb"},
        {"client_id": None, "redirect_uri": "https://evil.example/cb"},
        {"client_id": "https://evil.example/client.json", "redirect_uri": "https://evil.example/cb"},
        {"client_id": CONFIGURED_CLIENT, "redirect_uri": "https://evil.example/cb", "response_type": "token"},
        {"client_id": CONFIGURED_CLIENT, "redirect_uri": REDIRECT + "/", "code_challenge_method": "plain"},
        {"client_id": CONFIGURED_CLIENT, "redirect_uri": "javascript:alert(1)//" + REDIRECT},
    ],
)
def test_unknown_client_or_unregistered_uri_never_redirects(
    deployment: Deployment, overrides: dict[str, str | None]
) -> None:
    """An unknown, missing or unfetchable client_id, or a redirect URI a configured client never registered,
    is an error page (not frameable), even when the request has other errors a client would be told."""

    async def body(http: httpx.AsyncClient) -> None:
        params = dict(overrides)
        client_id = params.pop("client_id") or ""
        assert_error_page(await http.get(authorize_url(deployment, client_id, Pkce.new(), **params)))

    run(body)


def test_code_redirect_carries_state_and_the_issuer(deployment: Deployment) -> None:
    """RFC 9207: the code goes back with the client's state and this server's exact issuer, on a 303 that
    is neither cached nor leaks the code in a referrer."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        url = authorize_url(deployment, client_id, Pkce.new(), state="s&t=ate ü")
        result = await consent(http, url, username="ada@acme.test", password=PASSWORD)
        last = result.responses[-1]
        assert last.status_code == 303
        assert (last.headers["cache-control"], last.headers["referrer-policy"]) == ("no-store", "no-referrer")
        location = result.location or ""
        assert location.startswith(REDIRECT + "?")
        query = parse_qs(urlsplit(location).query)
        assert {k: len(v) for k, v in query.items()} == {"code": 1, "state": 1, "iss": 1}
        assert (query["state"][0], query["iss"][0]) == ("s&t=ate ü", deployment.url)

    run(body)


@pytest.mark.parametrize("grant_types", [[{}], [[]], [None, {"a": 1}]])
def test_registration_with_non_string_grant_types_is_a_client_error(
    deployment: Deployment, grant_types: list[Any]
) -> None:
    """grant_types holding objects or arrays instead of strings is invalid_client_metadata (400), not a
    server failure."""

    async def body(http: httpx.AsyncClient) -> None:
        answer = await http.post(
            f"{deployment.url}/register", json={"redirect_uris": [REDIRECT], "grant_types": grant_types}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == "invalid_client_metadata"

    run(body)


@pytest.mark.threat("T-REFRESH-REPLAY")
@pytest.mark.parametrize("registered", [{"grant_types": ["authorization_code"]}, {}], ids=["code-only", "unnamed"])
def test_client_registered_without_refresh_grant_gets_no_refresh_token(
    deployment: Deployment, registered: dict[str, Any]
) -> None:
    """RFC 7591 grant_types lists what a client may use at the token endpoint (authorization_code alone when it
    names none): such a client gets an access token but no refresh token, and the refresh grant is refused."""

    async def body(http: httpx.AsyncClient) -> None:
        metadata = {"client_name": "code only", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        answer = await http.post(f"{deployment.url}/register", json=metadata | registered)
        assert answer.status_code == 201, answer.text
        client_id = answer.json()["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        tokens = (await exchange(http, deployment, client_id, code, pkce.verifier)).json()
        assert "access_token" in tokens
        assert "refresh_token" not in tokens
        refused = await refresh(http, deployment, client_id, "mcr_" + "A" * 43)
        assert (refused.status_code, refused.json()["error"]) == (400, "unauthorized_client")

    run(body)


@pytest.mark.threat("T-REDIRECT-URI")
def test_registration_caps_redirect_uris_and_wildcards_match_nothing(deployment: Deployment) -> None:
    """Twenty-one redirect URIs or one of 2001 characters are refused; a registered ``*`` is a literal
    character, never a pattern: a concrete host under it does not match."""

    async def body(http: httpx.AsyncClient) -> None:
        for uris in (
            [f"https://app.example/cb{i}" for i in range(21)],
            ["https://app.example/" + "a" * 1981],
        ):
            answer = await http.post(f"{deployment.url}/register", json={"redirect_uris": uris})
            assert (answer.status_code, answer.json()["error"]) == (400, "invalid_redirect_uri")
        wildcard = ["https://*.evil.example/cb", "https://evil.example/cb*"]
        client_id = (await register(http, deployment, redirect_uris=wildcard))["client_id"]
        for concrete in ("https://a.evil.example/cb", "https://evil.example/cb/x", "https://evil.example/cbx"):
            answer = await http.get(authorize_url(deployment, client_id, Pkce.new(), redirect_uri=concrete))
            assert_error_page(answer)

    run(body)


@pytest.mark.threat("T-PKCE-DOWNGRADE")
def test_plain_style_or_oversized_pkce_values_are_refused(deployment: Deployment) -> None:
    """Sending the challenge itself as the verifier (a plain-method downgrade at the token endpoint) is
    invalid_grant; a 129-character challenge is refused at /authorize with state and iss."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        plain = await exchange(http, deployment, client_id, code, pkce.challenge)
        assert (plain.status_code, plain.json()["error"]) == (400, "invalid_grant")
        long = await http.get(authorize_url(deployment, client_id, Pkce.new(), code_challenge="a" * 129, state="s"))
        assert long.status_code == 400
        link = re.search(r'<a id="back" href="([^"]*)"', long.text)
        assert link is not None
        assert query_of(link[1].replace("&amp;", "&")) == {
            "error": "invalid_request",
            "error_description": "code_challenge is malformed",
            "state": "s",
            "iss": deployment.url,
        }

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scope", "mcp:read mcp:admin"),
        ("code_challenge", Pkce.new().challenge),
        ("redirect_uri", "http://127.0.0.1:7777/callback"),
        ("state", "attacker-state"),
        ("client_id", CONFIGURED_CLIENT),
    ],
)
def test_consent_fields_altered_after_sign_in_are_refused(deployment: Deployment, field: str, value: str) -> None:
    """The decision must be for the very request the person signed in to: changing its scope, PKCE
    challenge, redirect port, state or client in the consent form is 403 with no code."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        page = await http.get(authorize_url(deployment, client_id, Pkce.new(), scope="mcp:read"))
        cookie = cookie_of(page)
        sign_in = form_of(page.text).fields | {"username": "bob@acme.test", "password": PASSWORD}
        consent_page = await http.post(f"{deployment.url}/authorize", data=sign_in, headers=cookie)
        assert consent_page.status_code == 200
        assert consent_page.headers["x-frame-options"] == "DENY"
        assert FRAMING in consent_page.headers["content-security-policy"]
        decide = form_of(consent_page.text).fields | {"decision": "approve", "tenant": "acme", field: value}
        answer = await http.post(f"{deployment.url}/authorize", data=decide, headers=cookie)
        assert answer.status_code == 403
        assert "location" not in answer.headers

    run(body)


def test_token_answers_are_never_cached(deployment: Deployment) -> None:
    """Every answer that carries or concerns a credential (code exchange, refresh, their refusals, and a
    registration holding a client secret) says Cache-Control: no-store."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        issued = await exchange(http, deployment, client_id, code, pkce.verifier)
        refreshed = await refresh(http, deployment, client_id, issued.json()["refresh_token"])
        refused = await refresh(http, deployment, client_id, "mcr_unknown")
        confidential = await http.post(
            f"{deployment.url}/register",
            json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_post"},
        )
        assert "client_secret" in confidential.json()
        for answer in (issued, refreshed, refused, confidential):
            assert answer.headers["cache-control"] == "no-store", answer.request.url
        assert issued.headers["pragma"] == "no-cache"

    run(body)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_another_client_cannot_revoke_an_access_token_but_its_owner_can(deployment: Deployment) -> None:
    """RFC 7009 §2.1: revoking a token of another client changes nothing (the answer is still 200); the
    owner revoking its refresh token ends the grant, so the access token stops working at once."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id, tokens = await tokens_for(http, deployment)
        thief = (await register(http, deployment))["client_id"]
        foreign = {"token": tokens["access_token"], "client_id": thief}
        assert (await http.post(f"{deployment.url}/oauth/revoke", data=foreign)).status_code == 200
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 200
        own = {"token": tokens["refresh_token"], "client_id": client_id, "token_type_hint": "refresh_token"}
        assert (await http.post(f"{deployment.url}/oauth/revoke", data=own)).status_code == 200
        assert (await tools_list(http, deployment, tokens["access_token"])).status_code == 401
        assert (await refresh(http, deployment, client_id, tokens["refresh_token"])).status_code == 400

    run(body)


@pytest.mark.threat("T-PASSWORD-GUESS")
def test_sign_in_failure_reads_the_same_for_unknown_and_known_accounts(deployment: Deployment) -> None:
    """A wrong password and an account that does not exist get the same status and the same message, so the
    sign-in page tells no one which emails have accounts."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        answers = []
        for username in ("ada@acme.test", "nobody@acme.test", "ADA@ACME.TEST"):
            result = await consent(
                http, authorize_url(deployment, client_id, Pkce.new()), username=username, password="not it at all!"
            )
            last = result.responses[-1]
            answers.append((last.status_code, re.findall(r'role="alert">([^<]*)<', last.text)))
        assert answers[0] == answers[1] == answers[2]
        assert answers[0][0] == 401

    run(body)


def test_confidential_client_must_prove_its_secret_on_every_grant(deployment: Deployment) -> None:
    """A client registered with a secret is invalid_client without it, at the code exchange (the code is not
    spent by that refusal), at refresh and at revocation."""

    async def body(http: httpx.AsyncClient) -> None:
        client = await register(http, deployment, token_endpoint_auth_method="client_secret_basic")
        client_id, secret = client["client_id"], client["client_secret"]
        pkce = Pkce.new()
        code = await code_for(http, deployment, client_id, pkce)
        bare = await exchange(http, deployment, client_id, code, pkce.verifier)
        assert (bare.status_code, bare.json()["error"]) == (400, "invalid_client")
        wrong = await exchange(http, deployment, client_id, code, pkce.verifier, client_secret="mcs_wrong")
        assert wrong.json()["error"] == "invalid_client"
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
        issued = await http.post(
            f"{deployment.url}/token", data=form | {"code_verifier": pkce.verifier}, auth=(client_id, secret)
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["refresh_token"]
        assert (await refresh(http, deployment, client_id, token)).json()["error"] == "invalid_client"
        revoke = await http.post(f"{deployment.url}/oauth/revoke", data={"token": token, "client_id": client_id})
        assert (revoke.status_code, revoke.json()["error"]) == (400, "invalid_client")
        assert (await refresh(http, deployment, client_id, token, client_secret=secret)).status_code == 200

    run(body)


def test_client_name_and_state_are_inert_on_the_pages(deployment: Deployment) -> None:
    """Markup in a self-registered client_name or in state is shown as text, on pages without script."""

    async def body(http: httpx.AsyncClient) -> None:
        name = '"><script>alert(1)</script>'
        client_id = (await register(http, deployment, client_name=name))["client_id"]
        state = '"><img src=x onerror=alert(2)>'
        page = await http.get(authorize_url(deployment, client_id, Pkce.new(), state=state))
        assert page.status_code == 200
        assert "<script" not in page.text
        assert "<img" not in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert form_of(page.text).fields["state"] == state

    run(body)
