"""Sidecar settings: CLI flags over ``MCPGUARD_*`` environment over a TOML file over defaults.

Every value is checked before the sidecar starts, and every problem is reported at once, each named
by where its value came from (a flag, an environment variable or a key of the file).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard import (
    ADMIN,
    AUDIT,
    READ,
    WRITE,
    ConfigError,
    GuardConfig,
    OAuthSettings,
    SharedSecret,
    SigningKeys,
    read_json,
)
from sidecar.oauth_settings import (
    DAYS_RULE,
    DEFAULT_JWT_SECRET_ENV,
    MAX_DAYS,
    MIN_SECRET_BYTES,
    OAuthClient,
    build_oauth_settings,
    client_secret_hashes,
    oauth_problems,
    parse_oauth_clients,
    secret_problem,
    signing_key,
)
from sidecar.proxy import UPSTREAM_CLIENTS

__all__ = ["OAuthClient", "SettingsError", "SidecarSettings", "load_settings"]

_ENV_PREFIX = "MCPGUARD_"
# Operators already know this name from other MCP servers; the prefixed name wins when both are set.
_RATE_LIMIT_ALIAS = "MCP_RATE_LIMIT_PER_MIN"

_SCOPES = frozenset({READ, WRITE, ADMIN, AUDIT})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name characters
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LISTEN = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")
_HOST = re.compile(r"\*|[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
_ORIGIN = re.compile(r"\*|https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?")
_BEARER = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing that could split or fold a header
# The longest timeout, drain or refresh interval a setting may give: a day. Far longer is a mistake (often a
# number meant in other units), and far larger values overflow the timers and timedeltas they become.
_MAX_SECONDS = 86_400.0
# The rest of a PostgreSQL URL is libpq's to read: one it cannot is refused when the sidecar starts.
_AUDIT_SCHEMES = frozenset({"postgresql", "postgres"})
_ALL_ADDRESSES = frozenset({"0.0.0.0", "::"})  # noqa: S104  # compared against, never bound here
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer"}
    | {"transfer-encoding", "upgrade"}
)
# The proxy owns framing and Host; X-MCPGuard-* carry the verified principal, so config must not forge
# them; the proxy filters tools/list as plain JSON, so the upstream must not be asked to compress.
_REFUSED_HEADERS = _HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
# Fields GuardConfig validates itself; its problems are attributed to them by their leading name.
_GUARD_FIELDS = ("public_url", "mcp_path", "tenant_path", "max_body_bytes", "api_key_header", "tool_scopes")


class SettingsError(ValueError):
    """The settings are invalid; ``problems`` lists every reason, each naming its source."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid sidecar settings:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class _Issue:
    fields: tuple[str, ...]
    message: str
    # Fields the issue was inferred from without being about them: a bad value there makes it moot.
    depends: tuple[str, ...] = ()


class _InvalidSettings(SettingsError):
    def __init__(self, issues: list[_Issue]) -> None:
        super().__init__([_describe(issue, _plain) for issue in issues])
        self.issues = issues


def _plain(name: str) -> str:
    return name


