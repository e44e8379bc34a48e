"""The MCP key format: generation, strict parsing and the checksum."""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcpguard.errors import InvalidToken
from mcpguard.keys import generate_key, looks_like_key, parse_key

BASE62 = string.digits + string.ascii_letters
SHAPE = re.compile(r"mk_[0-9A-Za-z]{12}_[0-9A-Za-z]{43}[0-9A-Za-z]{6}")


def checksummed(body: str) -> str:
    """``body`` followed by its checksum as the key format defines it, computed independently here."""
    value = zlib.crc32(body.encode())
    digits = ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return body + digits


def test_generated_key_has_the_documented_shape() -> None:
    """A key is mk_ + 12-char id + _ + 43-char secret + 6-char checksum, all base62."""
    key_id, key = generate_key()
    assert SHAPE.fullmatch(key)
    assert key[3:15] == key_id
    assert len(key) == 65


def test_checksum_is_crc32_of_what_precedes_it() -> None:
    """The last six characters are the zero-padded base62 CRC32 of the rest, so scanners can check it."""
    _, key = generate_key()
    assert checksummed(key[:-6]) == key


def test_round_trip() -> None:
    """Parsing a generated key gives back its id and its secret."""
    key_id, key = generate_key()
    assert parse_key(key) == (key_id, key[16:59])


def test_keys_are_distinct() -> None:
    """Ids and secrets come from a CSPRNG: a few hundred keys never repeat either."""
    keys = [generate_key()[1] for _ in range(300)]
    assert len({key[3:15] for key in keys}) == len({key[16:59] for key in keys}) == 300


def test_looks_like_key() -> None:
    """Only a credential starting with mk_ is taken down the key path."""
    assert looks_like_key(generate_key()[1])
    assert looks_like_key("mk_anything")
    assert not looks_like_key("eyJhbGciOiJFZERTQSJ9.e30.sig")
    assert not looks_like_key("MK_" + generate_key()[1][3:])


@pytest.mark.threat("T-KEY-GUESS")
@given(position=st.integers(min_value=0, max_value=64), replacement=st.characters())
def test_any_single_substitution_refused(position: int, replacement: str) -> None:
    """Changing any one character of a key, to anything at all, makes it malformed."""
    _, key = generate_key()
    if key[position] == replacement:
        replacement = "0" if key[position] != "0" else "1"
    forged = key[:position] + replacement + key[position + 1 :]
    with pytest.raises(InvalidToken) as caught:
        parse_key(forged)
    assert caught.value.description == "malformed key"


@pytest.mark.threat("T-KEY-GUESS")
@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda k: "", id="empty"),
        pytest.param(lambda k: k[:-1], id="short"),
        pytest.param(lambda k: k + "0", id="long"),
        pytest.param(lambda k: "xk_" + k[3:], id="wrong-prefix"),
        pytest.param(lambda k: k.upper(), id="upper-case"),
        pytest.param(lambda k: k[:15] + "-" + k[16:], id="wrong-separator"),
        pytest.param(lambda k: " " + k[:-1], id="leading-space"),
        pytest.param(lambda k: k + "\n", id="trailing-newline"),
        pytest.param(lambda k: k[:20] + "\u0661" + k[21:], id="non-ascii-digit"),
        pytest.param(lambda k: k[:20] + "\u00e9" + k[21:], id="non-ascii-letter"),
        pytest.param(lambda k: k[:-6] + "000000", id="zeroed-checksum"),
        pytest.param(lambda k: "mk_" + k[16:59] + "_" + k[3:15] + k[-6:], id="id-and-secret-swapped"),
    ],
)
def test_wrong_shape_refused(mangle: Callable[[str], str]) -> None:
    """Wrong prefix, length, separator, alphabet or checksum is refused, with a message that echoes nothing."""
    _, key = generate_key()
    forged = mangle(key)
    with pytest.raises(InvalidToken) as caught:
        parse_key(forged)
    assert caught.value.description == "malformed key"


@pytest.mark.threat("T-KEY-GUESS")
def test_key_with_valid_checksum_but_wrong_alphabet_refused() -> None:
    """A string whose checksum matches but which uses characters outside base62 is still refused."""
    with pytest.raises(InvalidToken):
        parse_key(checksummed("mk_" + "-" * 12 + "_" + "a" * 43))
