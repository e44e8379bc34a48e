"""mcpguard: tenant binding, per-method scopes, hashed keys and OAuth for MCP servers, as pure ASGI."""

from __future__ import annotations

from mcpguard.assertions import ASSERTION_HEADER, AssertionSigner
from mcpguard.audit import (
    AuditEvent,
    AuditQuery,
    AuditStore,
    PostgresAuditStore,
    SQLiteAuditStore,
    new_event_id,
    open_audit_store,
    parse_query,
)
from mcpguard.audit.log_export import ExportingAuditStore
from mcpguard.audit.query import FILTERS as AUDIT_FILTERS
from mcpguard.config import ConfigError, GuardConfig
from mcpguard.errors import (
    AuthenticationRequired,
    HeaderMismatch,
    InsufficientScope,
    InvalidClient,
    InvalidRequest,
    InvalidToken,
    MCPGuardError,
    MethodNotAllowed,
    OAuthError,
    PayloadTooLarge,
    RateLimited,
    SessionNotFound,
    StorageUnavailable,
    TenantMismatch,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpguard.guard import MCPGuard, build_guard, rate_limit_factory, stack_names, with_authorization_server
from mcpguard.json_input import read_json
from mcpguard.keyring import KeyRing
from mcpguard.oauth import (
    AccessTokenIssuer,
    ClientMetadataError,
    ClientMetadataFetcher,
    SharedSecret,
    SigningKeys,
)
from mcpguard.oauth.builtin import BuiltInAuthorizationServer, OAuthStore
from mcpguard.oauth.redirect_uris import LOOPBACK_HOSTS, redirect_uri_allowed
from mcpguard.oauth.settings import OAuthSettings, PreregisteredClient
from mcpguard.oauth.users import Account, Authenticator, LocalUsers
from mcpguard.parsing import Disconnected, read_body
from mcpguard.principal import CredentialKind, Principal, current_principal
from mcpguard.ratelimit import FailedAuthLimiter, RateLimitLayer, RateLimits, client_ip, open_limiter_storage
from mcpguard.request_state import RequestState, state_of
from mcpguard.responses import send_json
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE, ScopePolicy
from mcpguard.sessions import MemorySessionBindings, SessionBindings
from mcpguard.sse import event_bytes
from mcpguard.stores import open_store
from mcpguard.stores.base import GrantRecord, GrantStore, KeyRecord, KeyStore, Store, UserRecord, UserStore
from mcpguard.telemetry import Telemetry, TelemetryLayer, configure_telemetry
from mcpguard.tokens import JWTVerifier, TokenVerifier
from mcpguard.tool_catalog import ToolCatalog, ToolLister
from mcpguard.tool_listing import Exchange, ListingError, asgi_exchange, tool_lister

__all__ = [
    "ADMIN",
    "ASSERTION_HEADER",
    "AUDIT",
    "AUDIT_FILTERS",
    "AccessTokenIssuer",
    "Account",
    "AssertionSigner",
    "AuditEvent",
    "AuditQuery",
    "AuditStore",
    "AuthenticationRequired",
    "Authenticator",
    "BuiltInAuthorizationServer",
    "ClientMetadataError",
    "ClientMetadataFetcher",
    "ConfigError",
    "CredentialKind",
    "Disconnected",
    "Exchange",
    "ExportingAuditStore",
    "FailedAuthLimiter",
    "GrantRecord",
    "GrantStore",
    "GuardConfig",
    "HeaderMismatch",
    "InsufficientScope",
    "InvalidClient",
    "InvalidRequest",
    "InvalidToken",
    "JWTVerifier",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "LOOPBACK_HOSTS",
    "ListingError",
    "LocalUsers",
    "MCPGuard",
    "MCPGuardError",
    "MemorySessionBindings",
    "MethodNotAllowed",
    "OAuthError",
    "OAuthSettings",
    "OAuthStore",
    "PayloadTooLarge",
    "PostgresAuditStore",
    "PreregisteredClient",
    "Principal",
    "READ",
    "RateLimitLayer",
    "RateLimited",
    "RateLimits",
    "RequestState",
    "SQLiteAuditStore",
    "ScopePolicy",
    "SessionBindings",
    "SessionNotFound",
    "SharedSecret",
    "SigningKeys",
    "StorageUnavailable",
    "Store",
    "Telemetry",
    "TelemetryLayer",
    "TenantMismatch",
    "TokenVerifier",
    "ToolCatalog",
    "ToolLister",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UserRecord",
    "UserStore",
    "WRITE",
    "asgi_exchange",
    "build_guard",
    "client_ip",
    "configure_telemetry",
    "current_principal",
    "event_bytes",
    "new_event_id",
    "open_audit_store",
    "open_limiter_storage",
    "open_store",
    "parse_query",
    "rate_limit_factory",
    "read_body",
    "read_json",
    "redirect_uri_allowed",
    "send_json",
    "stack_names",
    "state_of",
    "tool_lister",
    "with_authorization_server",
]
