"""Sidecar settings: flags over environment over TOML over defaults, every problem reported with its source."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcpguard import GuardConfig
from sidecar.proxy import UpstreamProxy
from sidecar.serve import sidecar_from_settings
from sidecar.settings import SettingsError, SidecarSettings, load_settings
from sidecar.stdio_upstream import StdioUpstream
from tests.audit.test_audit_store_conformance import pg_url, postgres_schema
from tests.conftest import free_port, make_keys, serve
from tests.test_guard import RecordingApp

UPSTREAM = "http://127.0.0.1:9000/mcp"
TOKEN = "canary-7f3a9c1e-upstream-token"


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mcpguard.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(*, config_file: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> SidecarSettings:
    return load_settings(config_file=config_file, env=env or {}, overrides=overrides)


def problems_of(**kwargs: Any) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load(**kwargs)
    return info.value.problems


def ping(url: str, key: str) -> httpx.Response:
    """A JSON-RPC ping to the sidecar's MCP endpoint at ``url``, authenticated with ``key``."""
    return httpx.post(
        url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"Authorization": f"Bearer {key}"}
    )


class TestPrecedence:
    def test_defaults_need_only_an_upstream(self) -> None:
        """With just an upstream every other setting takes its documented default."""
        settings = load(upstream=UPSTREAM)
        assert settings == SidecarSettings(upstream=UPSTREAM)
        assert (settings.listen, settings.state, settings.mcp_path, settings.tenant_path) == (
            "127.0.0.1:8080",
            "./mcpguard.db",
            "/mcp",
            "/{tenant}/mcp",
        )
        assert (settings.upstream_timeout, settings.max_body_bytes, settings.rate_limit_per_min) == (
            300.0,
            4 * 1024 * 1024,
            100,
        )

    def test_flags_beat_env_beat_toml_beat_defaults(self, tmp_path: Path) -> None:
        """Each layer overrides only the settings it names, in the order flag > env > TOML > default."""
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\nupstream_timeout = 11\nconnect_timeout = 12\ndrain_seconds = 13\n',
        )
        env = {"MCPGUARD_UPSTREAM_TIMEOUT": "21", "MCPGUARD_CONNECT_TIMEOUT": "22"}
        settings = load(config_file=config, env=env, upstream_timeout="31")
        assert (settings.upstream_timeout, settings.connect_timeout, settings.drain_seconds) == (31.0, 22.0, 13.0)
        assert settings.annotations_ttl == 300.0

    def test_flags_without_a_value_are_ignored(self) -> None:
        """A flag left as None (not given on the command line) does not hide the environment."""
        settings = load(env={"MCPGUARD_UPSTREAM": UPSTREAM}, upstream=None, listen=None)
        assert (settings.upstream, settings.listen) == (UPSTREAM, "127.0.0.1:8080")

    def test_typed_flags_and_env_text_give_the_same_types(self) -> None:
        """Flags may arrive typed or as text; lists and tables come from commas and JSON in the environment."""
        env = {
            "MCPGUARD_ALLOWED_HOSTS": "mcp.example.test, localhost:8080",
            "MCPGUARD_TOOL_SCOPES": '{"drop_db": "mcp:admin"}',
            "MCPGUARD_TOOL_RESPONSE_LIMITS": '{"export": 1048576}',
        }
        settings = load(env=env, upstream=UPSTREAM, max_body_bytes=2048, allowed_origins=["https://a.example.test"])
        assert settings.allowed_hosts == ("mcp.example.test", "localhost:8080")
        assert settings.allowed_origins == ("https://a.example.test",)
        assert settings.tool_scopes == {"drop_db": "mcp:admin"}
        assert settings.tool_response_limits == {"export": 1048576}
        assert settings.max_body_bytes == 2048

    def test_tenant_path_can_be_disabled_from_toml_or_env(self, tmp_path: Path) -> None:
        """An empty tenant_path switches per-tenant routes off, in the file or the environment."""
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\ntenant_path = ""\n')
        assert load(config_file=config).tenant_path is None
        assert load(env={"MCPGUARD_TENANT_PATH": ""}, upstream=UPSTREAM).tenant_path is None

    def test_toml_tables_load(self, tmp_path: Path) -> None:
        """Header, scope and limit tables and host lists are read from TOML as written."""
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\nallowed_hosts = ["mcp.example.test"]\n'
            '[upstream_headers]\nX-Api-Version = "2"\n[tool_scopes]\n"files.read" = "mcp:read"\n'
            "[tool_response_limits]\nexport = 4096\n",
        )
        settings = load(config_file=config)
        assert settings.upstream_headers == {"X-Api-Version": "2"}
        assert settings.tool_scopes == {"files.read": "mcp:read"}
        assert settings.tool_response_limits == {"export": 4096}
        assert settings.allowed_hosts == ("mcp.example.test",)

    def test_rate_limit_alias(self) -> None:
        """MCP_RATE_LIMIT_PER_MIN is accepted, and MCPGUARD_RATE_LIMIT_PER_MIN wins when both are set."""
        assert load(env={"MCP_RATE_LIMIT_PER_MIN": "40"}, upstream=UPSTREAM).rate_limit_per_min == 40
        both = {"MCP_RATE_LIMIT_PER_MIN": "40", "MCPGUARD_RATE_LIMIT_PER_MIN": "60"}
        assert load(env=both, upstream=UPSTREAM).rate_limit_per_min == 60
        assert problems_of(env={"MCP_RATE_LIMIT_PER_MIN": "lots"}, upstream=UPSTREAM) == [
            "MCP_RATE_LIMIT_PER_MIN: not an integer"
        ]

    def test_settings_are_frozen(self) -> None:
        """Loaded settings cannot be changed afterwards, so validation cannot be sidestepped."""
        settings = load(upstream=UPSTREAM)
        with pytest.raises(dataclasses.FrozenInstanceError):
            settings.upstream = "http://elsewhere.test/mcp"  # type: ignore[misc]  # assigning must fail


