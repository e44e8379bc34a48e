"""Who is calling: built only from a verified credential, never from anything the client asserts."""

from __future__ import annotations

import enum
import re
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["TENANT_RULE", "CredentialKind", "Principal", "bound_principal", "current_principal", "is_tenant_name"]

# One rule for every credential's tenant (a key's, a user's, a token's claim): the name travels in a header to
# the upstream, names the path of a per-tenant URL and keys the rate-limit counters, so it is plain ASCII.
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,128}")
TENANT_RULE = "a tenant is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"


def is_tenant_name(value: str) -> bool:
    """Whether ``value`` is a tenant name every part of the guard can carry as it is."""
    return _TENANT.fullmatch(value) is not None


class CredentialKind(enum.StrEnum):
    """How the principal proved who it is."""

    KEY = "key"
    TOKEN = "token"  # noqa: S105 - a credential kind, not a secret


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The verified identity of one request: the tenant is bound by the credential, server-side."""

    tenant: str
    subject: str
    credential_id: str
    client_id: str
    scopes: frozenset[str]
    kind: CredentialKind


_current: ContextVar[Principal | None] = ContextVar("mcpguard_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the request being served in this task, or ``None`` outside the guard."""
    return _current.get()


# Named and used like a function; a class rather than a generator, since it is entered on every request.
class bound_principal:
    """Make ``principal`` the current one for the duration of the block (reset on the way out, whatever happens)."""

    __slots__ = ("_principal", "_token")

    def __init__(self, principal: Principal) -> None:
        self._principal = principal

    def __enter__(self) -> None:
        self._token = _current.set(self._principal)

    def __exit__(self, *_: object) -> None:
        _current.reset(self._token)