def _describe(issue: _Issue, where: Callable[[str], str]) -> str:
    label = " and ".join(where(name) for name in issue.fields)
    return f"{label}: {issue.message}" if label else issue.message


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class SidecarSettings:
    """Everything the sidecar needs to start; built by :func:`load_settings` and valid by construction."""

    upstream: str | None = None
    upstream_cmd: str | None = None
    listen: str = "127.0.0.1:8080"
    public_url: str | None = None
    state: str = "./mcpguard.db"
    mcp_path: str = "/mcp"
    tenant_path: str | None = "/{tenant}/mcp"
    api_key_header: str | None = None
    upstream_headers: Mapping[str, str] = field(default_factory=dict)
    upstream_bearer_env: str | None = None
    upstream_bearer_file: str | None = None
    upstream_client: str = "pool"
    stdio_max_sessions: int = 64
    stdio_idle_timeout: float = 30 * 60.0
    stdio_env: Mapping[str, str] = field(default_factory=dict)
    stdio_cwd: str | None = None
    stdio_temp_root: str | None = None
    audit: str | None = None
    audit_retention_days: float = 90.0
    audit_otel_logs: bool = False
    otlp_endpoint: str | None = None
    operator_credentials: tuple[str, ...] = ()
    upstream_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    tool_response_limits: Mapping[str, int] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    tool_scopes: Mapping[str, str] = field(default_factory=dict)
    tenant_argument: str | None = None
    annotations_ttl: float = 300.0
    drain_seconds: float = 30.0
    rate_limit_per_min: int = 100
    assertion_secret_env: str | None = None
    assertion_key_file: str | None = None
    assertion_lifetime: float = 60.0
    oauth: bool = False
    oauth_keys_dir: str | None = None
    jwt_secret_env: str | None = None
    oauth_access_token_minutes: float = 10.0
    oauth_refresh_days: float = 30.0
    oauth_refresh_grace_seconds: float = 0.0
    oauth_dynamic_registration: bool = True
    oauth_client_metadata_documents: bool = True
    # A risk, for tests and closed networks only: client metadata may then be fetched from internal addresses.
    oauth_cimd_allow_private: bool = False
    oauth_clients: tuple[OAuthClient, ...] = ()

    def __post_init__(self) -> None:
        issues = self._issues()
        flagged = {name for issue in issues for name in issue.fields}
        if self.oauth and not issues:
            try:
                build_oauth_settings(self, {})
            except ConfigError as error:
                issues += [_Issue((), problem) for problem in error.problems]
        try:
            self._build_guard_config(self._origin() or "http://127.0.0.1:8080")
        except SettingsError as error:
            for problem in error.problems:
                name = next((n for n in _GUARD_FIELDS if problem.startswith(n)), None)
                if name is None:
                    issues.append(_Issue((), problem))
                elif name not in flagged:
                    issues.append(_Issue((name,), problem.removeprefix(name + " ")))
        if issues:
            raise _InvalidSettings(issues)

    def __repr__(self) -> str:
        # Static upstream headers and a stdio server's environment often carry an API key: show their names only.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["upstream_headers"] = dict.fromkeys(self.upstream_headers, "***")
        shown["stdio_env"] = dict.fromkeys(self.stdio_env, "***")
        return "SidecarSettings(" + ", ".join(f"{name}={value!r}" for name, value in shown.items()) + ")"

    @property
    def listen_host(self) -> str:
        """The address to bind, IPv6 without brackets."""
        return _split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port to bind (0 picks a free one)."""
        return _split_listen(self.listen)[1]

    @property
    def public_origin(self) -> str:
        """``public_url`` without a trailing slash, or the one derived from ``listen``."""
        origin = self._origin()
        if origin is None:
            raise SettingsError(["public_url: must be set when listen binds all addresses or a random port"])
        return origin

    @property
    def upstream_argv(self) -> tuple[str, ...]:
        """``upstream_cmd`` split into arguments as a POSIX shell would, or ``()`` for an HTTP upstream."""
        return tuple(shlex.split(self.upstream_cmd)) if self.upstream_cmd else ()

    @property
    def state_url(self) -> str:
        """``state`` as a store URL: a bare path means an SQLite file."""
        return self.state if "://" in self.state else f"sqlite:///{self.state}"

    @property
    def audit_url(self) -> str:
        """Where the audit trail is kept: ``audit``, else the SQLite state file (in memory for memory state)."""
        if self.audit is not None:
            return self.audit
        return "sqlite:///:memory:" if self.state_url == "memory://" else self.state_url

    def guard_config(self) -> GuardConfig:
        """The library's configuration for the guard in front of the upstream."""
        return self._build_guard_config(self.public_origin)

    def assertion_key(self, env: Mapping[str, str]) -> Ed25519PrivateKey | bytes | None:
        """The key identity assertions are signed with, if configured; never quoted in any error."""
        if self.assertion_secret_env is not None:
            secret = env.get(self.assertion_secret_env, "")
            problem = secret_problem("assertion_secret_env", secret, MIN_SECRET_BYTES)
            if problem is not None:
                raise SettingsError([problem])
            return secret.encode()
        if self.assertion_key_file is None:
            return None
        try:
            with open(self.assertion_key_file, "rb") as file:
                key = serialization.load_pem_private_key(file.read(), password=None)
        except (OSError, ValueError, TypeError) as error:
            problem = f"assertion_key_file: cannot load an unencrypted PEM key ({type(error).__name__})"
            raise SettingsError([problem]) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SettingsError(["assertion_key_file: must be an Ed25519 private key"])
        return key

    def oauth_settings(self, env: Mapping[str, str]) -> OAuthSettings:
        """The built-in authorization server's settings, with client secrets read now from ``env`` (and hashed)."""
        try:
            return build_oauth_settings(self, client_secret_hashes(self.oauth_clients, env))
        except ConfigError as error:
            raise SettingsError(list(error.problems)) from None

    def oauth_signing_key(self, env: Mapping[str, str]) -> SigningKeys | SharedSecret:
        """What access tokens are signed with: the HS256 secret in ``env``, else the Ed25519 keys directory."""
        try:
            return signing_key(self, env)
        except ConfigError as error:
            raise SettingsError(list(error.problems)) from None

    def upstream_credentials(self, env: Mapping[str, str]) -> dict[str, str]:
        """Headers carrying the upstream bearer token, read now from ``env`` or the file; ``{}`` if none."""
        if self.upstream_bearer_env is not None:
            source = "upstream_bearer_env: the variable it names"
            token = env.get(self.upstream_bearer_env, "").strip()
            problem = secret_problem("upstream_bearer_env", token)
            if problem is not None:
                raise SettingsError([problem])
        elif self.upstream_bearer_file is not None:
            source = f"upstream_bearer_file: {self.upstream_bearer_file}"
            try:
                with open(self.upstream_bearer_file, encoding="utf-8") as file:
                    token = file.read().strip()
            except (OSError, UnicodeDecodeError) as error:
                # Only the reason: a decode error's text would quote the file's bytes.
                reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
                raise SettingsError([f"{source}: cannot read ({reason})"]) from None
            if not token:
                raise SettingsError([f"{source} is empty"])
        else:
            return {}
        if not _BEARER.fullmatch(token):
            raise SettingsError([f"{source} holds a token with spaces or control characters"])
        return {"Authorization": f"Bearer {token}"}

    def _origin(self) -> str | None:
        if self.public_url is not None:
            return self.public_url.rstrip("/")
        try:
            host, port = _split_listen(self.listen)
        except ValueError:
            return None
        if host in _ALL_ADDRESSES or port == 0:
            return None
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def _build_guard_config(self, public_url: str) -> GuardConfig:
        try:
            return GuardConfig(
                public_url=public_url,
                mcp_path=self.mcp_path,
                tenant_path=self.tenant_path,
                max_body_bytes=self.max_body_bytes,
                api_key_header=self.api_key_header,
                tool_scopes=dict(self.tool_scopes),
                allowed_hosts=self.allowed_hosts,
                allowed_origins=self.allowed_origins,
                tenant_argument=self.tenant_argument,
                operator_credentials=self.operator_credentials,
            )
        except ConfigError as error:
            raise SettingsError(list(error.problems)) from error

    def _issues(self) -> list[_Issue]:
        issues: list[_Issue] = []

        def check(name: str, ok: bool, message: str) -> None:
            if not ok:
                issues.append(_Issue((name,), message))

        def check_seconds(name: str, value: float, *, zero: bool = False) -> None:
            # Chained comparisons, so that nan, failing every one of them, is refused as well.
            within = (0 <= value <= _MAX_SECONDS) if zero else (0 < value <= _MAX_SECONDS)
            lowest = "at least 0" if zero else "more than 0"
            check(name, within, f"must be {lowest} and at most {_MAX_SECONDS:.0f} seconds (a day)")

        if (self.upstream is None) == (self.upstream_cmd is None):
            both = self.upstream is not None
            issues.append(
                _Issue(
                    ("upstream", "upstream_cmd") if both else ("upstream",),
                    "set exactly one of upstream (an http(s) URL) and upstream_cmd (a stdio command)"
                    + (", not both" if both else ""),
                    depends=("upstream_cmd",),
                )
            )
        if self.upstream is not None:
            # The URL is never quoted back: it could hold credentials.
            check("upstream", _is_upstream_url(self.upstream), "must be an http(s) URL without credentials or query")
        if self.upstream_cmd is not None:
            try:
                check("upstream_cmd", bool(shlex.split(self.upstream_cmd)), "is an empty command")
            except ValueError as error:
                issues.append(_Issue(("upstream_cmd",), f"cannot be split into arguments ({error})"))
        try:
            _split_listen(self.listen)
        except ValueError as error:
            issues.append(_Issue(("listen",), str(error)))
        else:
            if self._origin() is None:
                issues.append(
                    _Issue(
                        ("listen",),
                        "binds all addresses or a random port, so public_url must be set to the URL clients use",
                        depends=("public_url",),
                    )
                )
        check("state", bool(self.state.strip()), "must not be empty")
        for name, value in self.upstream_headers.items():
            lowered = name.lower()
            if not _TOKEN.fullmatch(name):
                issues.append(_Issue(("upstream_headers",), f"{name!r} is not a valid header name"))
            elif lowered in _REFUSED_HEADERS or lowered.startswith("x-mcpguard-"):
                issues.append(_Issue(("upstream_headers",), f"{name!r} is set by the proxy and cannot be configured"))
            # The value is never quoted back: it is often a credential.
            check("upstream_headers", _is_header_value(value), f"the value of {name!r} has control characters")
        signing = [n for n in ("assertion_secret_env", "assertion_key_file") if getattr(self, n) is not None]
        if len(signing) > 1:
            issues.append(_Issue(tuple(signing), "set at most one of assertion_secret_env and assertion_key_file"))
        if self.assertion_secret_env is not None:
            check("assertion_secret_env", bool(_ENV_NAME.fullmatch(self.assertion_secret_env)), "not a variable name")
        check("assertion_lifetime", 1 <= self.assertion_lifetime <= 300, "must be between 1 and 300 seconds")
        check(
            "audit_retention_days",
            0 < self.audit_retention_days <= MAX_DAYS,
            DAYS_RULE,
        )
        if self.audit is not None:
            # The URL is never quoted back: a PostgreSQL one may hold a password.
            check("audit", _is_audit_url(self.audit), "must be sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE")
        if self.otlp_endpoint is not None:
            # The URL is never quoted back: a collector's URL may carry a credential.
            message = "must be an http(s) URL of an OTLP/HTTP collector, without credentials or query"
            check("otlp_endpoint", _is_upstream_url(self.otlp_endpoint), message)
        if self.audit_otel_logs and self.otlp_endpoint is None:
            message = "needs otlp_endpoint, the OTLP collector the audit logs are sent to"
            issues.append(_Issue(("audit_otel_logs",), message, depends=("otlp_endpoint",)))
        bearer = [n for n in ("upstream_bearer_env", "upstream_bearer_file") if getattr(self, n) is not None]
        if len(bearer) == 2:
            issues.append(_Issue(tuple(bearer), "set at most one of upstream_bearer_env and upstream_bearer_file"))
        if bearer and any(name.lower() == "authorization" for name in self.upstream_headers):
            issues.append(_Issue(("upstream_headers", bearer[0]), "both set the upstream Authorization header"))
        if self.upstream_cmd is not None:
            for name in ("upstream_headers", *bearer):
                check(name, not getattr(self, name), "applies to an HTTP upstream, but upstream_cmd is set")
            # A stdio server is sent no headers, so an assertion would be signed for nobody and silently dropped.
            for name in signing:
                issues.append(_Issue((name,), "identity assertions need an HTTP upstream, but upstream_cmd is set"))
        else:
            for stdio in (f for f in fields(self) if f.name.startswith("stdio_")):
                default = stdio.default_factory() if stdio.default_factory is not MISSING else stdio.default
                if getattr(self, stdio.name) != default:
                    message = "applies to a stdio upstream, but upstream_cmd is not set"
                    issues.append(_Issue((stdio.name,), message, depends=("upstream_cmd",)))
        check("stdio_max_sessions", self.stdio_max_sessions >= 1, "must be at least 1")
        check_seconds("stdio_idle_timeout", self.stdio_idle_timeout)
        for name, value in self.stdio_env.items():
            check("stdio_env", bool(_ENV_NAME.fullmatch(name)), f"{name!r} is not a variable name")
            # The value is never quoted back: it is often a credential.
            check("stdio_env", "\0" not in value, f"the value of {name!r} has a NUL character")
        if self.stdio_cwd is not None:
            check("stdio_cwd", bool(self.stdio_cwd.strip()), "must not be blank")
        if self.stdio_temp_root is not None:
            check("stdio_temp_root", os.path.isabs(self.stdio_temp_root), "must be an absolute path")
        if self.upstream_bearer_env is not None:
            check("upstream_bearer_env", bool(_ENV_NAME.fullmatch(self.upstream_bearer_env)), "not a variable name")
        if self.upstream_bearer_file is not None:
            check("upstream_bearer_file", bool(self.upstream_bearer_file.strip()), "must not be empty")
        clients = " or ".join(UPSTREAM_CLIENTS)
        check("upstream_client", self.upstream_client in UPSTREAM_CLIENTS, f"must be {clients}")
        check_seconds("upstream_timeout", self.upstream_timeout)
        check_seconds("connect_timeout", self.connect_timeout)
        # 0 is meaningful for these two: annotations fetched for every call, a stop without draining.
        check_seconds("annotations_ttl", self.annotations_ttl, zero=True)
        check_seconds("drain_seconds", self.drain_seconds, zero=True)
        check("max_response_bytes", self.max_response_bytes >= 1, "must be at least 1")
        check("rate_limit_per_min", self.rate_limit_per_min >= 1, "must be at least 1")
        for tool, limit in self.tool_response_limits.items():
            check("tool_response_limits", limit >= 1, f"[{tool!r}] must be at least 1")
        for tool, scope in self.tool_scopes.items():
            check("tool_scopes", scope in _SCOPES, f"[{tool!r}] must be one of {', '.join(sorted(_SCOPES))}")
        for host in self.allowed_hosts:
            check("allowed_hosts", bool(_HOST.fullmatch(host)), f"{host!r} is not '*', host or host:port")
        for origin in self.allowed_origins:
            check("allowed_origins", bool(_ORIGIN.fullmatch(origin)), f"{origin!r} is not '*' or an http(s) origin")
        if self.tenant_argument is not None:
            check("tenant_argument", bool(self.tenant_argument.strip()), "must not be blank")
        issues += [_Issue(names, message, depends) for names, message, depends in oauth_problems(self)]
        return issues