class TestProblems:
    def test_every_problem_is_reported_at_once_with_its_source(self, tmp_path: Path) -> None:
        """Four mistakes in the file and two in the environment give six problems, each naming its origin."""
        config = write_toml(
            tmp_path,
            'upstream = "ftp://127.0.0.1/mcp"\nupstrem = "x"\nlisten = "127.0.0.1:99999"\n'
            '[upstream_headers]\nHost = "internal"\n',
        )
        env = {"MCPGUARD_UPSTREAM_TIMEOUT": "soon", "MCPGUARD_TOOL_SCOPES": '{"drop_db": "mcp:root"}'}
        problems = problems_of(config_file=config, env=env)
        assert len(problems) == 6, problems
        expected = [
            f"{config}: unknown key 'upstrem'",
            "MCPGUARD_UPSTREAM_TIMEOUT: not a number",
            f"{config}: upstream: ",
            f"{config}: listen: ",
            f"{config}: upstream_headers: 'Host'",
            "MCPGUARD_TOOL_SCOPES: ['drop_db']",
        ]
        for start in expected:
            assert sum(problem.startswith(start) for problem in problems) == 1, (start, problems)

    def test_error_message_lists_every_problem(self) -> None:
        """str(SettingsError) carries every problem, so the CLI can print it as is."""
        with pytest.raises(SettingsError) as info:
            load(env={"MCPGUARD_CONNECT_TIMEOUT": "-1", "MCPGUARD_MAX_BODY_BYTES": "12"}, upstream=UPSTREAM)
        assert isinstance(info.value, ValueError)
        assert "MCPGUARD_CONNECT_TIMEOUT: must be more than 0" in str(info.value)
        assert "MCPGUARD_MAX_BODY_BYTES: must be at least 1024" in str(info.value)

    def test_unknown_toml_key(self, tmp_path: Path) -> None:
        """A misspelt key is refused rather than silently ignored."""
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\nrate_limit = 5\n')
        assert problems_of(config_file=config) == [f"{config}: unknown key 'rate_limit'"]

    def test_unreadable_and_malformed_toml(self, tmp_path: Path) -> None:
        """A missing or malformed file is a problem naming the file, reported with the others."""
        missing = str(tmp_path / "absent.toml")
        assert problems_of(config_file=missing, upstream=UPSTREAM)[0].startswith(f"{missing}: cannot read")
        broken = write_toml(tmp_path, "upstream = \n")
        problems = problems_of(config_file=broken, env={"MCPGUARD_LISTEN": "nowhere"}, upstream=UPSTREAM)
        assert [p.split(":")[0] for p in problems] == [broken, "MCPGUARD_LISTEN"]

    def test_toml_nested_too_deep_to_read_is_a_problem(self, tmp_path: Path) -> None:
        """A file nested past what the TOML parser can go is reported like any malformed file, with the others."""
        deep = write_toml(tmp_path, "allowed_hosts = " + "[" * 5000 + "]" * 5000 + "\n")
        problems = problems_of(config_file=deep, env={"MCPGUARD_LISTEN": "nowhere"}, upstream=UPSTREAM)
        assert [p.split(":")[0] for p in problems] == [deep, "MCPGUARD_LISTEN"]
        assert "not valid TOML" in problems[0]

    def test_wrong_types_in_toml(self, tmp_path: Path) -> None:
        """TOML values must already have the field's type: no strings for numbers, no booleans, no floats for ints."""
        config = write_toml(
            tmp_path,
            f'upstream = "{UPSTREAM}"\nupstream_timeout = "30"\nmax_body_bytes = 4096.0\n'
            'rate_limit_per_min = true\nallowed_hosts = "a.test"\nupstream_headers = ["X-A"]\n',
        )
        problems = problems_of(config_file=config)
        assert problems == [
            f"{config}: upstream_timeout: expected a finite number",
            f"{config}: max_body_bytes: expected an integer",
            f"{config}: rate_limit_per_min: expected an integer",
            f"{config}: allowed_hosts: expected a list of strings",
            f"{config}: upstream_headers: expected a table",
        ]

    @pytest.mark.parametrize(
        ("variable", "value", "message"),
        [
            ("MCPGUARD_UPSTREAM_TIMEOUT", "0", "must be more than 0"),
            ("MCPGUARD_UPSTREAM_TIMEOUT", "nan", "expected a finite number"),
            ("MCPGUARD_MAX_RESPONSE_BYTES", "1.5", "not an integer"),
            ("MCPGUARD_RATE_LIMIT_PER_MIN", "0", "must be at least 1"),
            ("MCPGUARD_DRAIN_SECONDS", "-1", "must be at least 0"),
            ("MCPGUARD_TOOL_RESPONSE_LIMITS", "[1]", "expected a JSON object"),
            ("MCPGUARD_TOOL_RESPONSE_LIMITS", '{"export": "big"}', "['export']: expected an integer"),
            ("MCPGUARD_UPSTREAM_HEADERS", "{nope", "not a JSON object"),
            ("MCPGUARD_UPSTREAM_HEADERS", "[" * 5000 + "]" * 5000, "not a JSON object"),
            ("MCPGUARD_OAUTH_CLIENTS", "[" * 5000 + "]" * 5000, "not a JSON array of objects"),
            ("MCPGUARD_ALLOWED_ORIGINS", "mcp.example.test", "is not '*' or an http(s) origin"),
            ("MCPGUARD_MCP_PATH", "mcp/", "must be '/'-separated segments"),
            ("MCPGUARD_PUBLIC_URL", "https://mcp.example.test/base", "must be an origin only"),
            ("MCPGUARD_API_KEY_HEADER", "Authorization", "must be a plain header name"),
            ("MCPGUARD_STATE", "", "expected a non-empty string"),
        ],
    )
    def test_bad_env_values(self, variable: str, value: str, message: str) -> None:
        """Each bad environment value gives one problem that starts with the variable's name."""
        problems = problems_of(env={variable: value}, upstream=UPSTREAM)
        assert len(problems) == 1, problems
        assert problems[0].startswith(f"{variable}: ")
        assert message in problems[0]

    def test_unknown_override_is_a_problem(self) -> None:
        """A flag that names no setting is reported like any other mistake."""
        assert problems_of(upstream=UPSTREAM, upstream_timout=5) == ["--upstream-timout: unknown setting"]


