"""The bundled demo server over a real socket and over stdio, driven by the real ``mcp`` client."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import mcp
import pytest
from mcp import Client

from sidecar.demo_server import http_app
from tests.conftest import serve

MODES = ["legacy", "auto"]
T = TypeVar("T")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The demo server served on a free port; its MCP endpoint."""
    with serve(http_app()) as base:
        yield f"{base}/mcp"


def _run(server: str | mcp.StdioServerParameters, mode: str, action: Callable[[Client], Awaitable[T]]) -> T:
    async def session() -> T:
        async with Client(server, mode=mode) as client:
            return await action(client)

    return asyncio.run(session())


async def _annotations(client: Client) -> dict[str, dict[str, Any]]:
    hints: dict[str, dict[str, Any]] = {}
    for tool in (await client.list_tools()).tools:
        hints[tool.name] = tool.annotations.model_dump(by_alias=True, exclude_none=True) if tool.annotations else {}
    return hints


@pytest.mark.parametrize("mode", MODES)
def test_lists_five_tools_with_their_annotations(url: str, mode: str) -> None:
    """tools/list names the five demo tools with the read/write/destructive hints the guard relies on."""
    assert _run(url, mode, _annotations) == {
        "list_items": {"readOnlyHint": True},
        "add_item": {"readOnlyHint": False, "destructiveHint": False},
        "delete_items": {"readOnlyHint": False, "destructiveHint": True},
        "echo": {"readOnlyHint": True},
        "slow_count": {"readOnlyHint": True},
    }


@pytest.mark.parametrize("mode", MODES)
def test_items_are_kept_per_tenant(url: str, mode: str) -> None:
    """Items added for one tenant_id are listed and deleted only for that tenant_id."""
    mine, theirs = f"acme-{mode}", f"globex-{mode}"

    async def action(client: Client) -> tuple[Any, ...]:
        await client.call_tool("add_item", {"tenant_id": mine, "text": "one"})
        added = await client.call_tool("add_item", {"tenant_id": mine, "text": "two"})
        await client.call_tool("add_item", {"tenant_id": theirs, "text": "private"})
        listed = await client.call_tool("list_items", {"tenant_id": mine})
        deleted = await client.call_tool("delete_items", {"tenant_id": mine})
        after = await client.call_tool("list_items", {"tenant_id": mine})
        other = await client.call_tool("list_items", {"tenant_id": theirs})
        return added, listed, deleted, after, other

    added, listed, deleted, after, other = _run(url, mode, action)
    assert added.structured_content == {"result": 2}
    assert listed.structured_content == {"result": ["one", "two"]}
    assert deleted.structured_content == {"result": 2}
    assert after.structured_content == {"result": []}
    assert other.structured_content == {"result": ["private"]}


@pytest.mark.parametrize("mode", MODES)
def test_echo_resource_and_prompt(url: str, mode: str) -> None:
    """echo returns its text, the readme resource reads, and the prompt names the tenant."""

    async def action(client: Client) -> tuple[Any, ...]:
        echoed = await client.call_tool("echo", {"text": "hi"})
        readme = await client.read_resource("demo://readme")
        prompt = await client.get_prompt("summarize_items", {"tenant_id": "acme"})
        return echoed, readme, prompt

    echoed, readme, prompt = _run(url, mode, action)
    assert echoed.structured_content == {"result": "hi"}
    assert "mcpguard demo server" in readme.contents[0].text
    assert "'acme'" in prompt.messages[0].content.text


@pytest.mark.parametrize("mode", MODES)
def test_progress_notifications_arrive_while_the_call_runs(url: str, mode: str) -> None:
    """slow_count's progress notifications reach the client one by one, not all at the end."""
    arrivals: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((progress, time.monotonic()))

    async def action(client: Client) -> tuple[Any, float]:
        result = await client.call_tool("slow_count", {"n": 5}, progress_callback=on_progress)
        return result, time.monotonic()

    result, finished = _run(url, mode, action)
    assert result.structured_content == {"result": 5}
    assert [progress for progress, _ in arrivals] == [1, 2, 3, 4, 5]
    # Four more 20 ms steps follow the first notification; a buffered stream would deliver it at the end.
    assert finished - arrivals[0][1] >= 0.04


def test_stdio_lists_tools_and_calls_echo() -> None:
    """Over stdio the demo server lists its tools and answers echo."""
    params = mcp.StdioServerParameters(command=sys.executable, args=["-m", "sidecar.demo_server", "--stdio"])

    async def action(client: Client) -> tuple[list[str], Any]:
        names = sorted(tool.name for tool in (await client.list_tools()).tools)
        return names, await client.call_tool("echo", {"text": "over stdio"})

    names, echoed = _run(params, "auto", action)
    assert names == ["add_item", "delete_items", "echo", "list_items", "slow_count"]
    assert echoed.structured_content == {"result": "over stdio"}
