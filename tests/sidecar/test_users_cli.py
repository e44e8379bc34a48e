"""The ``mcpguard users`` and ``mcpguard grants`` commands, run through the real entry point against a state
file, and what they do to a running sidecar's tokens."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import argon2
import httpx
import pytest

from mcpguard import GrantRecord, UserRecord, open_store
from sidecar.cli import main
from tests.conftest import run_cli as run
from tests.oauth.consent_client import consent
from tests.oauth.flow_helpers import (
    PASSWORD,
    REDIRECT,
    STATELESS_LIST,
    MemoryTokens,
    Person,
    Pkce,
    call,
    provider_for,
)
from tests.sidecar.test_oauth_sidecar import mcp_headers, oauth_sidecar
from tests.test_cli_keys import trail

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def add(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    state: str,
    email: str,
    *extra: str,
    password: str = PASSWORD,
) -> tuple[int, str, str]:
    """``users add --email EMAIL --password-stdin EXTRA`` with ``password`` on standard input."""
    monkeypatch.setattr("sys.stdin", io.StringIO(password + "\n"))
    return run(capsys, "--state", state, "users", "add", "--email", email, "--password-stdin", *extra)


def users_in(state: str) -> list[UserRecord]:
    """Every user the state file holds, as the store reads them back."""

    async def read() -> list[UserRecord]:
        store = open_store(f"sqlite:///{state}")
        try:
            return await store.list_users()
        finally:
            await store.close()

    return asyncio.run(read())


def add_grants(state: str, *grants: GrantRecord) -> None:
    """Store ``grants`` as the token endpoint would, each with a refresh token of its own."""

    async def write() -> None:
        store = open_store(f"sqlite:///{state}")
        try:
            for grant in grants:
                await store.add_grant(grant, f"hash-of-refresh-{grant.grant_id}")
        finally:
            await store.close()

    asyncio.run(write())


def grant(grant_id: str, tenant: str = "acme", **changes: object) -> GrantRecord:
    """A grant of user u1 to client mc_one made at T0 for 30 days."""
    values: dict[str, object] = {
        "grant_id": grant_id,
        "tenant": tenant,
        "subject": "user:u1",
        "client_id": "mc_one",
        "scopes": ("mcp:read",),
        "resource": "https://mcp.example.test/mcp",
        "created_at": T0,
        "expires_at": T0 + timedelta(days=30),
    } | changes
    return GrantRecord(**values)  # type: ignore[arg-type]  # the keys are exactly the record's fields


class TestUsers:
    def test_add_reads_the_password_from_stdin_and_keeps_only_its_hash(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """The new user is printed with tenants and scopes; the store holds an argon2id hash of the password."""
        status, out, err = add(
            monkeypatch, capsys, state, "Ada@Acme.test", "--tenant", "acme", "--tenant", "globex", "--scopes",
            "mcp:read,mcp:write",
        )  # fmt: skip
        assert (status, err) == (0, "")
        [user] = users_in(state)
        assert out.splitlines() == [
            f"added user {user.user_id} (ada@acme.test)",
            "tenants: acme globex",
            "scopes:  mcp:read mcp:write",
        ]
        assert PASSWORD not in out
        assert user.password_hash.startswith("$argon2id$")
        assert argon2.PasswordHasher().verify(user.password_hash, PASSWORD)

    def test_default_scope_is_read_only(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """Without --scopes a user may grant mcp:read only."""
        assert add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme", "--json")[0] == 0
        assert users_in(state)[0].scopes == ("mcp:read",)

    def test_prompted_password_is_asked_twice(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """Without --password-stdin the password is prompted for twice; two different answers add nobody."""
        answers = iter([PASSWORD, PASSWORD + "!"])
        monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
        status, _, err = run(capsys, "--state", state, "users", "add", "--email", "a@acme.test", "--tenant", "acme")
        assert (status, err) == (1, "mcpguard: error: the two passwords differ\n")
        assert users_in(state) == []
        answers = iter([PASSWORD, PASSWORD])
        status, _, _ = run(capsys, "--state", state, "users", "add", "--email", "a@acme.test", "--tenant", "acme")
        assert status == 0
        assert [u.email for u in users_in(state)] == ["a@acme.test"]

    def test_password_is_never_taken_from_the_command_line(
        self, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """There is no flag that carries a password: --password is refused, and the value is not printed back."""
        with pytest.raises(SystemExit) as exited:
            main(["--state", state, "users", "add", "--email", "a@acme.test", "--tenant", "acme", "--password", "x"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "passwords are never taken on the command line" in err
        assert "'x'" not in err
        assert users_in(state) == []

    @pytest.mark.parametrize(
        ("password", "extra", "message"),
        [
            ("short", (), "a password has 12 to 1024 characters"),
            (PASSWORD, ("--scopes", "mcp:root"), "scopes must be some of"),
            (PASSWORD, ("--tenant", "acme corp"), "a tenant is 1 to 128 characters"),
        ],
    )
    def test_invalid_user_is_an_error_that_quotes_no_password(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        state: str,
        password: str,
        extra: tuple[str, ...],
        message: str,
    ) -> None:
        """A short password, an unknown scope or a tenant outside the tenant-name rule exits 1 with the reason, and
        nothing is stored."""
        status, out, err = add(monkeypatch, capsys, state, "a@acme.test", "--tenant", "acme", *extra, password=password)
        assert status == 1
        assert message in err
        assert password not in out + err
        assert users_in(state) == []

    def test_duplicate_email_in_another_case(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """A second user with the same email, whatever its case, is an error."""
        assert add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme")[0] == 0
        status, _, err = add(monkeypatch, capsys, state, "ADA@acme.test", "--tenant", "globex")
        assert (status, err) == (1, "mcpguard: error: a user with this email already exists\n")

    def test_list_shows_members_and_never_a_hash(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """Listing by tenant shows its members only, as a table or JSON, and no password hash anywhere."""
        add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme")
        add(monkeypatch, capsys, state, "bob@globex.test", "--tenant", "globex", "--tenant", "acme")
        add(monkeypatch, capsys, state, "cy@globex.test", "--tenant", "globex")
        status, out, _ = run(capsys, "--state", state, "users", "list", "--tenant", "acme")
        assert status == 0
        lines = out.splitlines()
        assert lines[0].split() == ["USER", "ID", "EMAIL", "STATUS", "TENANTS", "SCOPES", "CREATED"]
        assert [line.split()[1:4] for line in lines[1:]] == [
            ["ada@acme.test", "active", "acme"],
            ["bob@globex.test", "active", "globex,acme"],
        ]
        _, listed, _ = run(capsys, "--state", state, "users", "list", "--json")
        records = json.loads(listed)
        assert [r["email"] for r in records] == ["ada@acme.test", "bob@globex.test", "cy@globex.test"]
        assert set(records[0]) == {"user_id", "email", "tenants", "scopes", "created_at", "disabled_at"}
        for user in users_in(state):
            assert user.password_hash not in out + listed

    def test_disable_marks_the_user_and_revokes_only_their_grants(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """Disabling a user shows them disabled and revokes their live grants in every tenant, nobody else's."""
        add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme", "--tenant", "globex")
        [ada] = users_in(state)
        subject = f"user:{ada.user_id}"
        add_grants(
            state,
            grant("g-acme", subject=subject),
            grant("g-globex", "globex", subject=subject),
            grant("g-other", subject="user:someone-else"),
        )
        status, out, _ = run(capsys, "--state", state, "users", "disable", "--email", "ADA@acme.test")
        assert status == 0
        assert out.startswith(f"disabled user {ada.user_id} (ada@acme.test) at ")
        assert out.rstrip().endswith("revoked 2 grant(s)")
        assert users_in(state)[0].disabled_at is not None
        _, listed, _ = run(capsys, "--state", state, "users", "list")
        assert listed.splitlines()[1].split()[2] == "disabled"
        _, acme, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "acme", "--json")
        reasons = {g["grant_id"]: g["revoked_reason"] for g in json.loads(acme)}
        assert reasons == {"g-acme": "user_disabled", "g-other": None}

    def test_disable_unknown_email(self, capsys: pytest.CaptureFixture[str], state: str) -> None:
        """Disabling an email nobody has exits 1 without repeating it."""
        status, _, err = run(capsys, "--state", state, "users", "disable", "--email", "nobody@acme.test")
        assert (status, err) == (1, "mcpguard: error: no user with that email\n")