class TestUpstream:
    def test_an_upstream_is_required(self) -> None:
        """Without an upstream there is nothing to protect."""
        problems = problems_of()
        assert len(problems) == 1
        assert problems[0].startswith("upstream: set exactly one of upstream")

    def test_both_upstreams_conflict_naming_both_sources(self, tmp_path: Path) -> None:
        """A URL and a command together are ambiguous; the problem names where each came from."""
        config = write_toml(tmp_path, 'upstream_cmd = "npx -y some-mcp-server"\n')
        problems = problems_of(config_file=config, upstream=UPSTREAM)
        assert problems == [
            f"--upstream and {config}: upstream_cmd: set exactly one of upstream (an http(s) URL) "
            "and upstream_cmd (a stdio command), not both"
        ]

    def test_stdio_upstream(self) -> None:
        """A command line is split as a shell would; an unbalanced quote is a problem."""
        settings = load(upstream_cmd="npx -y 'my server' --flag")
        assert settings.upstream_argv == ("npx", "-y", "my server", "--flag")
        assert load(upstream=UPSTREAM).upstream_argv == ()
        assert problems_of(upstream_cmd="npx 'open")[0].startswith("--upstream-cmd: cannot be split")

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://127.0.0.1/mcp",
            "127.0.0.1:9000/mcp",
            "http://user:pw@127.0.0.1:9000/mcp",
            "http://127.0.0.1:9000/mcp?token=abc",
            "http://127.0.0.1:99999/mcp",
            "http://127.0.0.1:9000/m\ncp",
            "http:///mcp",
        ],
    )
    def test_bad_upstream_urls_are_reported_without_being_quoted(self, url: str) -> None:
        """Only plain http(s) URLs are accepted, and the URL is never echoed (it may hold credentials)."""
        problems = problems_of(upstream=url)
        assert problems == ["--upstream: must be an http(s) URL without credentials or query"]

    def test_headers_and_bearer_need_an_http_upstream(self) -> None:
        """Upstream credentials configured for a stdio upstream would be silently unused, so they are refused."""
        problems = problems_of(upstream_cmd="server", upstream_headers={"X-A": "1"}, upstream_bearer_env="TOKEN")
        assert problems == [
            "--upstream-headers: applies to an HTTP upstream, but upstream_cmd is set",
            "--upstream-bearer-env: applies to an HTTP upstream, but upstream_cmd is set",
        ]


