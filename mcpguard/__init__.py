"""mcpguard: tenant binding, per-method scopes, hashed keys and OAuth for MCP servers, as pure ASGI."""

from __future__ import annotations

from mcpguard.config import ConfigError, GuardConfig
from mcpguard.errors import (
    AuthenticationRequired,
    HeaderMismatch,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    MCPGuardError,
    MethodNotAllowed,
    PayloadTooLarge,
    SessionNotFound,
    StorageUnavailable,
    TenantMismatch,
)
from mcpguard.guard import MCPGuard, build_guard, stack_names
from mcpguard.keyring import KeyRing
from mcpguard.principal import CredentialKind, Principal, current_principal
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE, ScopePolicy
from mcpguard.sessions import MemorySessionBindings, SessionBindings
from mcpguard.stores import open_store
from mcpguard.stores.base import KeyRecord, KeyStore, Store
from mcpguard.tokens import JWTVerifier, TokenVerifier
from mcpguard.tool_catalog import ToolCatalog, ToolLister

__all__ = [
    "ADMIN",
    "AUDIT",
    "AuthenticationRequired",
    "ConfigError",
    "CredentialKind",
    "GuardConfig",
    "HeaderMismatch",
    "InsufficientScope",
    "InvalidRequest",
    "InvalidToken",
    "JWTVerifier",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "MCPGuard",
    "MCPGuardError",
    "MemorySessionBindings",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "Principal",
    "READ",
    "ScopePolicy",
    "SessionBindings",
    "SessionNotFound",
    "StorageUnavailable",
    "Store",
    "TenantMismatch",
    "TokenVerifier",
    "ToolCatalog",
    "ToolLister",
    "WRITE",
    "build_guard",
    "current_principal",
    "open_store",
    "stack_names",
]
