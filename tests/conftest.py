"""Shared fixtures: real servers on 127.0.0.1, cheap argon2 parameters and keys made with them."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import argon2
import pytest
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Send

from mcpguard import KeyRing, KeyStore
from mcpguard.keys import generate_key
from mcpguard.stores.base import KeyRecord


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(app: ASGIApp, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread (``options`` go to its config); yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CLI command hashes with the cheapest argon2 profile and never sees a state from the environment."""
    monkeypatch.setenv("MCPGUARD_ARGON2_PROFILE", "cheapest")
    monkeypatch.delenv("MCPGUARD_STATE", raising=False)


@pytest.fixture
def state(tmp_path: Path) -> str:
    """A state file path in the test's own directory."""
    return str(tmp_path / "state.db")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``mcpguard argv`` in process; its exit status, stdout and stderr."""
    from sidecar.cli import main  # imported here: most tests never need the CLI

    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def cheap_hasher() -> argon2.PasswordHasher:
    """argon2id with the cheapest parameters: tests check behaviour, not cost."""
    return argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST)


def cheap_keyring(store: KeyStore) -> KeyRing:
    """A key ring over ``store`` hashing with the cheapest argon2 parameters."""
    return KeyRing(store=store, hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST))


def make_keys(store: KeyStore, specs: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
    """One new key in ``store`` per label of ``specs`` (label → tenant, scopes), named by its label; label → key."""

    async def create() -> dict[str, str]:
        ring = cheap_keyring(store)
        keys: dict[str, str] = {}
        for label, (tenant, scopes) in specs.items():
            keys[label], _ = await ring.create(tenant=tenant, scopes=scopes, name=label)
        await ring.aclose()
        return keys

    return asyncio.run(create())


def stored_key(store: KeyStore, *, tenant: str, name: str, scopes: Sequence[str], hasher: argon2.PasswordHasher) -> str:
    """A key written straight into ``store``, past the key ring's checks (as another issuer may write one); the key."""
    key_id, key = generate_key()
    record = KeyRecord(
        key_id=key_id,
        tenant=tenant,
        name=name,
        scopes=tuple(scopes),
        secret_hash=hasher.hash(key),
        created_at=datetime.now(UTC),
    )
    asyncio.run(store.add_key(record))
    return key


# A 2025-11-25 initialize, and the headers its era's requests carry.
LEGACY_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
LEGACY_HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}


async def read_body(receive: Receive) -> bytes:
    """The whole request body, as a test app behind the guard receives it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan until shutdown, for a test app with nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body`` (already read with ``read_body``) once, then what follows."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