class TestUpstreamClient:
    def test_the_client_is_chosen_from_every_layer_and_reaches_the_proxy(self) -> None:
        """The sidecar's own connection pool by default; ``aiohttp`` from env or a flag picks aiohttp's."""
        assert load(upstream="http://127.0.0.1:9/mcp").upstream_client == "pool"
        settings = load(
            upstream="http://127.0.0.1:9/mcp", env={"MCPGUARD_UPSTREAM_CLIENT": "aiohttp"}, state="memory://"
        )
        proxy = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"}).proxy
        assert isinstance(proxy, UpstreamProxy)
        assert proxy.settings.client == "aiohttp"
        default = sidecar_from_settings(load(upstream="http://127.0.0.1:9/mcp", state="memory://"), {}).proxy
        assert isinstance(default, UpstreamProxy)
        assert default.settings.client == "pool"

    def test_an_unknown_client_is_a_problem(self) -> None:
        """Only the two clients exist; anything else is reported with the other problems."""
        assert problems_of(upstream="http://127.0.0.1:9/mcp", upstream_client="httpx") == [
            "--upstream-client: must be aiohttp or pool"
        ]


class TestStdioSettings:
    def test_stdio_settings_load_from_every_layer(self, tmp_path: Path) -> None:
        """Session cap, idle timeout, environment and working directory load from TOML, env and flags."""
        defaults = load(upstream_cmd="server")
        assert (defaults.stdio_max_sessions, defaults.stdio_idle_timeout) == (64, 1800.0)
        assert (defaults.stdio_env, defaults.stdio_cwd) == ({}, None)
        config = write_toml(tmp_path, 'upstream_cmd = "server"\nstdio_cwd = "/srv/mcp"\n[stdio_env]\nMODE = "ro"\n')
        env = {"MCPGUARD_STDIO_IDLE_TIMEOUT": "90", "MCPGUARD_STDIO_ENV": '{"MODE": "rw", "DEBUG": "1"}'}
        settings = load(config_file=config, env=env, stdio_max_sessions="8")
        assert (settings.stdio_max_sessions, settings.stdio_idle_timeout) == (8, 90.0)
        assert settings.stdio_env == {"MODE": "rw", "DEBUG": "1"}
        assert settings.stdio_cwd == "/srv/mcp"

    def test_stdio_settings_reach_the_process_settings(self) -> None:
        """The sidecar built from the settings runs its stdio server with exactly these limits and surroundings."""
        settings = load(
            upstream_cmd="server --flag",
            state="memory://",
            stdio_max_sessions=3,
            stdio_idle_timeout=45,
            stdio_env={"MODE": "ro"},
            stdio_cwd="/srv/mcp",
            stdio_temp_root="/srv/mcp-scratch",
        )
        upstream = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"}).proxy
        assert isinstance(upstream, StdioUpstream)
        stdio = upstream.settings
        assert (stdio.argv, stdio.max_sessions, stdio.idle_timeout) == (("server", "--flag"), 3, 45.0)
        assert (dict(stdio.env), stdio.cwd, stdio.temp_root) == ({"MODE": "ro"}, "/srv/mcp", "/srv/mcp-scratch")

    def test_relative_or_blank_temp_root_is_a_problem(self) -> None:
        """The private temporary directories are made under an absolute path only, never one relative to the cwd."""
        for root in ("tmp", "  ", "../var"):
            assert problems_of(upstream_cmd="server", stdio_temp_root=root) == [
                "--stdio-temp-root: must be an absolute path"
            ]

    def test_stdio_env_values_are_never_shown(self) -> None:
        """Environment values for the stdio server stay out of the repr and of problems; only names appear."""
        settings = load(upstream_cmd="server", stdio_env={"API_KEY": TOKEN})
        assert TOKEN not in repr(settings)
        assert "API_KEY" in repr(settings)
        problems = problems_of(upstream_cmd="server", env={"MCPGUARD_STDIO_ENV": f'{{"API_KEY": "{TOKEN}\\u0000"}}'})
        assert problems == ["MCPGUARD_STDIO_ENV: the value of 'API_KEY' has a NUL character"]

    def test_bad_stdio_values_are_reported_together(self) -> None:
        """A cap below 1, a non-positive idle timeout, a bad variable name and a blank directory: four problems."""
        problems = problems_of(
            upstream_cmd="server",
            stdio_max_sessions=0,
            env={"MCPGUARD_STDIO_IDLE_TIMEOUT": "0", "MCPGUARD_STDIO_ENV": '{"NOT-A-NAME": "1"}'},
            stdio_cwd="  ",
        )
        assert problems == [
            "--stdio-max-sessions: must be at least 1",
            "MCPGUARD_STDIO_IDLE_TIMEOUT: must be more than 0 and at most 86400 seconds (a day)",
            "MCPGUARD_STDIO_ENV: 'NOT-A-NAME' is not a variable name",
            "--stdio-cwd: must not be blank",
        ]

    def test_stdio_settings_need_a_stdio_upstream(self) -> None:
        """Every stdio_* setting given for an HTTP upstream would be silently unused, so each is a problem."""
        problems = problems_of(
            upstream=UPSTREAM,
            env={"MCPGUARD_STDIO_MAX_SESSIONS": "8", "MCPGUARD_STDIO_ENV": '{"MODE": "ro"}'},
            stdio_idle_timeout=60,
            stdio_cwd="/srv/mcp",
        )
        assert problems == [
            f"{source}: applies to a stdio upstream, but upstream_cmd is not set"
            for source in ("MCPGUARD_STDIO_MAX_SESSIONS", "--stdio-idle-timeout", "MCPGUARD_STDIO_ENV", "--stdio-cwd")
        ]

    def test_stdio_conflict_is_moot_when_the_command_is_broken(self, tmp_path: Path) -> None:
        """A stdio setting beside an unreadable upstream_cmd is reported only through the command itself."""
        config = write_toml(tmp_path, "upstream_cmd = 5\nstdio_max_sessions = 8\n")
        assert problems_of(config_file=config) == [f"{config}: upstream_cmd: expected a string"]

    def test_assertions_need_an_http_upstream(self) -> None:
        """A stdio server receives no headers, so signing settings beside upstream_cmd are problems, with the others."""
        problems = problems_of(upstream_cmd="server", assertion_secret_env="SIGNING", stdio_idle_timeout=-1)
        assert problems == [
            "--assertion-secret-env: identity assertions need an HTTP upstream, but upstream_cmd is set",
            "--stdio-idle-timeout: must be more than 0 and at most 86400 seconds (a day)",
        ]
        problems = problems_of(env={"MCPGUARD_UPSTREAM_CMD": "server", "MCPGUARD_ASSERTION_KEY_FILE": "/k.pem"})
        assert problems == [
            "MCPGUARD_ASSERTION_KEY_FILE: identity assertions need an HTTP upstream, but upstream_cmd is set"
        ]


