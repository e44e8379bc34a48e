"""Which redirect URIs a client may register, however it registers (RFC 7591 or a metadata document)."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["LOOPBACK_HOSTS", "redirect_uri_allowed"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_MAX_LENGTH = 2000


def redirect_uri_allowed(uri: str) -> bool:
    """Absolute https, or http on a loopback host for native apps (RFC 8252 §7.3); no fragment or user info."""
    if len(uri) > _MAX_LENGTH or "#" in uri or any(ord(c) < 0x21 or ord(c) == 0x7F or c == "\\" for c in uri):
        return False
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - evaluated only because it raises ValueError for a malformed port
    except ValueError:
        return False
    if not parts.hostname or "@" in parts.netloc:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS
