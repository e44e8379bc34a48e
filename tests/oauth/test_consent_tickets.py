"""The consent ticket answers one decision: posted again, at once or later, approve or deny, it is refused,
while a fresh sign-in still gets its own ticket and code; over every store backend, on a real socket."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.oauth.consent_client import CSRF_COOKIE, form_of
from tests.oauth.flow_helpers import PASSWORD, Deployment, Pkce, authorize_url, register
from tests.oauth.test_authorization_server import exchange, query_of, run

EXPIRED = "The sign-in has expired. Start again."


async def signed_in(http: httpx.AsyncClient, url: str, cookie: dict[str, str] | None = None) -> dict[str, str]:
    """Open ``url`` in a browser holding ``cookie`` (or a new one), sign in as ada, and return the headers to
    post with and the consent form's fields with approval chosen."""
    page = await http.get(url, headers=cookie or {})
    cookie = cookie or {"cookie": page.headers["set-cookie"].split(";")[0]}
    fields = form_of(page.text).fields | {"username": "ada@acme.test", "password": PASSWORD}
    consent_page = await http.post(url.split("?")[0], data=fields, headers=cookie)
    assert consent_page.status_code == 200, consent_page.text
    return cookie | form_of(consent_page.text).fields | {"decision": "approve", "tenant": "acme"}


async def decide(http: httpx.AsyncClient, deployment: Deployment, signed: dict[str, str]) -> httpx.Response:
    """POST the consent decision with the browser's cookie."""
    fields = {name: value for name, value in signed.items() if name != "cookie"}
    return await http.post(f"{deployment.url}/authorize", data=fields, headers={"cookie": signed["cookie"]})


def assert_spent(answer: httpx.Response) -> None:
    """The ticket was refused with the expired sign-in page: 403, no redirect."""
    assert answer.status_code == 403, answer.text
    assert "location" not in answer.headers
    assert EXPIRED in answer.text


@pytest.mark.threat("T-CONSENT-CSRF")
def test_a_replayed_consent_decision_is_refused(deployment: Deployment) -> None:
    """The decision posted again with the same ticket, after approving or after denying, issues no second code."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        pkce = Pkce.new()
        approved = await signed_in(http, authorize_url(deployment, client_id, pkce))
        first = await decide(http, deployment, approved)
        assert first.status_code == 303
        code = query_of(first.headers["location"])["code"]
        assert_spent(await decide(http, deployment, approved))
        assert_spent(await decide(http, deployment, approved | {"tenant": "acme", "decision": "deny"}))
        assert (await exchange(http, deployment, client_id, code, pkce.verifier)).status_code == 200

        denied = await signed_in(http, authorize_url(deployment, client_id, Pkce.new()))
        assert (await decide(http, deployment, denied | {"decision": "deny"})).status_code == 400
        assert_spent(await decide(http, deployment, denied))

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
def test_concurrent_replays_of_one_consent_decision_issue_one_code(deployment: Deployment) -> None:
    """Ten approvals posted at once with one ticket: exactly one is redirected with a code, the rest refused."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        signed = await signed_in(http, authorize_url(deployment, client_id, Pkce.new()))
        answers = await asyncio.gather(*(decide(http, deployment, signed) for _ in range(10)))
        redirected = [answer for answer in answers if answer.status_code == 303]
        assert len(redirected) == 1, [answer.status_code for answer in answers]
        assert "code" in query_of(redirected[0].headers["location"])
        for answer in answers:
            if answer is not redirected[0]:
                assert_spent(answer)

    run(body)


@pytest.mark.threat("T-CONSENT-CSRF")
def test_a_fresh_sign_in_after_a_spent_ticket_still_gets_a_code(deployment: Deployment) -> None:
    """The same browser signing in again for the same request, even within the same second, gets a ticket of its
    own that works once, while the spent one stays refused."""

    async def body(http: httpx.AsyncClient) -> None:
        client_id = (await register(http, deployment))["client_id"]
        url = authorize_url(deployment, client_id, Pkce.new())
        first = await signed_in(http, url)
        second = await signed_in(http, url, {"cookie": first["cookie"]})
        assert first["cookie"].startswith(f"{CSRF_COOKIE}=")
        assert first["ticket"] != second["ticket"]
        assert (await decide(http, deployment, first)).status_code == 303
        assert_spent(await decide(http, deployment, first))
        answer = await decide(http, deployment, second)
        assert answer.status_code == 303
        assert "code" in query_of(answer.headers["location"])
        assert_spent(await decide(http, deployment, second))

    run(body)