class TestListenAndPublicUrl:
    @pytest.mark.parametrize(
        ("listen", "host", "port", "origin"),
        [
            ("127.0.0.1:8080", "127.0.0.1", 8080, "http://127.0.0.1:8080"),
            ("localhost:9", "localhost", 9, "http://localhost:9"),
            ("[::1]:8443", "::1", 8443, "http://[::1]:8443"),
            ("mcp.internal:65535", "mcp.internal", 65535, "http://mcp.internal:65535"),
        ],
    )
    def test_listen_parsing_and_derived_public_url(self, listen: str, host: str, port: int, origin: str) -> None:
        """host:port and [ipv6]:port are parsed; public_url defaults to http:// on the listen address."""
        settings = load(upstream=UPSTREAM, listen=listen)
        assert (settings.listen_host, settings.listen_port, settings.public_origin) == (host, port, origin)
        assert settings.guard_config().public_url == origin

    @pytest.mark.parametrize("listen", ["8080", "127.0.0.1", "::1:8080", "127.0.0.1:65536", "[::1]", "host:port"])
    def test_bad_listen_addresses(self, listen: str) -> None:
        """A listen address without a port, with a bare IPv6 host or an out-of-range port is refused."""
        problems = problems_of(env={"MCPGUARD_LISTEN": listen}, upstream=UPSTREAM)
        assert len(problems) == 1
        assert problems[0].startswith("MCPGUARD_LISTEN: ")

    @pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "127.0.0.1:0"])
    def test_public_url_is_required_when_it_cannot_be_derived(self, listen: str) -> None:
        """All-address or random-port listeners give no URL clients could use, so public_url must be set."""
        problems = problems_of(env={"MCPGUARD_LISTEN": listen}, upstream=UPSTREAM)
        assert len(problems) == 1
        assert problems[0].startswith("MCPGUARD_LISTEN: binds all addresses or a random port, so public_url")
        settings = load(env={"MCPGUARD_LISTEN": listen}, upstream=UPSTREAM, public_url="https://mcp.example.test/")
        assert settings.public_origin == "https://mcp.example.test"

    def test_state_url(self) -> None:
        """A bare state path means an SQLite file; a URL is kept as is."""
        assert load(upstream=UPSTREAM).state_url == "sqlite:///./mcpguard.db"
        assert load(upstream=UPSTREAM, state="memory://").state_url == "memory://"


