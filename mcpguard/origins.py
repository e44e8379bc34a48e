"""DNS-rebinding protection: the ``Host`` must be one this guard serves, a browser ``Origin`` one it allows.

Checked by the guard itself, before any credential is looked at and before the sidecar rewrites
``Host`` for its upstream (which would otherwise hide what the client asked for).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from mcpguard.config import GuardConfig
from mcpguard.errors import MisdirectedRequest, OriginNotAllowed
from mcpguard.request_state import request_headers

__all__ = ["OriginLayer", "allowed_hosts", "allowed_origins"]

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
ANY = "*"


def _loopback_variants(host: str, port: int | None) -> list[str]:
    if host.lower() not in _LOOPBACK and host.lower() != "::1":
        return [host]
    return [f"{name}:{port}" if port else name for name in _LOOPBACK]


def allowed_hosts(config: GuardConfig) -> frozenset[str]:
    """The ``Host`` values served: configured ones, else ``public_url``'s (all loopback names if local)."""
    if config.allowed_hosts:
        return frozenset(h.lower() for h in config.allowed_hosts)
    parts = urlsplit(config.origin)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    default_port = 443 if parts.scheme == "https" else 80
    names = {parts.netloc.lower()}
    names.update(v.lower() for v in _loopback_variants(host, parts.port))
    if parts.port in (None, default_port):
        names.update(v.lower() for v in _loopback_variants(host, None))
        names.add(f"{host}:{default_port}".lower())
    return frozenset(names)


def allowed_origins(config: GuardConfig) -> frozenset[str]:
    """The browser origins allowed: configured ones, else ``public_url``'s own (and its loopback twins)."""
    if config.allowed_origins:
        return frozenset(o.lower().rstrip("/") for o in config.allowed_origins)
    parts = urlsplit(config.origin)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return frozenset(f"{parts.scheme}://{v}".lower() for v in _loopback_variants(host, parts.port))


class OriginLayer:
    """Refuses a ``Host`` this guard does not serve (421) and a browser ``Origin`` it does not allow (403)."""

    name = "origin"

    def __init__(self, app: ASGIApp, config: GuardConfig) -> None:
        self.app = app
        self._hosts = allowed_hosts(config)
        self._origins = allowed_origins(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = request_headers(scope)
        hosts = headers.get(b"host", ())
        origins = headers.get(b"origin", ())
        if ANY not in self._hosts and (len(hosts) != 1 or hosts[0].decode("latin-1").lower() not in self._hosts):
            raise MisdirectedRequest("this server does not answer for that Host")
        if (
            origins
            and ANY not in self._origins
            and (len(origins) != 1 or origins[0].decode("latin-1").lower().rstrip("/") not in self._origins)
        ):
            raise OriginNotAllowed("requests from this origin are not allowed")
        await self.app(scope, receive, send)
