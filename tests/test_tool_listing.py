"""Reading the upstream's own tools/list: an answer the guard cannot read is a listing error, never a guess."""

from __future__ import annotations

import asyncio

import pytest

from mcpguard import ListingError, tool_lister


@pytest.mark.threat("T-DEEP-JSON")
@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_answer_nested_too_deep_to_parse_is_a_listing_error(content_type: str) -> None:
    """JSON nested past what the parser can go fails the listing (so unlisted tools stay admin-only)."""
    deep = b"[" * 5000 + b"]" * 5000
    body = b"data: " + deep + b"\n\n" if content_type == "text/event-stream" else deep
    asked: list[bytes] = []

    async def exchange(method: str, headers: dict[str, str], sent: bytes) -> tuple[int, dict[str, str], bytes]:
        asked.append(sent)
        return 200, {"content-type": content_type}, body

    with pytest.raises(ListingError, match="not JSON"):
        asyncio.run(tool_lister(exchange)(None))
    assert any(b'"tools/list"' in sent for sent in asked)
