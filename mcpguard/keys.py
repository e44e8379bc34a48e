"""The MCP key format: ``mk_<id>_<secret><checksum>``, whose CRC32 lets secret scanners spot leaked keys.

The id is 12 base62 characters, the secret 43 (62**43 > 2**256, so at least 256 bits) and the checksum
is the CRC32 of everything before it as 6 base62 digits (62**6 > 2**32). Parsing is strict and cheap:
a key of the wrong shape or checksum is refused before anything costly runs.
"""

from __future__ import annotations

import re
import secrets
import string
import zlib

from mcpguard.errors import InvalidToken

__all__ = ["generate_key", "looks_like_key", "parse_key"]

_PREFIX = "mk_"
_ALPHABET = string.digits + string.ascii_letters
_ID_LENGTH = 12
_SECRET_LENGTH = 43
_CHECKSUM_LENGTH = 6
_KEY_LENGTH = len(_PREFIX) + _ID_LENGTH + 1 + _SECRET_LENGTH + _CHECKSUM_LENGTH
# Explicit ASCII ranges: `\w` or `\d` would also accept non-ASCII letters and digits.
_SHAPE = re.compile(
    f"{_PREFIX}([0-9A-Za-z]{{{_ID_LENGTH}}})_([0-9A-Za-z]{{{_SECRET_LENGTH}}})([0-9A-Za-z]{{{_CHECKSUM_LENGTH}}})"
)


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        value, digit = divmod(value, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def generate_key() -> tuple[str, str]:
    """A new key as ``(key_id, key)``; the key is the only copy of its secret."""
    key_id = _random(_ID_LENGTH)
    body = f"{_PREFIX}{key_id}_{_random(_SECRET_LENGTH)}"
    return key_id, body + _checksum(body)


def parse_key(presented: str) -> tuple[str, str]:
    """Split a presented key into ``(key_id, secret)``, or raise ``InvalidToken`` if its shape or checksum is wrong."""
    match = _SHAPE.fullmatch(presented) if len(presented) == _KEY_LENGTH else None
    if match is None or _checksum(presented[:-_CHECKSUM_LENGTH]) != match[3]:
        raise InvalidToken("malformed key")
    return match[1], match[2]


def looks_like_key(presented: str) -> bool:
    """Whether a credential claims to be an MCP key (and should be checked as one rather than as a token)."""
    return presented.startswith(_PREFIX)
