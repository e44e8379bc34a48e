"""Sidecar durations: each is finite, not negative where that means nothing, and at most its cap, or a problem."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sidecar.serve import sidecar_from_settings
from sidecar.settings import SettingsError, SidecarSettings, load_settings
from tests.conftest import free_port, make_keys, serve
from tests.sidecar.test_settings import ping
from tests.test_guard import RecordingApp

UPSTREAM = "http://127.0.0.1:9000/mcp"
A_DAY = "must be more than 0 and at most 86400 seconds (a day)"
A_DAY_OR_ZERO = "must be at least 0 and at most 86400 seconds (a day)"
NOT_FINITE = "expected a finite number"
CENTURY = "must be more than 0 and at most 36500 (a hundred years)"


def problems_of(*, config_file: str | None = None, env: dict[str, str] | None = None, **overrides: object) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(config_file=config_file, env=env or {}, overrides=overrides)
    return info.value.problems


def test_out_of_range_durations_in_toml_are_all_reported_at_once(tmp_path: Path) -> None:
    """Huge, negative, infinite and nan durations in the file are each one problem, reported together."""
    config = tmp_path / "mcpguard.toml"
    config.write_text(
        'upstream_cmd = "server"\nstdio_idle_timeout = 1e300\nupstream_timeout = 86400.5\n'
        "connect_timeout = -1.0\nannotations_ttl = inf\ndrain_seconds = nan\naudit_retention_days = 1e300\n",
        encoding="utf-8",
    )
    assert sorted(problems_of(config_file=str(config))) == sorted(
        [
            f"{config}: stdio_idle_timeout: {A_DAY}",
            f"{config}: upstream_timeout: {A_DAY}",
            f"{config}: connect_timeout: {A_DAY}",
            f"{config}: annotations_ttl: {NOT_FINITE}",
            f"{config}: drain_seconds: {NOT_FINITE}",
            f"{config}: audit_retention_days: {CENTURY}",
        ]
    )


def test_out_of_range_durations_in_the_environment_are_all_reported_at_once() -> None:
    """The same mistakes written as environment variables, a number too large for a float included."""
    env = {
        "MCPGUARD_STDIO_IDLE_TIMEOUT": "1e300",
        "MCPGUARD_UPSTREAM_TIMEOUT": "1e400",
        "MCPGUARD_CONNECT_TIMEOUT": "0",
        "MCPGUARD_ANNOTATIONS_TTL": "-0.5",
        "MCPGUARD_DRAIN_SECONDS": "86401",
        "MCPGUARD_AUDIT_RETENTION_DAYS": "nan",
    }
    assert sorted(problems_of(env=env, upstream_cmd="server")) == sorted(
        [
            f"MCPGUARD_STDIO_IDLE_TIMEOUT: {A_DAY}",
            f"MCPGUARD_UPSTREAM_TIMEOUT: {NOT_FINITE}",
            f"MCPGUARD_CONNECT_TIMEOUT: {A_DAY}",
            f"MCPGUARD_ANNOTATIONS_TTL: {A_DAY_OR_ZERO}",
            f"MCPGUARD_DRAIN_SECONDS: {A_DAY_OR_ZERO}",
            f"MCPGUARD_AUDIT_RETENTION_DAYS: {NOT_FINITE}",
        ]
    )


def test_oauth_and_assertion_durations_are_bounded_too() -> None:
    """Token, grace, refresh and assertion lifetimes far past their caps are each reported, with the others."""
    env = {
        "MCPGUARD_OAUTH": "true",
        "MCPGUARD_OAUTH_ACCESS_TOKEN_MINUTES": "1e300",
        "MCPGUARD_OAUTH_REFRESH_DAYS": "1e300",
        "MCPGUARD_OAUTH_REFRESH_GRACE_SECONDS": "1e300",
        "MCPGUARD_ASSERTION_LIFETIME": "1e300",
        "MCPGUARD_DRAIN_SECONDS": "1e300",
    }
    named = sorted(problem.split(":")[0] for problem in problems_of(env=env, upstream=UPSTREAM))
    assert named == sorted(variable for variable in env if variable != "MCPGUARD_OAUTH")


def test_direct_construction_checks_infinity_and_nan() -> None:
    """Settings built without the loader, which would let inf and nan through, report them by field."""
    with pytest.raises(SettingsError) as info:
        SidecarSettings(
            upstream_cmd="server",
            stdio_idle_timeout=math.inf,
            upstream_timeout=math.nan,
            connect_timeout=1e300,
            annotations_ttl=-math.inf,
            drain_seconds=math.nan,
        )
    assert info.value.problems == [
        f"stdio_idle_timeout: {A_DAY}",
        f"upstream_timeout: {A_DAY}",
        f"connect_timeout: {A_DAY}",
        f"annotations_ttl: {A_DAY_OR_ZERO}",
        f"drain_seconds: {A_DAY_OR_ZERO}",
    ]


def test_zero_where_it_means_something_and_the_cap_itself_are_accepted() -> None:
    """No drain and no annotation cache are valid choices, and a day is still allowed."""
    settings = load_settings(
        config_file=None,
        env={"MCPGUARD_DRAIN_SECONDS": "0", "MCPGUARD_ANNOTATIONS_TTL": "0"},
        overrides={"upstream_cmd": "server", "upstream_timeout": 86400, "stdio_idle_timeout": "86400"},
    )
    assert (settings.drain_seconds, settings.annotations_ttl) == (0.0, 0.0)
    assert (settings.upstream_timeout, settings.stdio_idle_timeout) == (86400.0, 86400.0)


def test_a_sidecar_with_every_duration_at_its_cap_forwards_a_call() -> None:
    """The caps are within what the proxy's timers hold: a call goes through, not a traceback or a 500."""
    with serve(RecordingApp()) as upstream:
        port = free_port()
        settings = load_settings(
            config_file=None,
            env={},
            overrides={
                "upstream": upstream + "/mcp",
                "listen": f"127.0.0.1:{port}",
                "state": "memory://",
                "upstream_timeout": 86400,
                "connect_timeout": 86400,
                "annotations_ttl": 86400,
                "drain_seconds": 86400,
                "audit_retention_days": 36500,
            },
        )
        app = sidecar_from_settings(settings, {"MCPGUARD_ARGON2_PROFILE": "cheapest"})
        key = make_keys(app.store, {"acme": ("acme", ["mcp:read"])})["acme"]
        with serve(app, port) as url:
            response = ping(url, key)
    assert response.status_code == 200
