"""The sidecar's settings for the built-in authorization server: clients registered in the file, the checks
made on them, and the library objects they describe.

Secrets (client secrets, the HS256 signing secret) only ever come from the environment when the sidecar
starts; the settings name the variables, and no problem ever quotes a value read from one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from mcpguard import (
    LOOPBACK_HOSTS,
    ConfigError,
    OAuthSettings,
    PreregisteredClient,
    SharedSecret,
    SigningKeys,
    read_json,
    redirect_uri_allowed,
)

if TYPE_CHECKING:
    from sidecar.settings import SidecarSettings

__all__ = [
    "DAYS_RULE",
    "DEFAULT_JWT_SECRET_ENV",
    "MAX_DAYS",
    "MIN_SECRET_BYTES",
    "OAuthClient",
    "Problem",
    "build_oauth_settings",
    "client_secret_hashes",
    "default_keys_dir",
    "oauth_problems",
    "parse_oauth_clients",
    "secret_problem",
    "signing_key",
]

# Used as the HS256 secret when set and neither jwt_secret_env nor oauth_keys_dir is configured.
DEFAULT_JWT_SECRET_ENV = "MCPGUARD_JWT_SECRET"  # noqa: S105 - the name of a variable, not a secret
MIN_SECRET_BYTES = 32
# The longest lifetime or retention a setting may give: a hundred years, far within what timedelta and datetime hold.
MAX_DAYS = 36_500.0
DAYS_RULE = f"must be more than 0 and at most {MAX_DAYS:.0f} (a hundred years)"
_MAX_ACCESS_MINUTES = 60.0
_MAX_GRACE_SECONDS = 60.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SQLITE = "sqlite:///"
_CLIENT_KEYS = ("client_id", "client_name", "redirect_uris", "client_secret_env")
# Settings that mean something only with oauth = true; jwt_secret_env is one of them despite its name.
_OAUTH_ONLY = "jwt_secret_env"

# (fields the problem is about, what is wrong, fields it was inferred from): the shape settings.py reports.
Problem = tuple[tuple[str, ...], str, tuple[str, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthClient:
    """A client registered in the settings (``[[oauth_clients]]``), such as a hosted assistant with fixed callbacks."""

    client_id: str
    redirect_uris: tuple[str, ...]
    client_name: str | None = None
    # The variable holding a confidential client's secret: the secret itself never appears in the settings.
    client_secret_env: str | None = None


def parse_oauth_clients(raw: object, text: bool) -> tuple[OAuthClient, ...]:
    """An array of ``[[oauth_clients]]`` tables (a JSON array when ``text``) as clients; ``ValueError`` if malformed."""
    if text and isinstance(raw, str):
        try:
            raw = read_json(raw)
        except ValueError:
            raise ValueError("not a JSON array of objects") from None
    if not isinstance(raw, list | tuple):
        raise ValueError("expected an array of tables ([[oauth_clients]])")
    return tuple(_client(index, table) for index, table in enumerate(raw))


def _client(index: int, table: object) -> OAuthClient:
    where = f"[{index}]"
    if isinstance(table, OAuthClient):
        return table
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table")
    for key in table:
        if key == "client_secret":
            raise ValueError(f"{where}: a secret is never written here; name its variable in client_secret_env")
        if key not in _CLIENT_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}")
    client_id = table.get("client_id")
    if not isinstance(client_id, str):
        raise ValueError(f"{where}: client_id must be a string")
    uris = table.get("redirect_uris")
    if not isinstance(uris, list | tuple) or not all(isinstance(uri, str) for uri in uris):
        raise ValueError(f"{where}: redirect_uris must be a list of strings")
    optional = {name: table.get(name) for name in ("client_name", "client_secret_env")}
    for name, value in optional.items():
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string")
    return OAuthClient(
        client_id=client_id,
        redirect_uris=tuple(uris),
        client_name=optional["client_name"] or None,
        client_secret_env=optional["client_secret_env"] or None,
    )


def default_keys_dir(state_url: str) -> str | None:
    """Where signing keys live by default: next to an SQLite state file; ``None`` for any other state."""
    if not state_url.startswith(_SQLITE):
        return None
    path = state_url.removeprefix(_SQLITE)
    return None if path in ("", ":memory:") else f"{path}.keys"


def oauth_problems(settings: SidecarSettings) -> list[Problem]:
    """Everything wrong with the authorization server's settings, each problem naming its fields."""
    problems: list[Problem] = []

    def check(name: str, ok: bool, message: str) -> None:
        if not ok:
            problems.append(((name,), message, ()))

    if not settings.oauth:
        for setting in fields(settings):
            if setting.name.startswith("oauth_") or setting.name == _OAUTH_ONLY:
                default = setting.default_factory() if setting.default_factory is not MISSING else setting.default
                if getattr(settings, setting.name) != default:
                    problems.append(
                        ((setting.name,), "applies to the built-in authorization server, but oauth is off", ("oauth",))
                    )
        return problems
    check(
        "oauth_access_token_minutes",
        0 < settings.oauth_access_token_minutes <= _MAX_ACCESS_MINUTES,
        "must be more than 0 and at most 60",
    )
    check(
        "oauth_refresh_days",
        0 < settings.oauth_refresh_days <= MAX_DAYS,
        DAYS_RULE,
    )
    check(
        "oauth_refresh_grace_seconds",
        0 <= settings.oauth_refresh_grace_seconds <= _MAX_GRACE_SECONDS,
        "must be between 0 (off) and 60 seconds",
    )
    if settings.oauth_keys_dir is not None:
        check("oauth_keys_dir", bool(settings.oauth_keys_dir.strip()), "must not be blank")
    if settings.jwt_secret_env is not None:
        check("jwt_secret_env", bool(_ENV_NAME.fullmatch(settings.jwt_secret_env)), "not a variable name")
        if settings.oauth_keys_dir is not None:
            problems.append((("oauth_keys_dir", "jwt_secret_env"), "set at most one of them", ()))
    elif default_keys_dir(settings.state_url) is None and settings.oauth_keys_dir is None:
        message = "is required when state is not an SQLite file, unless jwt_secret_env names an HS256 secret"
        problems.append((("oauth_keys_dir",), message, ("state", "jwt_secret_env")))
    problems += _origin_problems(settings)
    problems += _client_problems(settings.oauth_clients)
    return problems