def _split_listen(listen: str) -> tuple[str, int]:
    match = _LISTEN.fullmatch(listen)
    if match is None:
        raise ValueError(f"expected host:port or [ipv6]:port, got {listen!r}")
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return match["ipv6"] or match["host"], port


def _is_upstream_url(url: str) -> bool:
    # Checked before urlsplit, which silently drops tabs and newlines.
    if any(c.isspace() or not c.isprintable() for c in url):
        return False
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  # read only to see whether it raises on a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
        and "?" not in url
    )


def _is_audit_url(url: str) -> bool:
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        return rest.startswith("/") and len(rest) > 1
    return scheme in _AUDIT_SCHEMES and bool(rest) and not any(c.isspace() or not c.isprintable() for c in rest)


def _is_header_value(value: str) -> bool:
    return not any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value)


# Conversion of one raw value to its field's type: ``text`` is True for environment variables and
# string flags, which need parsing; TOML and typed flags must already have the right type.
_Convert = Callable[[object, bool], object]


class _Invalid(Exception):
    pass


# How an environment variable or a string flag spells a switch.
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _optional_text(raw: object, text: bool) -> object:
    if not isinstance(raw, str):
        raise _Invalid("expected a string")
    return raw or None  # empty means unset, so a TOML file or an env var can switch a default off


