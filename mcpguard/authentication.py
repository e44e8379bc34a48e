"""Turn the presented credential into a ``Principal``: MCP keys by the key ring, bearer tokens by a verifier."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.errors import AuthenticationRequired, InvalidToken, MCPGuardError
from mcpguard.principal import Principal
from mcpguard.ratelimit import FailedAuthLimiter, address_group, client_ip
from mcpguard.request_state import request_headers, state_of

__all__ = ["AuthenticationLayer", "CredentialVerifier", "RememberingVerifier"]

_KEY_PREFIX = "mk_"
# How long a streamed answer (a GET stream, an SSE tool call) goes on before the credential is checked again.
RECHECK_SECONDS = 1.0


class CredentialVerifier(Protocol):
    """Anything that turns a presented secret into a principal or raises ``InvalidToken``."""

    async def verify(self, token: str, /) -> Principal:
        """The principal the credential proves."""
        ...


@runtime_checkable
class RememberingVerifier(CredentialVerifier, Protocol):
    """A verifier that can tell, cheaply, that a credential is one it verified a short while ago."""

    def remembers(self, token: str, /) -> bool:
        """Whether verifying ``token`` again would repeat a recent success (and run nothing costly)."""
        ...


_OWS = " \t"


def _presented(scope: Scope, api_key_header: bytes | None) -> str | None:
    headers = request_headers(scope)
    authorization = headers.get(b"authorization", ())
    api_keys = headers.get(api_key_header, ()) if api_key_header is not None else ()
    if len(authorization) + len(api_keys) > 1:
        raise InvalidToken("present exactly one credential")
    # Only HTTP's own whitespace (space, tab) is trimmed: str.strip() would also drop a no-break space or NEL,
    # and the app behind the guard would read a credential other than the one the guard checked.
    if api_keys:
        credential = api_keys[0].decode("latin-1").strip(_OWS)
    elif authorization:
        scheme, _, credential = authorization[0].decode("latin-1").strip(_OWS).partition(" ")
        if scheme.lower() != "bearer":
            raise InvalidToken("use the Bearer authorization scheme")
        credential = credential.strip(_OWS)
    else:
        return None
    if not credential:
        raise InvalidToken("empty credential")
    return credential


def _remembers_of(verifier: CredentialVerifier | None) -> Callable[[str], bool] | None:
    return verifier.remembers if isinstance(verifier, RememberingVerifier) else None


class AuthenticationLayer:
    """Requires a verified credential on every guarded request (401 with a followable challenge if not)."""

    name = "authenticate"

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: CredentialVerifier | None,
        tokens: CredentialVerifier | None,
        api_key_header: str | None,
        failed_auth: FailedAuthLimiter | None = None,
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self._api_key_header = api_key_header.lower().encode() if api_key_header else None
        self._failed_auth = failed_auth
        self._trusted_proxies = trusted_proxies
        # Each verifier with its ``remembers``, looked up once: a structural isinstance check costs more than the
        # limit check it would save.
        self._for_keys = (keys, _remembers_of(keys))
        self._for_tokens = (tokens, _remembers_of(tokens))
        self._one_at_a_time = _OneAtATime()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        credential = _presented(scope, self._api_key_header)
        if credential is None:
            raise AuthenticationRequired("authentication required")
        ip = client_ip(scope, self._trusted_proxies)
        verifier, remembers = self._for_keys if credential.startswith(_KEY_PREFIX) else self._for_tokens
        if self._failed_auth is None or (remembers is not None and remembers(credential)):
            # A key this guard verified a moment ago is no guess (only that exact key matches) and costs no argon2.
            state_of(scope).principal = await self._verify(verifier, credential, ip)
        elif verifier is self._for_keys[0]:
            # One key check at a time per address, each after the failures before it are counted: a burst of guesses
            # sent at once cannot all pass the limit's read before the first of them is refused.
            async with self._one_at_a_time.hold(address_group(ip)):
                await self._failed_auth.check(ip)
                state_of(scope).principal = await self._verify(verifier, credential, ip)
        else:
            await self._failed_auth.check(ip)
            state_of(scope).principal = await self._verify(verifier, credential, ip)
        watch = _StillValid(send, verifier, credential)
        try:
            await self.app(scope, receive, watch.send)
        except _CredentialEnded:
            return  # the answer has been ended; the app was stopped by its next send

    async def _verify(self, verifier: CredentialVerifier | None, credential: str, ip: str) -> Principal:
        try:
            if verifier is None:
                raise InvalidToken("this kind of credential is not accepted here")
            return await verifier.verify(credential)
        except InvalidToken:
            # Only a refused credential counts; a store outage is not the client's failure.
            if self._failed_auth is not None:
                await self._failed_auth.record_failure(ip)
            raise


class _CredentialEnded(Exception):
    """Raised into the app by a send after its credential stopped being valid mid-answer."""


class _StillValid:
    """A ``send`` that checks the credential again, at most once a ``RECHECK_SECONDS``, while an answer streams.

    A stream opened before a revocation (or before a token expired) would otherwise go on carrying the server's
    messages to a client that no longer has access. The check runs before a chunk is passed on; once it fails
    (revoked, expired, or the store unavailable: closed, not open) the answer is ended and the app stopped.
    """

    __slots__ = ("_credential", "_due", "_ended", "_send", "_verifier")

    def __init__(self, send: Send, verifier: CredentialVerifier | None, credential: str) -> None:
        self._send = send
        self._verifier = verifier
        self._credential = credential
        self._due = time.monotonic() + RECHECK_SECONDS
        self._ended = False

    async def send(self, message: Message) -> None:
        if self._ended:
            raise _CredentialEnded  # an app that carried on after the first refusal
        if (
            self._verifier is not None
            and message["type"] == "http.response.body"
            and message.get("more_body", False)
            and time.monotonic() >= self._due
        ):
            try:
                await self._verifier.verify(self._credential)
            except MCPGuardError:
                self._ended = True
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                raise _CredentialEnded from None
            self._due = time.monotonic() + RECHECK_SECONDS
        await self._send(message)


class _OneAtATime:
    """A lock per client address, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, address: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(address, (None, 0))
        lock = lock if lock is not None else asyncio.Lock()
        self._locks[address] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[address]
            if users == 1:
                del self._locks[address]
            else:
                self._locks[address] = (lock, users - 1)