class TestAudit:
    def test_audit_defaults_to_the_state_file(self) -> None:
        """Without ``audit`` the trail is kept in the SQLite state file, or in memory beside memory state."""
        assert load(upstream=UPSTREAM).audit_url == "sqlite:///./mcpguard.db"
        assert load(upstream=UPSTREAM, state="memory://").audit_url == "sqlite:///:memory:"
        assert load(upstream=UPSTREAM, audit="sqlite:////var/lib/audit.db").audit_url == "sqlite:////var/lib/audit.db"

    def test_postgresql_audit_from_toml_or_env(self, tmp_path: Path) -> None:
        """A PostgreSQL audit URL loads from the file or the environment, under either scheme name."""
        url = "postgresql://mcpguard@db.internal:5432/audit?sslmode=require"
        config = write_toml(tmp_path, f'upstream = "{UPSTREAM}"\naudit = "{url}"\n')
        assert load(config_file=config).audit_url == url
        short = "postgres://mcpguard@db.internal/audit"
        assert load(env={"MCPGUARD_AUDIT": short}, upstream=UPSTREAM).audit_url == short

    @pytest.mark.parametrize(
        "url",
        [
            "mysql://mcpguard:hunter2@db/audit",
            "postgresql://",
            "postgresql://mcpguard:hunter2@db/audit trail",
            "sqlite://relative.db",
            "sqlite:///",
            "/var/lib/audit.db",
        ],
    )
    def test_bad_audit_urls_are_reported_without_being_quoted(self, url: str) -> None:
        """Anything but sqlite:///PATH or a PostgreSQL URL is one problem that never repeats a password."""
        problems = problems_of(env={"MCPGUARD_AUDIT": url}, upstream=UPSTREAM)
        assert problems == ["MCPGUARD_AUDIT: must be sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"]

    def test_sidecar_with_postgresql_audit_builds_without_connecting_and_fails_closed(self) -> None:
        """The sidecar is built synchronously (PostgreSQL connects on first use); with no server a call is 503."""
        port = free_port()
        audit = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/x"
        settings = load(upstream=UPSTREAM, listen=f"127.0.0.1:{port}", state="memory://", audit=audit)
        app = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"})
        key = make_keys(app.store, {"acme": ("acme", ["mcp:read"])})["acme"]
        with serve(app, port) as url:
            response = ping(url, key)
        assert response.status_code == 503
        assert "hunter2" not in response.text

    def test_sidecar_records_its_calls_in_postgresql(self) -> None:
        """Through a sidecar configured with a PostgreSQL audit URL, a forwarded call lands there, start and end."""
        with postgres_schema() as schema, serve(RecordingApp()) as upstream:
            port = free_port()
            listen = f"127.0.0.1:{port}"
            settings = load(upstream=upstream + "/mcp", listen=listen, state="memory://", audit=pg_url(schema=schema))
            app = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"})
            key = make_keys(app.store, {"acme": ("acme", ["mcp:read"])})["acme"]
            with serve(app, port) as url:
                response = ping(url, key)
                assert response.status_code == 200
                deadline = time.monotonic() + 5
                while True:
                    with psycopg.connect(pg_url(schema=schema)) as conn:
                        phases = conn.execute("SELECT phase, tenant FROM audit_events ORDER BY id").fetchall()
                    if len(phases) == 2 or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
        assert phases == [("start", "acme"), ("end", "acme")]