def _text(raw: object, text: bool) -> object:
    if not isinstance(raw, str) or not raw:
        raise _Invalid("expected a non-empty string")
    return raw


def _number(raw: object, text: bool) -> object:
    if text and isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise _Invalid("not a number") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise _Invalid("expected a finite number")
    return float(raw)


def _boolean(raw: object, text: bool) -> object:
    if text and isinstance(raw, str):
        lowered = raw.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise _Invalid("expected true or false")
        return lowered in _TRUE
    if not isinstance(raw, bool):
        raise _Invalid("expected true or false")
    return raw


def _integer(raw: object, text: bool) -> object:
    if text and isinstance(raw, str):
        try:
            raw = int(raw)
        except ValueError:
            raise _Invalid("not an integer") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _Invalid("expected an integer")
    return raw


def _names(raw: object, text: bool) -> object:
    if text and isinstance(raw, str):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if not isinstance(raw, list | tuple) or not all(isinstance(item, str) for item in raw):
        raise _Invalid("expected a list of strings")
    return tuple(raw)


def _clients(raw: object, text: bool) -> object:
    try:
        return parse_oauth_clients(raw, text)
    except ValueError as error:
        raise _Invalid(str(error)) from None


def _table(values: _Convert) -> _Convert:
    def convert(raw: object, text: bool) -> object:
        if text and isinstance(raw, str):
            try:
                raw = read_json(raw)
            except ValueError:
                raise _Invalid("not a JSON object") from None
        if not isinstance(raw, Mapping):
            raise _Invalid("expected a table" if not text else "expected a JSON object")
        converted: dict[str, object] = {}
        for key, value in raw.items():
            try:
                converted[str(key)] = values(value, False)
            except _Invalid as error:
                # Never the value itself: upstream_headers values are often credentials.
                raise _Invalid(f"[{key!r}]: {error}") from None
        return converted

    return convert


