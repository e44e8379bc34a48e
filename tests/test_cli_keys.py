"""The ``mcpguard keys`` commands, run through the real entry point against a state file."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import argon2
import pytest

from mcpguard import AuditQuery, InvalidToken, KeyRing, Principal, open_audit_store, open_store
from sidecar.cli import main
from tests.conftest import run_cli as run

REPO = Path(__file__).resolve().parents[1]


def create_json(capsys: pytest.CaptureFixture[str], state: str, *extra: str) -> dict[str, object]:
    """Create a key for tenant acme with ``--json`` and return the printed object."""
    status, out, _ = run(capsys, "--state", state, "keys", "create", "--tenant", "acme", "--json", *extra)
    assert status == 0
    created: dict[str, object] = json.loads(out)
    return created


def verify(state: str, key: str, hasher: argon2.PasswordHasher) -> Principal:
    """Verify ``key`` with a KeyRing opened on ``state``, as a server would."""

    async def check() -> Principal:
        store = open_store(f"sqlite:///{state}")
        ring = KeyRing(store=store, hasher=hasher)
        try:
            return await ring.verify(key)
        finally:
            await ring.aclose()
            await store.close()

    return asyncio.run(check())


def test_create_prints_the_key_alone_on_stdout(
    capsys: pytest.CaptureFixture[str], state: str, cheap_hasher: argon2.PasswordHasher
) -> None:
    """Plain create puts only the key on stdout and the once-only note with its details on stderr."""
    status, out, err = run(capsys, "keys", "create", "--tenant", "acme", "--name", "ci", "--state", state)
    assert status == 0
    key = out.strip()
    assert out == key + "\n"
    assert "shown only once" in err
    assert "tenant:  acme" in err
    assert "scopes:  mcp:read mcp:write" in err
    assert "expires: never" in err
    assert key not in err
    assert verify(state, key, cheap_hasher).subject == "key:ci"


def test_create_json(capsys: pytest.CaptureFixture[str], state: str, cheap_hasher: argon2.PasswordHasher) -> None:
    """--json prints one object with the key and its details, and the key verifies against the state file."""
    before = datetime.now(UTC)
    created = create_json(capsys, state, "--scopes", "mcp:read, mcp:admin", "--name", "ops", "--expires", "90d")
    assert set(created) >= {"key", "key_id", "tenant", "scopes", "name", "expires_at"}
    assert (created["tenant"], created["scopes"], created["name"]) == ("acme", ["mcp:read", "mcp:admin"], "ops")
    expires_at = datetime.fromisoformat(str(created["expires_at"]))
    assert before + timedelta(days=90) - timedelta(seconds=1) <= expires_at <= datetime.now(UTC) + timedelta(days=90)
    principal = verify(state, str(created["key"]), cheap_hasher)
    assert principal.credential_id == created["key_id"]
    assert principal.scopes == {"mcp:read", "mcp:admin"}


def test_list_never_prints_hashes(capsys: pytest.CaptureFixture[str], state: str) -> None:
    """Listing, plain or JSON, shows a tenant's keys and their status but no hash and no key."""
    first = create_json(capsys, state)
    second = create_json(capsys, state, "--name", "second")
    run(capsys, "--state", state, "keys", "revoke", str(first["key_id"]))

    status, table, _ = run(capsys, "--state", state, "keys", "list", "--tenant", "acme")
    assert status == 0
    assert "$argon2" not in table
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["KEY", "ID"]
    assert f"{first['key_id']}  revoked" in lines[1]
    assert f"{second['key_id']}  active" in lines[2]

    status, out, _ = run(capsys, "--state", state, "keys", "list", "--tenant", "acme", "--json")
    assert status == 0
    assert "$argon2" not in out
    listed = json.loads(out)
    assert [entry["key_id"] for entry in listed] == [first["key_id"], second["key_id"]]
    assert "secret_hash" not in listed[0]
    assert listed[0]["revoked_at"] is not None
    for created in (first, second):
        assert str(created["key"]) not in table + out


def test_list_is_per_tenant(capsys: pytest.CaptureFixture[str], state: str) -> None:
    """Another tenant's listing does not show acme's keys."""
    create_json(capsys, state)
    status, out, _ = run(capsys, "--state", state, "keys", "list", "--tenant", "other", "--json")
    assert (status, json.loads(out)) == (0, [])


@pytest.mark.threat("T-KEY-REVOKE")
def test_revoked_key_refused_by_a_server_on_the_same_state(
    capsys: pytest.CaptureFixture[str], state: str, cheap_hasher: argon2.PasswordHasher
) -> None:
    """`keys revoke` exits 0 and the key no longer verifies against the same state."""
    created = create_json(capsys, state)
    status, out, _ = run(capsys, "keys", "revoke", str(created["key_id"]), "--state", state)
    assert status == 0
    assert f"revoked key {created['key_id']}" in out
    with pytest.raises(InvalidToken, match="key revoked"):
        verify(state, str(created["key"]), cheap_hasher)