class TestUpstreamHeaders:
    @pytest.mark.parametrize("name", ["Host", "host", "Transfer-Encoding", "Content-Length", "Connection", "TE"])
    def test_framing_headers_belong_to_the_proxy(self, name: str) -> None:
        """Host, message framing and hop-by-hop headers cannot be set by configuration."""
        problems = problems_of(upstream=UPSTREAM, upstream_headers={name: "value"})
        assert problems == [f"--upstream-headers: {name!r} is set by the proxy and cannot be configured"]

    @pytest.mark.threat("T-TENANT-SPOOF")
    @pytest.mark.parametrize("name", ["X-MCPGuard-Tenant", "x-mcpguard-scopes", "X-MCPGUARD-SUBJECT"])
    def test_identity_headers_cannot_be_forged_by_configuration(self, name: str) -> None:
        """A static X-MCPGuard-* header would name a tenant or scopes no credential proved, so it is refused."""
        problems = problems_of(upstream=UPSTREAM, env={"MCPGUARD_UPSTREAM_HEADERS": f'{{"{name}": "acme"}}'})
        assert problems == [f"MCPGUARD_UPSTREAM_HEADERS: {name!r} is set by the proxy and cannot be configured"]

    def test_header_values_are_never_quoted(self) -> None:
        """A bad header value is reported by its header name only, since values are often credentials."""
        problems = problems_of(upstream=UPSTREAM, env={"MCPGUARD_UPSTREAM_HEADERS": f'{{"X-Key": "{TOKEN}\\r\\n"}}'})
        assert problems == ["MCPGUARD_UPSTREAM_HEADERS: the value of 'X-Key' has control characters"]
        settings = load(upstream=UPSTREAM, upstream_headers={"X-Key": TOKEN})
        assert TOKEN not in repr(settings)
        assert "X-Key" in repr(settings)

    def test_bad_header_name(self) -> None:
        """A header name with characters outside RFC 9110's token set is refused."""
        assert problems_of(upstream=UPSTREAM, upstream_headers={"X Key": "1"}) == [
            "--upstream-headers: 'X Key' is not a valid header name"
        ]


class TestUpstreamBearer:
    def test_bearer_from_env(self) -> None:
        """The token is read from the named variable when credentials are asked for, and stripped."""
        settings = load(upstream=UPSTREAM, upstream_bearer_env="UPSTREAM_TOKEN")
        assert settings.upstream_credentials({"UPSTREAM_TOKEN": f"  {TOKEN}\n"}) == {"Authorization": f"Bearer {TOKEN}"}
        assert TOKEN not in repr(settings)

    def test_bearer_from_file(self, tmp_path: Path) -> None:
        """The token is read from the file, trailing newline removed."""
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n", encoding="utf-8")
        settings = load(upstream=UPSTREAM, upstream_bearer_file=str(token_file))
        assert settings.upstream_credentials({}) == {"Authorization": f"Bearer {TOKEN}"}
        assert TOKEN not in repr(settings)

    def test_no_bearer_means_no_credentials(self) -> None:
        """Without a configured token no Authorization header is added."""
        assert load(upstream=UPSTREAM).upstream_credentials({"UPSTREAM_TOKEN": TOKEN}) == {}

    def test_missing_env_var_and_unreadable_file(self, tmp_path: Path) -> None:
        """A token that cannot be found is a SettingsError naming the setting that says where it was looked for.

        The variable's name is not quoted: a token pasted in its place may look like one.
        """
        from_env = load(upstream=UPSTREAM, upstream_bearer_env="UPSTREAM_TOKEN")
        with pytest.raises(SettingsError, match="upstream_bearer_env: the variable it names is not set") as info:
            from_env.upstream_credentials({})
        assert "UPSTREAM_TOKEN" not in str(info.value)
        with pytest.raises(SettingsError, match="is not set or empty"):
            from_env.upstream_credentials({"UPSTREAM_TOKEN": "  "})
        from_file = load(upstream=UPSTREAM, upstream_bearer_file=str(tmp_path / "absent"))
        with pytest.raises(SettingsError, match="cannot read"):
            from_file.upstream_credentials({})

    def test_token_never_appears_in_errors(self, tmp_path: Path) -> None:
        """A malformed token is refused without its text appearing in the error."""
        bad = f"{TOKEN} with spaces"
        token_file = tmp_path / "token"
        token_file.write_text(bad, encoding="utf-8")
        for settings, env in [
            (load(upstream=UPSTREAM, upstream_bearer_env="T"), {"T": bad}),
            (load(upstream=UPSTREAM, upstream_bearer_file=str(token_file)), {}),
        ]:
            with pytest.raises(SettingsError) as info:
                settings.upstream_credentials(env)
            assert TOKEN not in str(info.value)
            assert TOKEN not in repr(info.value)
            assert TOKEN not in repr(settings)

    def test_at_most_one_bearer_source(self) -> None:
        """A token from both a variable and a file is ambiguous."""
        problems = problems_of(upstream=UPSTREAM, upstream_bearer_env="T", env={"MCPGUARD_UPSTREAM_BEARER_FILE": "/t"})
        assert problems == [
            "--upstream-bearer-env and MCPGUARD_UPSTREAM_BEARER_FILE: "
            "set at most one of upstream_bearer_env and upstream_bearer_file"
        ]

    def test_bearer_conflicts_with_a_static_authorization_header(self) -> None:
        """Two sources for the upstream Authorization header are refused rather than one silently winning."""
        problems = problems_of(upstream=UPSTREAM, upstream_bearer_env="T", upstream_headers={"Authorization": "x"})
        assert problems == ["--upstream-headers and --upstream-bearer-env: both set the upstream Authorization header"]

    def test_bearer_env_must_be_a_variable_name(self) -> None:
        """upstream_bearer_env names a variable; a token pasted there by mistake is refused without being echoed."""
        problems = problems_of(upstream=UPSTREAM, upstream_bearer_env=TOKEN)
        assert problems == ["--upstream-bearer-env: not a variable name"]


