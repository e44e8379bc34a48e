"""The sign-in and consent pages in a real browser: headless Chromium, driven over the DevTools protocol, signs
in, picks a tenant, approves, and lands on the client's loopback redirect URI with a code that works."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import serve
from tests.oauth.consent_client import CSRF_COOKIE
from tests.oauth.flow_helpers import (
    MCP_HEADERS,
    PASSWORD,
    STATELESS_LIST,
    Deployment,
    Pkce,
    authorize_url,
    deploy,
    register,
)

# Root in a container needs --no-sandbox; a fresh profile per test comes with --user-data-dir.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--remote-debugging-port=0",
)
STEP_SECONDS = 10
Event = dict[str, Any]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """The guarded notes server with the built-in authorization server; the store backend is not under test."""
    with deploy("memory", tmp_path) as running:
        yield running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[str]:
    """Headless Chromium with a fresh profile; yields its browser-level DevTools WebSocket URL."""
    executable = shutil.which("chromium")
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs chromium on PATH (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield _devtools_url(profile / "DevToolsActivePort", process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _devtools_url(active_port: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    # Chromium writes the port it bound and the browser target's path once DevTools listens.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        lines = active_port.read_text().splitlines() if active_port.exists() else []
        if len(lines) == 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    raise RuntimeError(f"chromium did not open DevTools:\n{log.read_text(errors='replace')[-2000:]}")


class ClientApp:
    """The client's loopback redirect target: records every query it is sent, and serves a page that frames
    ``framed`` so the browser can be asked whether it shows it."""

    def __init__(self) -> None:
        self.queries: list[dict[str, list[str]]] = []
        self.framed = "about:blank"

    def app(self) -> Starlette:
        """The ASGI app to serve."""

        async def callback(request: Request) -> HTMLResponse:
            self.queries.append(parse_qs(request.url.query))
            return HTMLResponse("<!doctype html><title>done</title><p>You may close this window.</p>")

        async def frame(request: Request) -> HTMLResponse:
            return HTMLResponse(f'<!doctype html><title>frame</title><iframe src="{escape(self.framed)}"></iframe>')

        return Starlette(routes=[Route("/callback", callback), Route("/frame", frame)])


class Page:
    """One page of the browser, over a flat DevTools session: commands, the events seen so far, and the few
    person-like actions the consent flow needs (navigate, type, click)."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[Event]] = {}
        self._changed = asyncio.Condition()
        self._session: str | None = None
        self.events: list[Event] = []

    async def read(self) -> None:
        """Route replies to their commands and keep every event; runs for the life of the connection."""
        async for raw in self._socket:
            message: Event = json.loads(raw)
            reply = self._replies.pop(message["id"], None) if "id" in message else None
            if reply is not None:
                if "error" in message:
                    reply.set_exception(AssertionError(f"DevTools refused a command: {message['error']}"))
                else:
                    reply.set_result(message.get("result", {}))
                continue
            async with self._changed:
                self.events.append(message)
                self._changed.notify_all()

    async def send(self, method: str, **params: Any) -> Event:
        """Run one DevTools command on the page (or the browser before a page is attached)."""
        command: Event = {"id": next(self._ids), "method": method, "params": params}
        if self._session is not None:
            command["sessionId"] = self._session
        reply: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._replies[command["id"]] = reply
        await self._socket.send(json.dumps(command))
        async with asyncio.timeout(STEP_SECONDS):
            return await reply

    async def attach(self) -> None:
        """Open a new tab and attach to it; page, network and audit events flow from here on."""
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self._session = attached["sessionId"]
        for domain in ("Page", "Network", "Audits"):
            await self.send(f"{domain}.enable")

    async def event(self, method: str, *, since: int, where: Callable[[Event], bool] = lambda _: True) -> Event:
        """The first ``method`` event at or after index ``since`` whose params satisfy ``where``."""

        def found() -> Event | None:
            return next(
                (e["params"] for e in self.events[since:] if e["method"] == method and where(e["params"])), None
            )

        async with asyncio.timeout(STEP_SECONDS), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        params = found()
        assert params is not None
        return params

    async def loaded_after(self, action: Callable[[], Any]) -> None:
        """Run ``action`` and wait until the page it leads to has loaded."""
        mark = len(self.events)
        await action()
        await self.event("Page.loadEventFired", since=mark)

    async def navigate(self, url: str) -> None:
        """Go to ``url`` as if typed into the address bar."""
        await self.loaded_after(lambda: self.send("Page.navigate", url=url))

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (DevTools runs it outside the page's CSP)."""
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    async def type_into(self, element_id: str, text: str) -> None:
        """Focus the field and type ``text`` into it as keyboard input."""
        await self.evaluate(f"document.getElementById({json.dumps(element_id)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, element_id: str) -> None:
        """Press and release the mouse over the middle of the element, and wait for the page it submits to."""
        box = await self.evaluate(
            f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box

        async def press() -> None:
            for kind in ("mousePressed", "mouseReleased"):
                await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

        await self.loaded_after(press)

    async def location(self) -> str:
        """The address the page is showing."""
        href: str = await self.evaluate("location.href")
        return href

    def documents_from(self, url_prefix: str) -> list[Event]:
        """Every page response the browser received from an address starting with ``url_prefix``, in order."""
        return [
            e["params"]["response"]
            for e in self.events
            if e["method"] == "Network.responseReceived"
            and e["params"]["type"] == "Document"
            and e["params"]["response"]["url"].startswith(url_prefix)
        ]


@asynccontextmanager
async def open_page(devtools_url: str) -> AsyncIterator[Page]:
    """A new tab of the browser at ``devtools_url``, attached and reading events until the block ends."""
    async with connect(devtools_url, max_size=None) as socket:
        page = Page(socket)
        reader = asyncio.create_task(page.read())
        try:
            await page.attach()
            yield page
        finally:
            reader.cancel()


async def sign_in_and_approve(page: Page, start: str, *, username: str, tenant: str) -> None:
    """Do what the person does: open ``start``, type the email and password, sign in, pick ``tenant``, approve."""
    await page.navigate(start)
    assert await page.evaluate("document.title") == "Sign in"
    await page.type_into("username", username)
    await page.type_into("password", PASSWORD)
    await page.click("sign-in")
    assert await page.evaluate("document.title") == "Authorize"
    await page.evaluate(f"document.getElementById('tenant').value = {json.dumps(tenant)}")
    await page.click("approve")


async def check_csrf_cookie(page: Page, origin: str) -> None:
    """The browser kept exactly one CSRF cookie for ``origin``, host-only and locked down."""
    # Chromium stores a __Host- cookie only if it is Secure, has Path=/ and no Domain; http://127.0.0.1 counts
    # as a secure context for that.
    cookies = (await page.send("Network.getCookies", urls=[origin]))["cookies"]
    csrf = [c for c in cookies if c["name"] == CSRF_COOKIE]
    assert len(csrf) == 1
    assert (csrf[0]["secure"], csrf[0]["httpOnly"], csrf[0]["sameSite"]) == (True, True, "Strict")
    assert (csrf[0]["domain"], csrf[0]["path"]) == (urlsplit(origin).hostname, "/")


async def check_cannot_be_framed(page: Page, client: ClientApp, client_url: str, start: str) -> None:
    """The sign-in and consent pages arrived with ``frame-ancestors 'none'``, and a page of another origin
    framing the sign-in page gets the browser's error page in its place."""
    shown = page.documents_from(start.split("?")[0])
    assert [response["status"] for response in shown] == [200, 200]
    for response in shown:
        headers = {name.lower(): value for name, value in response["headers"].items()}
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
    client.framed = start
    mark = len(page.events)
    await page.navigate(f"{client_url}/frame")
    issue = await page.event(
        "Audits.issueAdded", since=mark, where=lambda p: p["issue"]["code"] == "ContentSecurityPolicyIssue"
    )
    assert issue["issue"]["details"]["contentSecurityPolicyIssueDetails"]["violatedDirective"] == "frame-ancestors"
    [child] = (await page.send("Page.getFrameTree"))["frameTree"]["childFrames"]
    assert child["frame"]["url"] == "chrome-error://chromewebdata/"
    assert child["frame"]["unreachableUrl"] == start


def test_real_browser_signs_in_picks_a_tenant_and_approves(browser: str, deployment: Deployment) -> None:
    """Chromium fills the real sign-in and consent pages, lands on the loopback redirect URI with code, state and
    iss, and the code buys a token the MCP endpoint takes; the pages cannot be framed and the CSRF cookie is a
    host-only Secure, HttpOnly, SameSite=Strict ``__Host-`` cookie."""
    client = ClientApp()
    with serve(client.app()) as client_url:
        redirect_uri = f"{client_url}/callback"

        async def flow() -> None:
            async with httpx.AsyncClient(timeout=20) as http, open_page(browser) as page:
                client_id = (await register(http, deployment, client_name="browser", redirect_uris=[redirect_uri]))[
                    "client_id"
                ]
                pkce = Pkce.new()
                start = authorize_url(deployment, client_id, pkce, redirect_uri=redirect_uri, state="st-browser")
                await sign_in_and_approve(page, start, username="bob@acme.test", tenant="globex")

                landed = urlsplit(await page.location())
                assert f"{landed.scheme}://{landed.netloc}{landed.path}" == redirect_uri
                assert client.queries == [parse_qs(landed.query)]
                answer = {name: values[0] for name, values in client.queries[0].items()}
                assert set(answer) == {"code", "state", "iss"}
                assert (answer["state"], answer["iss"]) == ("st-browser", deployment.url)
                await check_csrf_cookie(page, deployment.url)
                await check_cannot_be_framed(page, client, client_url, start)

                tokens = await http.post(
                    f"{deployment.url}/token",
                    data={
                        "grant_type": "authorization_code",
                        "code": answer["code"],
                        "redirect_uri": redirect_uri,
                        "client_id": client_id,
                        "code_verifier": pkce.verifier,
                    },
                )
                assert tokens.status_code == 200, tokens.text
                access_token = tokens.json()["access_token"]
                assert (await deployment.oauth.verifier.verify(access_token)).tenant == "globex"
                listed = await http.post(
                    deployment.resource,
                    headers=MCP_HEADERS | {"authorization": f"Bearer {access_token}"},
                    json=STATELESS_LIST,
                )
                assert listed.status_code == 200, listed.text

        asyncio.run(flow())