@pytest.mark.threat("T-KEY-LEAK")
def test_revoke_unknown_fails_without_echoing_the_argument(capsys: pytest.CaptureFixture[str], state: str) -> None:
    """Revoking an unknown id exits non-zero with a clear message that does not repeat what was pasted."""
    created = create_json(capsys, state)
    pasted = str(created["key"])
    status, out, err = run(capsys, "--state", state, "keys", "revoke", pasted)
    assert status == 1
    assert "no key with that id" in err
    assert pasted not in out + err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tenant", "acme", "--scopes", "mcp:root"], "unknown scopes mcp:root"),
        (["--tenant", "a b"], "tenant"),
    ],
)
def test_bad_input_is_an_error_without_traceback(
    capsys: pytest.CaptureFixture[str], state: str, argv: list[str], message: str
) -> None:
    """A bad scope or tenant is one line on stderr and exit status 1, with nothing created."""
    status, out, err = run(capsys, "--state", state, "keys", "create", *argv)
    assert (status, out) == (1, "")
    assert err.startswith("mcpguard: error: ")
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("expires", ["90", "0d", "-1d", "1w", "1e9d", "99999999999d"])
def test_bad_expiry_is_a_usage_error(capsys: pytest.CaptureFixture[str], state: str, expires: str) -> None:
    """An --expires that is not a positive Nd/Nh/Nm duration within range is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        main(["--state", state, "keys", "create", "--tenant", "acme", f"--expires={expires}"])
    assert caught.value.code == 2
    assert "--expires" in capsys.readouterr().err


@pytest.mark.threat("T-STORE-FAIL")
def test_unavailable_store_refused_with_a_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A state path that cannot be opened is one error line and exit status 1, not a traceback."""
    status, _, err = run(capsys, "--state", str(tmp_path / "missing" / "state.db"), "keys", "list", "--tenant", "a")
    assert status == 1
    assert err.startswith("mcpguard: error: storage unavailable")
    assert "Traceback" not in err


def test_unknown_state_scheme_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A state URL with an unsupported scheme is reported as such."""
    status, _, err = run(capsys, "--state", "ftp://host/state", "keys", "list", "--tenant", "a")
    assert status == 1
    assert "unsupported store URL scheme 'ftp'" in err


def test_state_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """MCPGUARD_STATE is used when --state is not given, and --state wins over it."""
    monkeypatch.setenv("MCPGUARD_STATE", state)
    _, out, _ = run(capsys, "keys", "create", "--tenant", "acme", "--json")
    key_id = json.loads(out)["key_id"]
    _, out, _ = run(capsys, "--state", f"sqlite:///{state}", "keys", "list", "--tenant", "acme", "--json")
    assert [entry["key_id"] for entry in json.loads(out)] == [key_id]
    _, out, _ = run(capsys, "--state", f"{state}-other", "keys", "list", "--tenant", "acme", "--json")
    assert json.loads(out) == []


def test_default_state_is_mcpguard_db_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With neither --state nor MCPGUARD_STATE, state lives in ./mcpguard.db."""
    monkeypatch.chdir(tmp_path)
    status, _, _ = run(capsys, "keys", "create", "--tenant", "acme")
    assert status == 0
    assert (tmp_path / "mcpguard.db").is_file()


def test_unknown_argon2_profile_is_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """Only the documented test profile is accepted from MCPGUARD_ARGON2_PROFILE."""
    monkeypatch.setenv("MCPGUARD_ARGON2_PROFILE", "fast")
    status, _, err = run(capsys, "--state", state, "keys", "create", "--tenant", "acme")
    assert status == 1
    assert "MCPGUARD_ARGON2_PROFILE" in err


def test_console_entry_runs_as_a_module(state: str, cheap_hasher: argon2.PasswordHasher) -> None:
    """`python -m sidecar.cli` is the same command: it creates a key that verifies."""
    env = {**os.environ, "MCPGUARD_ARGON2_PROFILE": "cheapest"}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "--state", state, "keys", "create", "--tenant", "acme", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert verify(state, created["key"], cheap_hasher).tenant == "acme"


def trail(state: str, tenant: str) -> list[dict[str, Any]]:
    """The calls of ``tenant`` in the audit trail kept in the state file."""

    async def read() -> list[dict[str, Any]]:
        store = open_audit_store(f"sqlite:///{state}")
        try:
            return (await store.query(AuditQuery(tenant=tenant, limit=100))).calls
        finally:
            await store.close()

    return asyncio.run(read())


def test_revocation_is_in_the_tenants_audit_trail(capsys: pytest.CaptureFixture[str], state: str) -> None:
    """`keys revoke` records who revoked which key in the key's tenant's trail, which the sidecar shares."""
    created = create_json(capsys, state)
    assert run(capsys, "--state", state, "keys", "revoke", str(created["key_id"]))[0] == 0
    [entry] = trail(state, "acme")
    assert (entry["path"], entry["http_method"], entry["credential_id"]) == (
        "mcpguard keys revoke",
        "CLI",
        created["key_id"],
    )
    assert entry["subject"].startswith("operator:")
    assert trail(state, "globex") == []


def test_revocation_not_recorded_is_reported(capsys: pytest.CaptureFixture[str], state: str, tmp_path: Path) -> None:
    """When the trail cannot be written the key is still revoked, and the command says so and exits 1."""
    created = create_json(capsys, state)
    unwritable = tmp_path / "no-such-dir" / "audit.db"
    status, _, err = run(capsys, "--state", state, "keys", "revoke", str(created["key_id"]), "--audit", str(unwritable))
    assert status == 1
    assert "not recorded in the audit trail" in err
    [listed] = json.loads(run(capsys, "--state", state, "keys", "list", "--tenant", "acme", "--json")[1])
    assert listed["revoked_at"] is not None