class TestGrants:
    def test_list_shows_a_tenants_grants_with_their_status(
        self, capsys: pytest.CaptureFixture[str], state: str
    ) -> None:
        """Listing is per tenant, oldest first, and tells active, expired and revoked (with its reason) apart."""
        add_grants(
            state,
            grant("g-live", expires_at=datetime.now(UTC) + timedelta(days=1)),
            grant("g-old", created_at=T0 - timedelta(days=40), expires_at=T0 - timedelta(days=10)),
            grant("g-globex", "globex"),
        )
        assert run(capsys, "--state", state, "grants", "revoke", "g-globex")[0] == 0
        status, out, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "acme")
        assert status == 0
        rows = [line.split() for line in out.splitlines()]
        assert rows[0] == ["GRANT", "ID", "STATUS", "SUBJECT", "CLIENT", "SCOPES", "CREATED", "EXPIRES"]
        assert [row[:5] for row in rows[1:]] == [
            ["g-old", "expired", "user:u1", "mc_one", "mcp:read"],
            ["g-live", "active", "user:u1", "mc_one", "mcp:read"],
        ]
        _, globex, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "globex")
        assert globex.splitlines()[1].split()[:3] == ["g-globex", "revoked", "(revoked)"]

    def test_list_json_holds_no_token_material(self, capsys: pytest.CaptureFixture[str], state: str) -> None:
        """The JSON listing has the grant's facts field by field and nothing of its refresh tokens."""
        add_grants(state, grant("g1"))
        status, out, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "acme", "--json")
        assert status == 0
        [listed] = json.loads(out)
        assert listed == {
            "grant_id": "g1",
            "tenant": "acme",
            "subject": "user:u1",
            "client_id": "mc_one",
            "scopes": ["mcp:read"],
            "resource": "https://mcp.example.test/mcp",
            "created_at": "2025-01-02T03:04:05+00:00",
            "expires_at": "2025-02-01T03:04:05+00:00",
            "revoked_at": None,
            "revoked_reason": None,
        }
        assert "hash-of-refresh" not in out

    def test_revoke_keeps_the_first_revocation(self, capsys: pytest.CaptureFixture[str], state: str) -> None:
        """Revoking marks the grant revoked with reason "revoked"; revoking again reports the first time."""
        add_grants(state, grant("g1"))
        status, first, _ = run(capsys, "--state", state, "grants", "revoke", "g1")
        assert status == 0
        assert first.startswith("revoked grant g1 of tenant acme at ")
        assert run(capsys, "--state", state, "grants", "revoke", "g1")[1] == first
        _, out, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "acme", "--json")
        assert json.loads(out)[0]["revoked_reason"] == "revoked"

    def test_revoke_unknown_grant(self, capsys: pytest.CaptureFixture[str], state: str) -> None:
        """Revoking an id no grant has exits 1 without repeating it."""
        status, _, err = run(capsys, "--state", state, "grants", "revoke", "g-missing")
        assert (status, err) == (1, "mcpguard: error: no grant with that id\n")


