"""The server's own tool annotations, cached, so ``tools/call`` is scoped by what the server declares."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ["ToolCatalog", "ToolLister"]

logger = logging.getLogger("mcpguard.tools")

ToolLister = Callable[[str | None], Awaitable[list[Mapping[str, Any]]]]
"""Fetches the server's complete ``tools/list`` (all pages); the argument is the Host to present."""


class ToolCatalog:
    """Annotations by tool name: fetched on first need, refreshed after ``ttl``, on ``invalidate()``
    (``list_changed``), and when an unknown tool is called, at most once per ``min_refresh``."""

    def __init__(
        self,
        lister: ToolLister | None,
        *,
        ttl: float = 300.0,
        min_refresh: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lister = lister
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._clock = clock
        self._tools: dict[str, Mapping[str, Any] | None] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Forget the cached list; the next lookup fetches it again."""
        self._fetched_at = None
        self._attempted_at = None

    async def lookup(self, name: str, *, host: str | None = None) -> tuple[bool, Mapping[str, Any] | None]:
        """Whether the server lists ``name``, and its annotations."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._ttl
        if stale or name not in self._tools:
            await self._refresh(host, force_unknown=not stale)
        if name in self._tools:
            return True, self._tools[name]
        return False, None

    async def _refresh(self, host: str | None, *, force_unknown: bool) -> None:
        if self._lister is None:
            return
        async with self._lock:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh:
                return
            if not force_unknown and self._fetched_at is not None and now - self._fetched_at < self._ttl:
                return
            self._attempted_at = now
            # Any failure keeps the last good list; tools it does not know need admin (fail closed).
            try:
                tools = await self._lister(host)
            except Exception as exc:
                logger.warning("could not list the server's tools (%s); unknown tools need admin", type(exc).__name__)
                return
            fresh: dict[str, Mapping[str, Any] | None] = {}
            for tool in tools:
                name = tool.get("name")
                annotations = tool.get("annotations")
                if isinstance(name, str):
                    # A name listed twice keeps no annotations (needs admin): which entry the server runs is unknown.
                    listed_before = name in fresh
                    fresh[name] = annotations if isinstance(annotations, Mapping) and not listed_before else None
            self._tools = fresh
            self._fetched_at = now