_BY_TYPE: dict[str, _Convert] = {
    "str": _text,
    "str | None": _optional_text,
    "float": _number,
    "bool": _boolean,
    "int": _integer,
    "tuple[str, ...]": _names,
    "Mapping[str, str]": _table(_text),
    "Mapping[str, int]": _table(_integer),
    "tuple[OAuthClient, ...]": _clients,
}
# Annotations are strings here (postponed evaluation), so each field's converter follows from its declared type.
_CONVERTERS: dict[str, _Convert] = {f.name: _BY_TYPE[str(f.type)] for f in fields(SidecarSettings)}


def _read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        problems.append(f"{path}: cannot read ({error.strerror})")
    except tomllib.TOMLDecodeError as error:
        problems.append(f"{path}: not valid TOML ({error})")
    except RecursionError:
        problems.append(f"{path}: not valid TOML (nested deeper than it can be read)")
    return {}


def load_settings(
    *, config_file: str | None, env: Mapping[str, str], overrides: Mapping[str, object]
) -> SidecarSettings:
    """Merge flags (``overrides``, by field name) over ``env`` over ``config_file`` over defaults, and check them."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    broken: set[str] = set()

    def take(name: str, raw: object, label: str, text: bool) -> None:
        try:
            values[name] = _CONVERTERS[name](raw, text)
        except _Invalid as error:
            problems.append(f"{label}: {error}")
            broken.add(name)
        else:
            sources[name] = label
            broken.discard(name)

    if config_file is not None:
        for key, raw in _read_toml(config_file, problems).items():
            if key in _CONVERTERS:
                take(key, raw, f"{config_file}: {key}", False)
            else:
                problems.append(f"{config_file}: unknown key {key!r}")
    for name in _CONVERTERS:
        variable = _ENV_PREFIX + name.upper()
        if name == "rate_limit_per_min" and variable not in env and _RATE_LIMIT_ALIAS in env:
            variable = _RATE_LIMIT_ALIAS
        if variable in env:
            take(name, env[variable], variable, True)
    for name, raw in overrides.items():
        flag = "--" + name.replace("_", "-")
        if name not in _CONVERTERS:
            problems.append(f"{flag}: unknown setting")
        elif raw is not None:  # an option that was not given
            take(name, raw, flag, isinstance(raw, str))
    # The conventional variable is the HS256 secret only when nothing else says how tokens are signed.
    unset = {"jwt_secret_env", "oauth_keys_dir"}.isdisjoint(values.keys() | broken)
    if values.get("oauth") is True and unset and env.get(DEFAULT_JWT_SECRET_ENV):
        values["jwt_secret_env"] = DEFAULT_JWT_SECRET_ENV
        sources["jwt_secret_env"] = DEFAULT_JWT_SECRET_ENV

    try:
        settings = SidecarSettings(**values)
    except _InvalidSettings as error:
        for issue in error.issues:
            if broken.isdisjoint(issue.fields + issue.depends):
                problems.append(_describe(issue, lambda name: sources.get(name, name)))
    else:
        if not problems:
            return settings
    raise SettingsError(problems)
