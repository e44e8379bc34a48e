"""The authorization server's endpoints as one pure ASGI layer of the guard's public stage.

It answers its own paths (metadata, JWKS, registration, authorize, token, revoke) and passes everything
else on. Its requests are audited like any other, under the grant's tenant once the grant is known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.errors import MethodNotAllowed, OAuthError
from mcpguard.json_input import read_json
from mcpguard.oauth.authorize import CSRF_COOKIE, AuthorizationRequest, Authorizer, Page, Redirect
from mcpguard.oauth.clients import ClientRegistry
from mcpguard.oauth.consent_page import PAGE_HEADERS
from mcpguard.oauth.discovery import (
    AUTHORIZE_PATH,
    JWKS_PATH,
    METADATA_PATHS,
    REGISTER_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    authorization_server_metadata,
)
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.oauth.tokens_endpoint import TokenEndpoint, principal_of
from mcpguard.parsing import Disconnected, read_body
from mcpguard.ratelimit import FailedAuthLimiter, client_ip
from mcpguard.request_state import header, request_headers, state_of
from mcpguard.responses import send_json
from mcpguard.stores.base import GrantRecord

__all__ = ["AuthorizationServer"]

_MAX_FORM_BYTES = 64 * 1024
_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
    (b"access-control-allow-headers", b"authorization, content-type, mcp-protocol-version"),
    (b"access-control-max-age", b"600"),
]
_FORM = "application/x-www-form-urlencoded"


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a well-formed form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        # RFC 6749 §3.1: a parameter sent twice makes the request ambiguous.
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name} is repeated")
        form[name] = value
    return form


def _cookie(scope: Scope, name: str) -> str | None:
    for value in request_headers(scope).get(b"cookie", ()):
        for part in value.decode("latin-1").split(";"):
            cookie_name, _, cookie_value = part.strip().partition("=")
            if cookie_name == name:
                found: str = cookie_value
                return found
    return None


class AuthorizationServer:
    """Serves the OAuth 2.1 endpoints for MCP clients; guards nothing itself."""

    name = "authorization_server"

    def __init__(
        self,
        app: ASGIApp,
        settings: OAuthSettings,
        *,
        clients: ClientRegistry,
        authorizer: Authorizer,
        tokens: TokenEndpoint,
        jwks: Callable[[], Mapping[str, Any]] | None,
        failed_auth: FailedAuthLimiter,
        trusted_proxies: frozenset[str] = frozenset(),
        documents: bool = False,
    ) -> None:
        self.app = app
        self._settings = settings
        self._clients = clients
        self._authorizer = authorizer
        self._tokens = tokens
        self._jwks = jwks
        self._failed_auth = failed_auth
        self._trusted_proxies = trusted_proxies
        self._metadata = authorization_server_metadata(settings, jwks=jwks is not None, documents=documents)
        self._routes: dict[str, Callable[[Scope, Receive, Send], Any]] = {
            AUTHORIZE_PATH: self._authorize,
            TOKEN_PATH: self._token,
            REVOKE_PATH: self._revoke,
            REGISTER_PATH: self._register,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path in METADATA_PATHS or (path == JWKS_PATH and self._jwks is not None):
            if method == "OPTIONS":
                await self._preflight(send)
                return
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed("metadata is read-only", allowed=("GET", "HEAD", "OPTIONS"))
            document = self._metadata if path != JWKS_PATH else dict(self._jwks() if self._jwks else {})
            await send_json(send, 200, document, extra_headers=_CORS[:1])
            return
        route = self._routes.get(path)
        if route is None:
            await self.app(scope, receive, send)
            return
        if method == "OPTIONS" and path != AUTHORIZE_PATH:
            await self._preflight(send)
            return
        # Browser-based clients call these cross-origin and must be able to read an error too.
        state_of(scope).cross_origin = path != AUTHORIZE_PATH
        try:
            await route(scope, receive, send)
        except Disconnected:
            return  # the client left mid-request: nothing to answer

    async def _preflight(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": _CORS})
        await send({"type": "http.response.body", "body": b""})

    def _seen(self, scope: Scope) -> Callable[[GrantRecord], None]:
        state = state_of(scope)

        def seen(grant: GrantRecord) -> None:
            state.principal = principal_of(grant)

        return seen

    async def _form_request(self, scope: Scope, receive: Receive) -> dict[str, str]:
        if scope["method"] != "POST":
            raise MethodNotAllowed("this endpoint takes POST", allowed=("POST",))
        content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type != _FORM:
            raise OAuthError("invalid_request", f"the body must be {_FORM}")
        return _form(await read_body(scope, receive, _MAX_FORM_BYTES))

    async def _token(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = await self._form_request(scope, receive)
        answer = await self._tokens.token(form, header(scope, b"authorization"), self._seen(scope))
        await send_json(send, 200, answer, extra_headers=[*_CORS[:1], (b"pragma", b"no-cache")])

    async def _revoke(self, scope: Scope, receive: Receive, send: Send) -> None:
        form = await self._form_request(scope, receive)
        await self._tokens.revoke(form, header(scope, b"authorization"), self._seen(scope))
        await send({"type": "http.response.start", "status": 200, "headers": [*_CORS[:1], (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _register(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            raise MethodNotAllowed("registration takes POST", allowed=("POST",))
        # Anyone may register, so registrations count against the per-address limit: no unbounded growth.
        await self._failed_auth.attempt(client_ip(scope, self._trusted_proxies))
        try:
            metadata = read_json(await read_body(scope, receive, _MAX_FORM_BYTES))
        except ValueError:
            raise OAuthError("invalid_client_metadata", "the body must be a JSON object") from None
        registered = await self._clients.register(metadata)
        await send_json(send, 201, registered, extra_headers=_CORS[:1])

    async def _authorize(self, scope: Scope, receive: Receive, send: Send) -> None:
        cookie = _cookie(scope, CSRF_COOKIE)
        if scope["method"] in ("GET", "HEAD"):
            params = _form(scope["query_string"])
            checked = await self._authorizer.check(params)
            answer: Page | Redirect = (
                self._authorizer.sign_in_page(checked, cookie) if isinstance(checked, AuthorizationRequest) else checked
            )
        elif scope["method"] == "POST":
            form = _form(await read_body(scope, receive, _MAX_FORM_BYTES))
            if form.get("step") == "sign_in":
                # Counted before the password is checked, in one store call, so parallel guesses cannot
                # all pass a read of the counter.
                await self._failed_auth.attempt(client_ip(scope, self._trusted_proxies))
            answer = await self._authorizer.submit(form, cookie)
        else:
            raise MethodNotAllowed("authorize takes GET or POST", allowed=("GET", "POST"))
        await self._send_answer(send, answer)

    async def _send_answer(self, send: Send, answer: Page | Redirect) -> None:
        if isinstance(answer, Redirect):
            headers = [
                (b"location", answer.location.encode()),
                (b"cache-control", b"no-store"),
                (b"referrer-policy", b"no-referrer"),
                (b"content-length", b"0"),
            ]
            await send({"type": "http.response.start", "status": 303, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        body = answer.html.encode()
        headers = [*PAGE_HEADERS, (b"content-length", str(len(body)).encode())]
        if answer.set_cookie is not None:
            cookie = f"{CSRF_COOKIE}={answer.set_cookie}; Path=/; Secure; HttpOnly; SameSite=Strict"
            headers.append((b"set-cookie", cookie.encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
