"""The public routes: RFC 9728 protected-resource metadata, and the audit API's OpenAPI document."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.audit.openapi import OPENAPI_PATH, OpenAPIRoute
from mcpguard.config import GuardConfig
from mcpguard.errors import MethodNotAllowed
from mcpguard.responses import send_json
from mcpguard.routing import Router
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE

__all__ = ["WELL_KNOWN", "PublicRoutes", "resource_metadata_url"]

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def resource_metadata_url(config: GuardConfig, resource_path: str) -> str:
    """Where the metadata of the resource at ``resource_path`` is published (RFC 9728 §3.1)."""
    return f"{config.origin}{WELL_KNOWN}{resource_path}"


class PublicRoutes:
    """Serves the few public paths (metadata; the OpenAPI document unless ``openapi`` is false), guards the rest."""

    name = "public"

    def __init__(self, app: ASGIApp, config: GuardConfig, *, openapi: bool = True) -> None:
        self.app = app
        self._config = config
        self._router = Router(config)
        self._openapi = OpenAPIRoute(config) if openapi else None

    def _metadata(self, resource_path: str) -> dict[str, Any]:
        document: dict[str, Any] = {
            "resource": f"{self._config.origin}{resource_path}",
            "authorization_servers": list(self._config.authorization_servers),
            "scopes_supported": [READ, WRITE, ADMIN, AUDIT],
            "bearer_methods_supported": ["header"],
        }
        if self._config.resource_name:
            document["resource_name"] = self._config.resource_name
        return document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path == WELL_KNOWN or path.startswith(WELL_KNOWN + "/"):
            resource_path = path[len(WELL_KNOWN) :] or self._config.mcp_path
            if self._router.route(resource_path) is not None:
                if scope["method"] not in ("GET", "HEAD"):
                    raise MethodNotAllowed("metadata is read-only", allowed=("GET", "HEAD"))
                cors = [(b"access-control-allow-origin", b"*")]
                await send_json(send, 200, self._metadata(resource_path), extra_headers=cors)
                return
        if path == OPENAPI_PATH and self._openapi is not None:
            await self._openapi(scope, receive, send)
            return
        await self.app(scope, receive, send)
