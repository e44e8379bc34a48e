"""``/authorize``: check the request, sign the person in, ask for consent, and answer with a single-use code.

Until the client and its redirect URI are known to match, errors are shown here and never redirected
(RFC 6749 §4.1.2.1); after that they go back to the client with ``state`` and ``iss`` (RFC 9207). PKCE
S256 and an RFC 8707 ``resource`` naming this server are required. The consent steps carry no server
session: each form holds the request, a CSRF token tied to a ``__Host-`` cookie, and after sign-in a
short-lived ticket naming the account, all MACed with a key of this process. The store remembers only
the tickets already spent, so each answers one decision.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

from mcpguard.oauth.clients import Client, ClientRegistry
from mcpguard.oauth.consent_page import ConsentView, render_consent, render_error, render_sign_in
from mcpguard.oauth.redirect_uris import LOOPBACK_HOSTS, redirect_uri_allowed
from mcpguard.oauth.settings import OAuthSettings
from mcpguard.oauth.users import Account, Authenticator
from mcpguard.scopes import ScopePolicy
from mcpguard.stores.base import CodeRecord, CodeStore

__all__ = ["AuthorizationRequest", "Authorizer", "CSRF_COOKIE", "Page", "Redirect"]

CSRF_COOKIE = "__Host-mcpguard-csrf"
_SCOPES = ScopePolicy()
# A loopback IP literal redirect, split where its port is (or would be).
_LOOPBACK_URI = re.compile(r"http://(?P<host>127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?(?P<rest>[/?].*)?", re.DOTALL)
_CHALLENGE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_TICKET_SECONDS = 300
_REQUEST_FIELDS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "scope",
    "resource",
    "code_challenge",
    "code_challenge_method",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationRequest:
    """A checked authorization request."""

    client: Client
    redirect_uri: str
    state: str | None
    scopes: tuple[str, ...]
    resource: str
    code_challenge: str
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Page:
    """An HTML page to show (status, body), optionally setting the CSRF cookie."""

    status: int
    html: str
    set_cookie: str | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    """A 303 back to the client."""

    location: str


def _registered(redirect_uri: str, registered: tuple[str, ...]) -> bool:
    """Exactly a registered URI; or, for a loopback IP literal, one that differs only in its port (RFC 8252
    §7.3: a native app listens on whatever port it is given), every other character the same."""
    if redirect_uri in registered:
        return True
    # The URI as written, not as a parser reads it: urlsplit drops tabs and line breaks, user info and an empty
    # query or fragment, so two URIs it calls equal may not be.
    presented = _LOOPBACK_URI.fullmatch(redirect_uri) if redirect_uri_allowed(redirect_uri) else None
    if presented is None:
        return False
    for candidate in registered:
        known = _LOOPBACK_URI.fullmatch(candidate)
        if known is not None and (known["host"], known["rest"]) == (presented["host"], presented["rest"]):
            return True
    return False


def _grantable(requested: tuple[str, ...], account: Account) -> tuple[str, ...]:
    # Held scopes include the lesser ones (admin includes write and read), so step-ups can be approved.
    held = _SCOPES.effective(account.scopes)
    return tuple(scope for scope in requested if scope in held)


def _same(given: str, expected: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII text, and a client controls ``given``.
    return hmac.compare_digest(given.encode(), expected.encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authorizer:
    """The authorization endpoint's decisions; the ASGI side only parses and writes what these return."""

    def __init__(
        self,
        settings: OAuthSettings,
        clients: ClientRegistry,
        codes: CodeStore,
        authenticator: Authenticator,
        *,
        form_key: Callable[[], bytes] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._clients = clients
        self._codes = codes
        self._authenticator = authenticator
        self._clock = clock
        # Shared by every process of a deployment when given, so a form served by one is accepted by another.
        random_key = secrets.token_bytes(32)
        self._key = form_key if form_key is not None else lambda: random_key

    def _mac(self, purpose: str, *parts: str) -> str:
        message = "\x1f".join((purpose, *parts)).encode()
        return _b64(hmac.new(self._key(), message, hashlib.sha256).digest())

    async def check(self, params: Mapping[str, str]) -> AuthorizationRequest | Page | Redirect:
        """The request, or the error page or redirect that answers it."""
        client_id = params.get("client_id", "")
        if not client_id:
            return Page(400, render_error("The request names no client (client_id is missing)."))
        client = await self._clients.find(client_id)
        if client is None:
            return Page(400, render_error("This client is not registered with this server."))
        redirect_uri = params.get("redirect_uri", "")
        if not _registered(redirect_uri, client.redirect_uris):
            return Page(400, render_error("The redirect URI is not one this client registered."))
        state = params.get("state")

        def refuse(error: str, description: str) -> Redirect | Page:
            return self._refuse(client, redirect_uri, error, description, state)

        if params.get("response_type") != "code":
            return refuse("unsupported_response_type", "only response_type=code is supported")
        challenge = params.get("code_challenge")
        if not challenge:
            return refuse("invalid_request", "PKCE is required: send code_challenge with S256")
        if params.get("code_challenge_method") != "S256":
            return refuse("invalid_request", "code_challenge_method must be S256")
        if not _CHALLENGE.fullmatch(challenge):
            return refuse("invalid_request", "code_challenge is malformed")
        resource = params.get("resource")
        if not resource:
            return refuse("invalid_request", f"resource is required and must be {self._settings.resource}")
        if resource != self._settings.resource:
            return refuse("invalid_target", "this server issues tokens only for its own resource")
        requested = tuple(dict.fromkeys(params.get("scope", "").split())) or self._settings.default_scopes
        if not set(requested) <= set(self._settings.scopes_supported):
            return refuse("invalid_scope", "a requested scope is not offered by this server")
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            state=state,
            scopes=requested,
            resource=resource,
            code_challenge=challenge,
            params={name: params[name] for name in _REQUEST_FIELDS if name in params},
        )

    def _refuse(
        self, client: Client, redirect_uri: str, error: str, description: str, state: str | None
    ) -> Redirect | Page:
        """An error for the client: redirected to a client the operator configured; for one that registered
        itself (anyone can, with any https URI), shown here with a link back, so this server never
        sends a browser somewhere unvetted without a person choosing to go (RFC 9700 §4.11.2)."""
        back = self.redirect(redirect_uri, {"error": error, "error_description": description, "state": state})
        if client.configured:
            return back
        return Page(400, render_error(f"The application's request was refused: {description}.", back=back.location))

    def redirect(self, redirect_uri: str, values: Mapping[str, str | None]) -> Redirect:
        """A redirect to ``redirect_uri`` with ``values`` (and ``iss``) added to its query."""
        query = urlencode({k: v for k, v in {**values, "iss": self._settings.origin}.items() if v is not None})
        separator = "&" if urlsplit(redirect_uri).query else "?"
        return Redirect(redirect_uri + separator + query)

    def _view(self, request: AuthorizationRequest, csrf: str) -> ConsentView:
        host = urlsplit(request.redirect_uri).hostname or ""
        return ConsentView(
            client_name=request.client.client_name or request.client.client_id,
            client_id=request.client.client_id,
            redirect_host=host,
            loopback=host in LOOPBACK_HOSTS,
            scopes=request.scopes,
            params=request.params,
            csrf=csrf,
        )

    def sign_in_page(self, request: AuthorizationRequest, cookie: str | None, *, error: str | None = None) -> Page:
        """The sign-in form; sets the CSRF cookie when the browser has none."""
        fresh = cookie is None or len(cookie) < 32
        value = secrets.token_urlsafe(32) if fresh or cookie is None else cookie
        page = render_sign_in(self._view(request, self._mac("csrf", value)), error=error)
        return Page(401 if error else 200, page, set_cookie=value if fresh else None)

    def _csrf_ok(self, form: Mapping[str, str], cookie: str | None) -> bool:
        return cookie is not None and _same(form.get("csrf", ""), self._mac("csrf", cookie))

    async def submit(self, form: Mapping[str, str], cookie: str | None) -> Page | Redirect:
        """A POSTed step: sign-in (answers the consent page) or the decision (answers the redirect)."""
        checked = await self.check(form)
        if not isinstance(checked, AuthorizationRequest):
            return checked
        if not self._csrf_ok(form, cookie):
            return Page(403, render_error("This form has expired or was not sent from this page. Start again."))
        if form.get("step") == "sign_in":
            account = await self._authenticator.authenticate(form.get("username", ""), form.get("password", ""))
            if account is None:
                return self.sign_in_page(checked, cookie, error="The email or password is not right.")
            ticket = self._ticket(account, checked, cookie or "")
            view = self._view(checked, form["csrf"])
            granted = _grantable(checked.scopes, account)
            return Page(200, render_consent(view, account=account, granted=granted, ticket=ticket))
        if form.get("step") != "decide":
            return Page(400, render_error("Unknown step."))
        account = await self._redeem(form.get("ticket", ""), checked, cookie or "")
        if account is None:
            return Page(403, render_error("The sign-in has expired. Start again."))
        if form.get("decision") != "approve":
            return self._refuse(
                checked.client, checked.redirect_uri, "access_denied", "access was denied", checked.state
            )
        tenant = form.get("tenant", "")
        if tenant not in account.tenants:
            return Page(403, render_error("Choose one of your tenants."))
        granted = _grantable(checked.scopes, account)
        if not granted:
            return self._refuse(
                checked.client,
                checked.redirect_uri,
                "invalid_scope",
                "none of these scopes may be granted by this user",
                checked.state,
            )
        code = await self._issue_code(checked, account, tenant, granted)
        return self.redirect(checked.redirect_uri, {"code": code, "state": checked.state})

    def _fingerprint(self, request: AuthorizationRequest) -> str:
        return self._mac("request", json.dumps(sorted(request.params.items())))

    def _ticket(self, account: Account, request: AuthorizationRequest, cookie: str) -> str:
        body = json.dumps(
            {
                "sub": account.subject,
                "name": account.name,
                "tenants": list(account.tenants),
                "scopes": sorted(account.scopes),
                "exp": int(self._clock()) + _TICKET_SECONDS,
                "req": self._fingerprint(request),
                # Two sign-ins in the same second must not share a ticket: spending one would spend both.
                "nonce": secrets.token_urlsafe(16),
            },
            separators=(",", ":"),
        )
        encoded = _b64(body.encode())
        # Bound to this browser's CSRF cookie: a ticket copied elsewhere is worthless.
        return f"{encoded}.{self._mac('ticket', encoded, cookie)}"

    async def _redeem(self, ticket: str, request: AuthorizationRequest, cookie: str) -> Account | None:
        """The account a valid ticket names, spending the ticket: a second decision with it, even a concurrent
        one, finds it spent."""
        encoded, _, mac = ticket.partition(".")
        if not encoded or not _same(mac, self._mac("ticket", encoded, cookie)):
            return None
        try:
            claims: dict[str, Any] = json.loads(_unb64(encoded))
        except ValueError:
            return None
        now = self._clock()
        if claims["exp"] < now or not _same(claims["req"], self._fingerprint(request)):
            return None
        spent = await self._codes.spend_ticket(
            hashlib.sha256(ticket.encode()).hexdigest(),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
            at=datetime.fromtimestamp(now, UTC),
        )
        if not spent:
            return None
        return Account(
            subject=claims["sub"],
            name=claims["name"],
            tenants=tuple(claims["tenants"]),
            scopes=frozenset(claims["scopes"]),
        )

    async def _issue_code(
        self, request: AuthorizationRequest, account: Account, tenant: str, scopes: tuple[str, ...]
    ) -> str:
        code = "mco_" + secrets.token_urlsafe(32)
        now = datetime.fromtimestamp(self._clock(), UTC)
        await self._codes.add_code(
            CodeRecord(
                code_hash=hashlib.sha256(code.encode()).hexdigest(),
                grant_id="g_" + secrets.token_urlsafe(12),
                client_id=request.client.client_id,
                redirect_uri=request.redirect_uri,
                code_challenge=request.code_challenge,
                resource=request.resource,
                scopes=scopes,
                tenant=tenant,
                subject=account.subject,
                created_at=now,
                expires_at=now + self._settings.code_lifetime,
                consumed_at=None,
            )
        )
        return code