@pytest.fixture
def signed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[str, str, str]]:
    """A running OAuth sidecar, user ada added by the CLI, and an access token she approved: (url, state, token)."""
    state = str(tmp_path / "state.db")
    assert add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme")[0] == 0
    storage = MemoryTokens()
    with oauth_sidecar(tmp_path) as running:
        provider = provider_for(running.url, storage, Person())
        answer = asyncio.run(call(running.url, provider, "echo", {"text": "hi"}))
        assert answer.is_error is False
        assert storage.tokens is not None
        yield running.url, state, storage.tokens.access_token


def list_tools(url: str, token: str) -> httpx.Response:
    """A tools/list POST to the sidecar carrying ``token``."""
    return httpx.post(f"{url}/mcp", headers=mcp_headers(token), json=STATELESS_LIST)


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_revoked_grant_token_refused_at_once_by_a_running_sidecar(
    signed_in: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``grants revoke`` in another process ends the access token the sidecar accepted a moment before."""
    url, state, token = signed_in
    assert list_tools(url, token).status_code == 200
    _, out, _ = run(capsys, "--state", state, "grants", "list", "--tenant", "acme", "--json")
    [listed] = json.loads(out)
    assert run(capsys, "--state", state, "grants", "revoke", listed["grant_id"])[0] == 0
    after = list_tools(url, token)
    assert after.status_code == 401
    assert 'error="invalid_token"' in after.headers["www-authenticate"]


@pytest.mark.threat("T-GRANT-REVOKED-TOKEN")
def test_disabled_user_token_refused_and_sign_in_refused(
    signed_in: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``users disable`` ends the user's access token at once, and their next sign-in fails."""
    url, state, token = signed_in
    assert list_tools(url, token).status_code == 200
    assert run(capsys, "--state", state, "users", "disable", "--email", "ada@acme.test")[0] == 0
    assert list_tools(url, token).status_code == 401
    assert asyncio.run(sign_in(url, "ada@acme.test")) == [200, 401]


async def sign_in(url: str, username: str) -> list[int]:
    """Register a public client and sign in as ``username`` on its authorization page; the status of each page."""
    async with httpx.AsyncClient() as http:
        registered = await http.post(
            f"{url}/register", json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        )
        query = {
            "response_type": "code",
            "client_id": registered.json()["client_id"],
            "redirect_uri": REDIRECT,
            "state": "s1",
            "scope": "mcp:read",
            "resource": f"{url}/mcp",
            "code_challenge": Pkce.new().challenge,
            "code_challenge_method": "S256",
        }
        result = await consent(http, f"{url}/authorize?{urlencode(query)}", username=username, password=PASSWORD)
    return [response.status_code for response in result.responses]


def test_grant_revocation_and_user_disable_are_in_the_tenants_audit_trail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    """`grants revoke` and `users disable` each record, per grant they end, who ran them in that grant's tenant."""
    assert add(monkeypatch, capsys, state, "ada@acme.test", "--tenant", "acme", "--tenant", "globex")[0] == 0
    [ada] = users_in(state)
    subject = f"user:{ada.user_id}"
    add_grants(
        state, grant("g1"), grant("g-acme", subject=subject), grant("g-globex", tenant="globex", subject=subject)
    )
    assert run(capsys, "--state", state, "grants", "revoke", "g1")[0] == 0
    assert run(capsys, "--state", state, "users", "disable", "--email", "ada@acme.test")[0] == 0
    acme, globex = trail(state, "acme"), trail(state, "globex")
    assert sorted((c["path"], c["credential_id"]) for c in acme) == [
        ("mcpguard grants revoke", "g1"),
        ("mcpguard users disable", "g-acme"),
    ]
    assert [(c["path"], c["credential_id"]) for c in globex] == [("mcpguard users disable", "g-globex")]
    assert all(c["subject"].startswith("operator:") for c in acme + globex)
