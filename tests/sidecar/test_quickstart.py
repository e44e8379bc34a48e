"""``mcpguard quickstart`` as a user runs it: a real process, a printed key, a real client calling a tool."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import free_port


def _children(parent: int) -> list[int]:
    """Live child processes of ``parent``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            # The fields after the command name (which may hold spaces) start with state, then ppid.
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(proc.name))
    return found


def test_quickstart_serves_the_demo_behind_the_guard(tmp_path: Path) -> None:
    """The printed key lists and calls the demo tools through the sidecar; stopping it stops the demo server."""
    port = free_port()
    env = os.environ | {"MCPGUARD_ARGON2_PROFILE": "cheapest"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "quickstart", "--port", str(port), "--state", str(tmp_path / "q.db")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert process.stdout is not None
        printed = []
        deadline = time.monotonic() + 30
        key = None
        while key is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            printed.append(line)
            match = re.search(r"key\s+:\s+(mk_\w+)", line)
            key = match.group(1) if match else None
        assert key is not None, "".join(printed)

        async def session() -> tuple[list[str], Any, str]:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})
            url = f"http://127.0.0.1:{port}/mcp"
            async with http, Client(streamable_http_client(url, http_client=http)) as client:
                names = sorted(tool.name for tool in (await client.list_tools()).tools)
                added = await client.call_tool("add_item", {"text": "from the test"})
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("delete_items", {})
                return names, added, str(refused.value)

        names, added, refusal = asyncio.run(session())
        assert "add_item" in names
        assert "delete_items" not in names
        assert added.is_error is False
        assert "mcp:admin" in refusal
        demo_children = _children(process.pid)
        assert demo_children
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    assert process.returncode == 0
    assert not [pid for pid in demo_children if Path(f"/proc/{pid}").exists()]
