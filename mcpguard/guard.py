"""Assembly of the guard: ``build_guard()`` is the one place the order of the stack is decided."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from limits.aio.storage import Storage
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcpguard.assertions import AssertionSigner
from mcpguard.audit.api import AuditAPI
from mcpguard.audit.recorder import AuditGate, AuditLayer, AuditStore
from mcpguard.authentication import AuthenticationLayer, CredentialVerifier
from mcpguard.authorization import ScopeLayer
from mcpguard.config import ConfigError, GuardConfig
from mcpguard.errors import MCPGuardError
from mcpguard.headers import header_index
from mcpguard.metadata import PublicRoutes, resource_metadata_url
from mcpguard.oauth.builtin import BuiltInAuthorizationServer
from mcpguard.origins import OriginLayer
from mcpguard.parsing import ParseLayer
from mcpguard.pinning import PinningLayer
from mcpguard.ratelimit import FailedAuthLimiter, RateLimitLayer, RateLimits, open_limiter_storage
from mcpguard.request_state import SCOPE_KEY, RequestState, state_of
from mcpguard.responses import send_error
from mcpguard.routing import MCPRoute, Router
from mcpguard.scopes import ScopePolicy
from mcpguard.sessions import MemorySessionBindings, SessionBindings, SessionLayer
from mcpguard.telemetry import Telemetry, TelemetryLayer
from mcpguard.tenancy import IDENTITY_HEADER_PREFIX, TenantLayer
from mcpguard.tool_catalog import ToolCatalog, ToolLister
from mcpguard.tool_listing import asgi_exchange
from mcpguard.tool_listing import tool_lister as make_tool_lister

__all__ = ["MCPGuard", "build_guard", "rate_limit_factory", "stack_names"]

Layer = Callable[[ASGIApp], ASGIApp]


_SPACED_PREFIX = b" " + IDENTITY_HEADER_PREFIX


def _dropped(name: bytes) -> bool:
    """Whether the client's header ``name`` (lower case) is dropped before any layer reads it.

    Identity headers are the guard's to write. A name with an underscore is dropped too, as nginx does by
    default: servers that read headers CGI-style (Django, Rack, PHP) fold "_" into "-", so a client's
    X_MCPGuard_Tenant or Mcp_Session_Id would reach them as the very header the guard wrote or checked.
    """
    return b"_" in name or name.startswith(IDENTITY_HEADER_PREFIX)


class EntryLayer:
    """Outermost: lifespan passes, WebSocket is refused, identity and underscored headers from outside are dropped."""

    name = "entry"

    def __init__(self, app: ASGIApp, config: GuardConfig, *, wrapped: ASGIApp) -> None:
        self.app = app
        self._wrapped = wrapped
        self._router = Router(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Startup and shutdown belong to the wrapped app; no guard layer has anything to do there.
            await self._wrapped(scope, receive, send)
            return
        if scope["type"] != "http":
            # MCP defines no WebSocket transport; closing before accept answers the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = list(scope["headers"])  # ASGI allows any iterable; every later layer reads a list
        index = header_index(headers)
        # _dropped's test over every name at once (names never hold a space): two searches, not a loop per name.
        names = b" " + b" ".join(index)
        if b"_" in names or _SPACED_PREFIX in names:
            headers = [(k, v) for k, v in headers if not _dropped(k.lower())]
            index = {name: values for name, values in index.items() if not _dropped(name)}
        state = RequestState(headers=index)
        scope = {**scope, "headers": headers, SCOPE_KEY: state}
        try:
            route = self._route(scope)
        except MCPGuardError as exc:
            await send_error(send, exc, state, None)
            return
        if route is not None:
            state.is_mcp = True
            state.path_tenant = route.path_tenant
        await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> MCPRoute | None:
        """The MCP route of the request's path, with or without the prefix it is mounted under.

        Under ``root_path`` (a Starlette ``Mount``, ``uvicorn --root-path``) the path still holds the prefix,
        but the app routes what follows it: either reading that is the MCP endpoint makes the request MCP.
        """
        path: str = scope["path"]
        route = self._router.route(path)
        root: str = scope.get("root_path", "")
        if route is None and root and path.startswith(root):
            route = self._router.route(path[len(root) :] or "/")
        return route


class ErrorLayer:
    """Turns any refusal raised below into its response, with the challenge MCP clients follow."""

    name = "errors"

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = state_of(scope)

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state.response_started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except MCPGuardError as exc:
            state.refusal = exc.error_code
            state.refusal_reason = exc.audit_reason
            if state.response_started:
                raise
            resource_path = scope["path"] if state.is_mcp else self._config.mcp_path
            await send_error(send, exc, state, resource_metadata_url(self._config, resource_path))


def build_guard(
    app: ASGIApp,
    config: GuardConfig,
    *,
    keys: CredentialVerifier | None = None,
    tokens: CredentialVerifier | None = None,
    tool_lister: ToolLister | None = None,
    catalog: ToolCatalog | None = None,
    sessions: SessionBindings | None = None,
    assertions: AssertionSigner | None = None,
    failed_auth: FailedAuthLimiter | None = None,
    rate_limit: Layer | None = None,
    audit: AuditStore | None = None,
    audit_retention: timedelta | None = None,
    telemetry: Telemetry | None = None,
    authorization_server: Layer | None = None,
) -> ASGIApp:
    """Wrap ``app`` in the guard stack, outermost first:

    entry → telemetry (when given) → audit → errors → public → authorization server (when given) →
    origin → parse → authenticate → tenant →
    sessions → rate limit → audit API → scopes → pinning (when a tenant argument is configured) →
    audit start → app.

    Audit sits outside the error layer so it sees every outcome (401/403/429 included), and its gate
    sits last, so a call's start is committed only when it really is forwarded; Host and Origin
    are checked before anything else is read (DNS rebinding), after the public metadata and the OAuth
    endpoints (which browser-based clients call cross-origin, and which check their own forms); parsing comes
    before authentication so nothing is decided on a body the server would read differently; the
    rate limit counts every authenticated call, refused by scope or not. A session is checked against
    its owner before anything is counted or forwarded under it. Telemetry sits outside audit, so a span's
    duration includes the audit writes, and it reads the outcome the audit records rather than rescanning.
    """
    if audit_retention is not None and audit_retention <= timedelta(0):
        # Retention deletes what is older than now minus it: at or below zero, that is the whole trail.
        raise ConfigError(["audit_retention must be more than zero, or None to keep the trail for ever"])
    policy = ScopePolicy(tool_overrides=dict(config.tool_scopes))
    if catalog is None:
        lister = tool_lister if tool_lister is not None else make_tool_lister(asgi_exchange(app, config.mcp_path))
        catalog = ToolCatalog(lister)
    inner: ASGIApp = app
    if audit is not None:
        inner = AuditGate(inner)
    if config.tenant_argument is not None:
        inner = PinningLayer(inner, argument=config.tenant_argument)
    inner = ScopeLayer(inner, policy=policy, catalog=catalog, pinned_argument=config.tenant_argument)
    if audit is not None:
        inner = AuditAPI(inner, audit, policy=policy, operators=frozenset(config.operator_credentials))
    if rate_limit is not None:
        inner = rate_limit(inner)
    inner = SessionLayer(inner, bindings=sessions if sessions is not None else MemorySessionBindings())
    inner = TenantLayer(inner, assertions=assertions)
    inner = AuthenticationLayer(
        inner,
        keys=keys,
        tokens=tokens,
        api_key_header=config.api_key_header,
        failed_auth=failed_auth,
        trusted_proxies=frozenset(config.trusted_proxies),
    )
    inner = ParseLayer(inner, config)
    inner = OriginLayer(inner, config)
    if authorization_server is not None:
        inner = authorization_server(inner)
    inner = PublicRoutes(inner, config, openapi=audit is not None)
    inner = ErrorLayer(inner, config)
    if audit is not None:
        inner = AuditLayer(inner, audit, retention=audit_retention)
    if telemetry is not None:
        inner = TelemetryLayer(inner, config, telemetry)
    return EntryLayer(inner, config, wrapped=app)


def rate_limit_factory(rate_limits: RateLimits, storage: Storage) -> Layer:
    """The rate-limit slot of ``build_guard`` for these limits over ``storage``."""

    def layer(app: ASGIApp) -> ASGIApp:
        return RateLimitLayer(app, rate_limits, storage=storage)

    return layer


def with_authorization_server(
    config: GuardConfig,
    oauth: BuiltInAuthorizationServer | None,
    *,
    tokens: CredentialVerifier | None,
    failed_auth: FailedAuthLimiter | None,
) -> tuple[GuardConfig, CredentialVerifier | None, Layer | None]:
    """The configuration, token verifier and authorization-server slot for a guard serving ``oauth``.

    The built-in server verifies its own tokens (so ``tokens`` must be ``None``), is named in the RFC 9728
    metadata unless other servers are configured, and counts failed sign-ins with ``failed_auth``.
    """
    if oauth is None:
        return config, tokens, None
    if tokens is not None:
        raise ConfigError(["give either tokens or oauth: the built-in server verifies its own tokens"])
    if not config.authorization_servers:
        config = replace(config, authorization_servers=(oauth.settings.origin,))
    limiter = failed_auth if failed_auth is not None else FailedAuthLimiter()
    layer = oauth.layer(failed_auth=limiter, trusted_proxies=frozenset(config.trusted_proxies))
    return config, oauth.verifier, layer


def stack_names(guard: ASGIApp) -> list[str]:
    """The names of the guard's layers, outermost first (the wrapped app is not included)."""
    names: list[str] = []
    layer: Any = guard
    while isinstance(getattr(layer, "name", None), str) and hasattr(layer, "app"):
        names.append(layer.name)
        layer = layer.app
    return names


