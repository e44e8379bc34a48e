"""Guard settings: one frozen dataclass, validated as a whole so every problem is reported at once."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE

__all__ = ["ConfigError", "GuardConfig"]

_KNOWN_SCOPES = frozenset({READ, WRITE, ADMIN, AUDIT})
_ENDPOINT = re.compile(r"(/[^/{}]+|/\{tenant\})+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid mcpguard configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardConfig:
    """How the guard is reached and what it accepts.

    ``public_url`` is the origin clients use to reach the guard (it names the protected resource in
    RFC 9728 metadata and challenges, and by default is the only ``Host``/``Origin`` accepted);
    ``tenant_path`` is the per-tenant form of the MCP endpoint.
    """

    public_url: str = "http://127.0.0.1:8000"
    mcp_path: str = "/mcp"
    tenant_path: str | None = "/{tenant}/mcp"
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 64
    api_key_header: str | None = None
    tool_scopes: Mapping[str, str] = field(default_factory=dict)
    authorization_servers: tuple[str, ...] = ()
    resource_name: str | None = None
    tenant_argument: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    # Key ids that may query the audit trail across tenants. Only keys: a token's id (jti, gid) is its issuer's
    # choice, and could be made to equal an operator key's id, which is no secret.
    operator_credentials: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        # public_url is never quoted back: it may carry credentials, and it is shown to every client.
        problems += _public_url_problems(self.public_url)
        # Request paths are compared after collapsing and trimming slashes; configured ones must already be.
        if not _ENDPOINT.fullmatch(self.mcp_path) or "{" in self.mcp_path:
            problems.append(
                f"mcp_path must be '/'-separated segments without '//', '{{' or a trailing '/', got {self.mcp_path!r}"
            )
        if self.tenant_path is not None and (
            not _ENDPOINT.fullmatch(self.tenant_path) or self.tenant_path.count("{tenant}") != 1
        ):
            problems.append(
                f"tenant_path must be like mcp_path with one '{{tenant}}' segment, got {self.tenant_path!r}"
            )
        if self.max_body_bytes < 1024:
            problems.append("max_body_bytes must be at least 1024")
        if not 2 <= self.max_json_depth <= 1000:
            problems.append("max_json_depth must be between 2 and 1000")
        if self.api_key_header is not None and (
            not _HEADER_NAME.fullmatch(self.api_key_header) or self.api_key_header.lower() == "authorization"
        ):
            problems.append(
                f"api_key_header must be a plain header name other than Authorization, got {self.api_key_header!r}"
            )
        if self.tenant_argument is not None and not self.tenant_argument:
            problems.append("tenant_argument must be a non-empty property name")
        for tool, scope in self.tool_scopes.items():
            if scope not in _KNOWN_SCOPES:
                problems.append(f"tool_scopes[{tool!r}] names unknown scope {scope!r}")
        if problems:
            raise ConfigError(problems)

    @property
    def origin(self) -> str:
        """``public_url`` without a trailing slash."""
        return self.public_url.rstrip("/")


def _public_url_problems(url: str) -> list[str]:
    # Checked before urlsplit, which silently drops tabs and newlines (the URL is sent in headers as it is).
    if any(c.isspace() or not c.isprintable() for c in url):
        return ["public_url must not hold spaces or control characters"]
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # read only to see whether it raises on a bad port
    except ValueError:
        return ["public_url must be an absolute http(s) URL (scheme://host[:port]) with a valid host and port"]
    if "@" in parts.netloc:
        return ["public_url must not hold credentials (user:password@): it is advertised to every client"]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ["public_url must be an absolute http(s) URL (scheme://host[:port])"]
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return ["public_url must be an origin only (scheme://host[:port]), without path or query"]
    return []
