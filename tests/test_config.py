"""GuardConfig: sound defaults, and every problem of a bad configuration reported at once."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mcpguard.config import ConfigError, GuardConfig
from mcpguard.scopes import ADMIN, AUDIT, READ, WRITE

# One bad value per check, with a word its problem must contain.
BAD_FIELDS: dict[str, tuple[Any, str]] = {
    "public_url": ("ftp://files.example.test", "public_url"),
    "mcp_path": ("mcp/", "mcp_path"),
    "tenant_path": ("/tenants/mcp", "tenant_path"),
    "max_body_bytes": (1023, "max_body_bytes"),
    "max_json_depth": (1, "max_json_depth"),
    "api_key_header": ("Authorization", "api_key_header"),
    "tool_scopes": ({"drop_db": "mcp:root"}, "tool_scopes"),
}


def problems_of(**settings: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        GuardConfig(**settings)
    return info.value.problems


class TestDefaults:
    def test_defaults_are_valid(self) -> None:
        """A config with every default constructs and serves /mcp with per-tenant routes."""
        config = GuardConfig()
        assert (config.mcp_path, config.tenant_path, config.max_json_depth) == ("/mcp", "/{tenant}/mcp", 64)

    def test_origin_drops_the_trailing_slash(self) -> None:
        """``origin`` is ``public_url`` without a trailing slash, so paths can be appended to it."""
        assert GuardConfig(public_url="https://mcp.example.test/").origin == "https://mcp.example.test"
        assert GuardConfig(public_url="https://mcp.example.test:8443").origin == "https://mcp.example.test:8443"

    def test_config_is_frozen(self) -> None:
        """A built config cannot be changed afterwards, so validation cannot be sidestepped."""
        config = GuardConfig()
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.mcp_path = "/other"  # type: ignore[misc]  # assigning is the point: it must fail

    def test_every_known_scope_may_be_a_tool_scope(self) -> None:
        """Read, write, admin and audit are all valid per-tool scopes."""
        tool_scopes = {"a": READ, "b": WRITE, "c": ADMIN, "d": AUDIT}
        assert GuardConfig(tool_scopes=tool_scopes).tool_scopes == tool_scopes

    def test_optional_fields_may_be_left_out(self) -> None:
        """No tenant routes and an API key header are both valid choices."""
        config = GuardConfig(tenant_path=None, api_key_header="X-MCP-Key")
        assert (config.tenant_path, config.api_key_header) == (None, "X-MCP-Key")


class TestProblems:
    def test_every_problem_is_reported_at_once(self) -> None:
        """With every field wrong, one ConfigError lists one problem per field, in field order."""
        problems = problems_of(**{field: value for field, (value, _) in BAD_FIELDS.items()})
        assert len(problems) == len(BAD_FIELDS)
        for problem, (_, word) in zip(problems, BAD_FIELDS.values(), strict=True):
            assert word in problem

    def test_message_lists_every_problem(self) -> None:
        """The exception text carries each problem, so a log line alone explains the failure."""
        with pytest.raises(ConfigError) as info:
            GuardConfig(max_body_bytes=0, max_json_depth=0)
        assert all(problem in str(info.value) for problem in info.value.problems)
        assert len(info.value.problems) == 2

    def test_is_a_value_error(self) -> None:
        """ConfigError can be caught as the ValueError it is."""
        with pytest.raises(ValueError, match="max_body_bytes"):
            GuardConfig(max_body_bytes=0)

    def test_each_unknown_tool_scope_is_its_own_problem(self) -> None:
        """Two tools naming unknown scopes are two problems, each naming its tool and scope."""
        problems = problems_of(tool_scopes={"a": "mcp:root", "b": READ, "c": "admin"})
        assert len(problems) == 2
        assert "'a'" in problems[0]
        assert "'mcp:root'" in problems[0]
        assert "'c'" in problems[1]
        assert "'admin'" in problems[1]

    @pytest.mark.parametrize("field", list(BAD_FIELDS))
    def test_each_check_alone(self, field: str) -> None:
        """Each bad field on its own is exactly one problem, about that field."""
        value, word = BAD_FIELDS[field]
        problems = problems_of(**{field: value})
        assert len(problems) == 1
        assert word in problems[0]

    @pytest.mark.parametrize(
        "url",
        [
            "127.0.0.1:8000",
            "http://",
            "ws://mcp.example.test",
            "https://mcp.example.test/mcp",
            "https://mcp.example.test?x=1",
            "https://mcp.example.test#top",
        ],
    )
    def test_public_url_must_be_an_http_origin(self, url: str) -> None:
        """Without a scheme or host, with another scheme, or with path, query or fragment, it is a problem."""
        assert len(problems_of(public_url=url)) == 1

    @pytest.mark.parametrize(
        "url",
        [
            "https://admin:canary-pw@mcp.example.test",
            "htps://admin:canary-pw@mcp.example.test",
            "https://mcp.example.test\r\nX-Canary-Pw: 1",
            "https://mcp.example.test:canary-pw",
            "https://[canary-pw",
        ],
        ids=["credentials", "credentials-bad-scheme", "crlf", "bad-port", "bad-bracket"],
    )
    def test_public_url_problem_never_quotes_it(self, url: str) -> None:
        """Credentials, control characters or an unreadable host or port are one problem that does not quote the URL.

        public_url is advertised to every client (metadata, challenges) and problems reach logs.
        """
        [problem] = problems_of(public_url=url)
        assert problem.startswith("public_url ")
        assert "canary-pw" not in problem.lower()

    @pytest.mark.parametrize("path", ["mcp", "/mcp/", "/", "/{tenant}"])
    def test_mcp_path_shape(self, path: str) -> None:
        """``mcp_path`` starts with a slash, does not end with one, and has no placeholder."""
        assert len(problems_of(mcp_path=path)) == 1

    @pytest.mark.parametrize("path", ["{tenant}/mcp", "/mcp", "/{tenant}/{tenant}/mcp"])
    def test_tenant_path_shape(self, path: str) -> None:
        """``tenant_path`` starts with a slash and holds ``{tenant}`` exactly once."""
        assert len(problems_of(tenant_path=path)) == 1

    def test_max_body_bytes_floor(self) -> None:
        """A body cap below 1 KiB is a problem; 1 KiB is the smallest allowed."""
        assert GuardConfig(max_body_bytes=1024).max_body_bytes == 1024
        assert len(problems_of(max_body_bytes=1023)) == 1

    @pytest.mark.parametrize(("value", "valid"), [(1, False), (2, True), (1000, True), (1001, False)])
    def test_max_json_depth_range(self, value: int, valid: bool) -> None:
        """The JSON depth limit lies between 2 and 1000 inclusive."""
        if valid:
            assert GuardConfig(max_json_depth=value).max_json_depth == value
        else:
            assert len(problems_of(max_json_depth=value)) == 1

    @pytest.mark.parametrize("header", ["authorization", "AUTHORIZATION", "X API Key", "X_Key", "", "X-Key:"])
    def test_api_key_header_must_be_a_plain_name_other_than_authorization(self, header: str) -> None:
        """Authorization in any case, spaces, underscores, colons and empty names are problems."""
        assert len(problems_of(api_key_header=header)) == 1

    def test_api_key_header_with_trailing_newline_is_a_problem(self) -> None:
        """A header name ending in a newline is not a plain header name."""
        assert len(problems_of(api_key_header="X-Api-Key\n")) == 1