class MCPGuard:
    """The guard around an ASGI app: ``app = MCPGuard(app, config, keys=KeyRing(...))``.

    Rate limits are on by default (``RateLimits()``: 100 tool calls a minute per tenant, 20 failed
    authentications a minute per client address), counted in this process unless ``rate_limit_store``
    names a shared store; ``rate_limits=None`` turns the tenant limit off. With ``audit``, entries older than
    ``audit_retention`` are deleted once an hour (``None`` keeps them for ever). Telemetry is off unless
    ``telemetry`` is given (``Telemetry()`` records to the global OpenTelemetry providers). With ``oauth``,
    the guard serves that authorization server's endpoints, accepts its access tokens, and names it in
    the protected-resource metadata.
    """

    def __init__(
        self,
        app: ASGIApp,
        config: GuardConfig | None = None,
        *,
        keys: CredentialVerifier | None = None,
        tokens: CredentialVerifier | None = None,
        tool_lister: ToolLister | None = None,
        rate_limits: RateLimits | None = RateLimits(),  # noqa: B008 - frozen, so one shared default is safe
        rate_limit_store: str = "memory://",
        failed_auth_limit: str = "20/minute",
        audit: AuditStore | None = None,
        audit_retention: timedelta | None = timedelta(days=90),
        telemetry: Telemetry | None = None,
        oauth: BuiltInAuthorizationServer | None = None,
    ) -> None:
        storage = open_limiter_storage(rate_limit_store)
        failed_auth = FailedAuthLimiter(storage, limit=failed_auth_limit)
        config, tokens, authorization_server = with_authorization_server(
            config if config is not None else GuardConfig(), oauth, tokens=tokens, failed_auth=failed_auth
        )
        self.config = config
        self._stack = build_guard(
            app,
            self.config,
            keys=keys,
            tokens=tokens,
            tool_lister=tool_lister,
            failed_auth=failed_auth,
            rate_limit=rate_limit_factory(rate_limits, storage) if rate_limits is not None else None,
            audit=audit,
            audit_retention=audit_retention,
            telemetry=telemetry,
            authorization_server=authorization_server,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._stack(scope, receive, send)
