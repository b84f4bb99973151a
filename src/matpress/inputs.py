"""Files and data a user hands over (recipes, calibration and evaluation text): read with a size bound,
refused with a message naming the file rather than crashing or silently reading something else.

Text must be UTF-8 (a UTF-8 byte-order mark is dropped). A file with a NUL byte, or where more than
1 % of the characters are undecodable bytes or control characters other than tab, newline, carriage
return and form feed, is binary and refused; UTF-16/UTF-32 text (NUL bytes between ASCII letters) is
refused with the advice to convert it. A few stray bad bytes in otherwise good text are replaced.
"""

from __future__ import annotations

import json
import os
import stat
from itertools import chain
from pathlib import Path
from typing import Any, Union

from matpress.errors import MatpressError, quote

MAX_BAD_SHARE = 0.01  # undecodable bytes or control characters, as a share of all characters
REPLACEMENT = "\ufffd"
_END = object()
_CONTROL = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\t\n\r\f"]


def read_file(
    path: Union[str, Path], what: str, limit: int, error: type[MatpressError],
    reason: str = "bytes matpress reads", advice: str = "pass a smaller file",
) -> bytes:
    """The bytes of the regular file at ``path`` (a ``what``, e.g. "recipe file"), refused before it is
    read when it holds more than ``limit`` bytes (the ``reason`` for the limit and the ``advice`` end the
    message); a missing path, a directory, a FIFO or device (whose read could block forever) or an
    unreadable file raises ``error`` naming the file."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not hang
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e}); check the path and its permissions") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{what} {path} is a directory; pass a file")
        raise error(f"{what} {path} is not a regular file (a FIFO, socket or device); pass a file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limit:
            raise error(f"{what} {path} holds {info.st_size:,} bytes, more than the {limit:,} {reason}; {advice}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{what} {path} cannot be read ({e.strerror or e}); check the path and its permissions") from None
    if len(data) > limit:
        raise error(f"{what} {path} grew past {limit:,} bytes while being read")
    return data


def json_object(data: bytes, where: str, damaged: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object; anything else is a MatpressError naming ``where`` (a file) and
    ending with ``damaged`` (what that means for the user)."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MatpressError(f"{where} is not valid JSON ({quote(str(e))}); {damaged}") from None
    if not isinstance(value, dict):
        raise MatpressError(f"{where} holds {type(value).__name__}, not a JSON object; {damaged}")
    return value


def decode_text(data: bytes, where: str, error: type[MatpressError]) -> str:
    """``data`` as UTF-8 text (see the module's rules); ``where`` names its origin in the message."""
    if b"\x00" in data:
        raise error(
            f"{where} contains NUL bytes: it is binary or UTF-16/UTF-32 text, not UTF-8; pass a UTF-8 text file "
            "(convert with e.g. `iconv -f UTF-16 -t UTF-8`)"
        )
    text = data.decode("utf-8-sig", errors="replace")
    # a genuine U+FFFD in the file is text, not a decoding error
    undecodable = text.count(REPLACEMENT) - data.count(REPLACEMENT.encode())
    if undecodable > MAX_BAD_SHARE * len(text):
        raise error(
            f"{where} is not UTF-8 text ({undecodable} of {len(text)} characters undecodable): it looks binary "
            "or in another encoding; pass a UTF-8 text file"
        )
    check_text(text, where, error)
    return text


def check_text(text: str, where: str, error: type[MatpressError]) -> None:
    """Refuse ``text`` holding a NUL or more than 1 % control characters (other than tab, newline, CR, FF)."""
    controls = sum(text.count(c) for c in _CONTROL)
    if "\x00" in text or controls > MAX_BAD_SHARE * len(text):
        raise error(
            f"{where} is not text: {controls} of {len(text)} characters are control characters; pass prose "
            "in UTF-8"
        )


def check_plain_data(data: Any, where: str, error: type[MatpressError], max_items: int, max_depth: int) -> None:
    """Refuse nested lists and dicts deeper than ``max_depth`` or with more than ``max_items`` values in
    all, counting a shared value (a YAML alias) each time it is reached, so an alias bomb or a
    self-referencing value is refused after at most ``max_items`` steps."""
    stack = [iter((data,))]  # one iterator per open container: a huge list is never copied
    seen = 0
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
            continue
        seen += 1
        if seen > max_items:
            raise error(
                f"{where} holds more than {max_items:,} values (YAML aliases count each time they are used); "
                "write it out plainly, without aliases that repeat large parts"
            )
        if isinstance(value, (list, tuple, dict)):
            if len(stack) > max_depth:
                raise error(f"{where} is nested more than {max_depth} levels deep, more than matpress accepts; flatten it")
            stack.append(chain.from_iterable(value.items()) if isinstance(value, dict) else iter(value))