class TestGuardConfig:
    def test_guard_config_mapping(self) -> None:
        """The library's config receives the guard-relevant settings unchanged."""
        settings = load(
            upstream=UPSTREAM,
            public_url="https://mcp.example.test",
            mcp_path="/api/mcp",
            tenant_path="",
            max_body_bytes=8192,
            api_key_header="X-MCP-Key",
            tool_scopes={"drop_db": "mcp:admin"},
            allowed_hosts=("mcp.example.test",),
        )
        config = settings.guard_config()
        assert isinstance(config, GuardConfig)
        assert (config.public_url, config.mcp_path, config.tenant_path) == (
            "https://mcp.example.test",
            "/api/mcp",
            None,
        )
        assert (config.max_body_bytes, config.api_key_header) == (8192, "X-MCP-Key")
        assert dict(config.tool_scopes) == {"drop_db": "mcp:admin"}
        assert config.allowed_hosts == ("mcp.example.test",)

    def test_library_problems_join_the_others(self) -> None:
        """Problems the library finds are reported with the sidecar's own, each naming its source."""
        problems = problems_of(
            env={"MCPGUARD_TENANT_PATH": "/tenants/mcp", "MCPGUARD_DRAIN_SECONDS": "-5"}, upstream=UPSTREAM
        )
        assert problems == [
            "MCPGUARD_DRAIN_SECONDS: must be at least 0 and at most 86400 seconds (a day)",
            "MCPGUARD_TENANT_PATH: must be like mcp_path with one '{tenant}' segment, got '/tenants/mcp'",
        ]

    def test_direct_construction_is_validated_too(self) -> None:
        """Settings built without the loader are checked the same way, named by field."""
        with pytest.raises(SettingsError) as info:
            SidecarSettings(upstream=UPSTREAM, mcp_path="mcp", rate_limit_per_min=0)
        assert info.value.problems == [
            "rate_limit_per_min: must be at least 1",
            "mcp_path: must be '/'-separated segments without '//', '{' or a trailing '/', got 'mcp'",
        ]


class TestAssertionKey:
    def test_secret_from_env(self) -> None:
        """An HS256 secret is read from the named variable."""
        settings = load(upstream=UPSTREAM, assertion_secret_env="SIGNING")
        assert settings.assertion_key({"SIGNING": "s" * 40}) == b"s" * 40

    def test_short_secret_is_a_problem_without_echo(self) -> None:
        """A secret under 32 bytes is refused and not repeated in the message."""
        settings = load(upstream=UPSTREAM, assertion_secret_env="SIGNING")
        with pytest.raises(SettingsError) as caught:
            settings.assertion_key({"SIGNING": "tiny-secret-value"})
        assert "tiny-secret-value" not in str(caught.value)

    def test_ed25519_key_file(self, tmp_path: Path) -> None:
        """An unencrypted PEM Ed25519 private key file is loaded; another kind of file is a problem."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = tmp_path / "assertion.pem"
        path.write_bytes(pem)
        loaded = load(upstream=UPSTREAM, assertion_key_file=str(path)).assertion_key({})
        assert isinstance(loaded, Ed25519PrivateKey)
        path.write_text("not a key")
        with pytest.raises(SettingsError):
            load(upstream=UPSTREAM, assertion_key_file=str(path)).assertion_key({})

    def test_both_sources_and_bad_lifetime_reported_together(self) -> None:
        """Setting both key sources and a lifetime out of range are two problems, reported at once."""
        problems = problems_of(
            upstream=UPSTREAM, assertion_secret_env="SIGNING", assertion_key_file="/k.pem", assertion_lifetime=0
        )
        assert any("at most one of assertion_secret_env" in p for p in problems)
        assert any("assertion-lifetime" in p for p in problems)
