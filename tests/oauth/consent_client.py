"""Drives the sign-in and consent pages as a browser would, with a plain HTTP client: reads each form's
fields, keeps the CSRF cookie, and answers the way the person chooses."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

import httpx

CSRF_COOKIE = "__Host-mcpguard-csrf"


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.selects: dict[str, list[str]] = {}
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "input" and found.get("type") == "hidden":
            self.fields[found["name"]] = found.get("value", "")
        elif tag == "select":
            self._select = found["name"]
            self.selects[self._select] = []
        elif tag == "option" and self._select is not None:
            self.selects[self._select].append(found["value"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def form_of(html: str) -> _Forms:
    """The hidden fields and select options of the page's form."""
    parser = _Forms()
    parser.feed(html)
    return parser


@dataclass
class ConsentResult:
    """How the pages went: each response on the way, and where the browser was sent at the end."""

    responses: list[httpx.Response] = field(default_factory=list)

    @property
    def location(self) -> str | None:
        last = self.responses[-1]
        return last.headers.get("location") if last.status_code == 303 else None


async def consent(
    http: httpx.AsyncClient,
    authorize_url: str,
    *,
    username: str,
    password: str,
    tenant: str | None = None,
    decision: str = "approve",
) -> ConsentResult:
    """Open ``authorize_url``, sign in, and decide; stops at the first answer that is not the next page."""
    result = ConsentResult()
    page = await http.get(authorize_url)
    result.responses.append(page)
    if page.status_code != 200:
        return result
    cookie = page.cookies.get(CSRF_COOKIE) or _set_cookie_value(page)
    headers = {"cookie": f"{CSRF_COOKIE}={cookie}"}
    origin = str(page.url.copy_with(path="/", query=None)).rstrip("/")
    sign_in = {**form_of(page.text).fields, "username": username, "password": password}
    page = await http.post(
        str(page.url.copy_with(path="/authorize", query=None)), data=sign_in, headers={**headers, "origin": origin}
    )
    result.responses.append(page)
    if page.status_code != 200:
        return result
    form = form_of(page.text)
    choice = {**form.fields, "decision": decision}
    if "tenant" in form.selects:
        choice["tenant"] = tenant if tenant is not None else form.selects["tenant"][0]
    elif tenant is not None:
        choice["tenant"] = tenant
    answer = await http.post(str(page.url), data=choice, headers={**headers, "origin": origin})
    result.responses.append(answer)
    return result


def _set_cookie_value(response: httpx.Response) -> str:
    for value in response.headers.get_list("set-cookie"):
        name, _, rest = value.partition("=")
        if name == CSRF_COOKIE:
            return rest.split(";")[0]
    raise AssertionError("the sign-in page set no CSRF cookie")
