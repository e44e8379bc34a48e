"""Reading JSON that came from outside (a client, an upstream, a setting) without letting it crash the reader.

Python's parser raises ``RecursionError``, not ``ValueError``, for JSON nested a thousand levels or so, and
``except ValueError`` lets that through as a server error. ``read_json`` reports it as the ``ValueError``
it is for the caller: input that cannot be read. JSON can also spell a lone surrogate (``"\\ud800"``), which
no UTF-8 can hold: ``is_text`` tells such a string apart before it reaches a header, a log or a database.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["NestedTooDeep", "is_text", "read_json"]


class NestedTooDeep(ValueError):
    """JSON nested deeper than Python's parser can go."""


def read_json(data: str | bytes | bytearray) -> Any:
    """``json.loads(data)``, with nesting too deep to parse raised as ``NestedTooDeep`` (a ``ValueError``)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise NestedTooDeep("JSON nested deeper than it can be read") from None


def is_text(value: str) -> bool:
    """Whether ``value`` holds no lone surrogate, so UTF-8 (a header, a database, an OTLP export) can carry it."""
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
