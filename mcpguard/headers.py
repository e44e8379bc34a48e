"""A request's headers indexed by lower-case name, so a layer's look-up is one read rather than a pass over all."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["HeaderIndex", "header_index", "response_content_type"]

# Each lower-case name's values, in the order they were sent.
HeaderIndex = dict[bytes, list[bytes]]


def header_index(headers: Iterable[tuple[bytes, bytes]]) -> HeaderIndex:
    """``headers`` by lower-case name (whatever case they came in), each name's values in the order sent."""
    index: HeaderIndex = {}
    for name, value in headers:
        name = name.lower()
        values = index.get(name)
        if values is None:
            index[name] = [value]
        else:
            values.append(value)
    return index


def response_content_type(start: Mapping[str, Any]) -> bytes:
    """The lower-cased ``Content-Type`` of an ``http.response.start`` message (its last, if sent twice), or ``b""``."""
    content_type = b""
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            content_type = value.lower()
    return content_type