def _origin_problems(settings: SidecarSettings) -> list[Problem]:
    try:
        origin = urlsplit(settings.public_origin)
    except ValueError:
        return []  # no origin: the listen problem already says so
    # The sign-in form's CSRF cookie is Secure, and OAuth 2.1 wants TLS: plain http works on loopback only.
    if origin.scheme == "https" or origin.hostname in LOOPBACK_HOSTS:
        return []
    message = "needs an https public_url (plain http only on localhost, 127.0.0.1 or [::1])"
    return [(("oauth",), message, ("public_url", "listen"))]


def _client_problems(clients: tuple[OAuthClient, ...]) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for index, client in enumerate(clients):
        where = f"[{index}]"
        if not client.client_id.strip() or client.client_id in seen:
            problems.append((("oauth_clients",), f"{where}: client_id must be unique and non-empty", ()))
        seen.add(client.client_id)
        if not client.redirect_uris:
            problems.append((("oauth_clients",), f"{where}: needs at least one redirect URI", ()))
        for uri in client.redirect_uris:
            if not redirect_uri_allowed(uri):
                message = f"{where}: redirect URI {uri!r} must be https, or http on a loopback host, without a fragment"
                problems.append((("oauth_clients",), message, ()))
        if client.client_secret_env is not None and not _ENV_NAME.fullmatch(client.client_secret_env):
            problems.append((("oauth_clients",), f"{where}: client_secret_env is not a variable name", ()))
    return problems


def secret_problem(setting: str, secret: str, min_bytes: int = 1) -> str | None:
    """What is wrong with ``secret``, read from the variable the ``*_env`` ``setting`` names, or ``None``.

    Neither the secret nor the variable's name is quoted: a secret pasted where its name belongs may look
    like one.
    """
    if not secret:
        return f"{setting}: the variable it names is not set or empty"
    if len(secret.encode()) < min_bytes:
        return f"{setting}: the variable it names must hold at least {min_bytes} bytes"
    return None


def client_secret_hashes(clients: tuple[OAuthClient, ...], env: Mapping[str, str]) -> dict[str, str]:
    """The SHA-256 of each confidential client's secret, read now from ``env``; the secrets are not kept."""
    hashes: dict[str, str] = {}
    missing: list[str] = []
    for index, client in enumerate(clients):
        if client.client_secret_env is None:
            continue
        secret = env.get(client.client_secret_env, "").strip()
        problem = secret_problem(f"oauth_clients: [{index}]: client_secret_env", secret)
        if problem is not None:
            missing.append(problem)
            continue
        hashes[client.client_id] = hashlib.sha256(secret.encode()).hexdigest()
    if missing:
        raise ConfigError(missing)
    return hashes


def build_oauth_settings(settings: SidecarSettings, secret_hashes: Mapping[str, str]) -> OAuthSettings:
    """The library's authorization-server settings: this sidecar's origin issues tokens for its MCP endpoint."""
    origin = settings.public_origin
    return OAuthSettings(
        issuer=origin,
        resource=origin + settings.mcp_path,
        access_token_lifetime=timedelta(minutes=settings.oauth_access_token_minutes),
        refresh_lifetime=timedelta(days=settings.oauth_refresh_days),
        refresh_grace=timedelta(seconds=settings.oauth_refresh_grace_seconds),
        dynamic_registration=settings.oauth_dynamic_registration,
        client_metadata_documents=settings.oauth_client_metadata_documents,
        clients=tuple(
            PreregisteredClient(
                client_id=client.client_id,
                redirect_uris=client.redirect_uris,
                client_name=client.client_name,
                client_secret_sha256=secret_hashes.get(client.client_id),
            )
            for client in settings.oauth_clients
        ),
    )


def signing_key(settings: SidecarSettings, env: Mapping[str, str]) -> SigningKeys | SharedSecret:
    """The HS256 secret ``jwt_secret_env`` names, else the Ed25519 keys in the keys directory (made if absent)."""
    if settings.jwt_secret_env is not None:
        secret = env.get(settings.jwt_secret_env, "")
        problem = secret_problem("jwt_secret_env", secret, MIN_SECRET_BYTES)
        if problem is not None:
            raise ConfigError([problem])
        return SharedSecret(secret)
    directory = settings.oauth_keys_dir or default_keys_dir(settings.state_url)
    if directory is None:
        raise ConfigError(["oauth_keys_dir: is required when state is not an SQLite file"])
    try:
        return SigningKeys.load_or_create(directory)
    except OSError as error:
        raise ConfigError([f"oauth_keys_dir: cannot use {directory} ({error.strerror})"]) from None
