"""Layer-name patterns: shell-style globs on a layer's qualified name, or regular expressions when
prefixed with ``re:``."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from matpress.errors import RecipeError, quote


def name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns(value: Any, where: str) -> tuple[str, ...]:
    """``value`` (a pattern or a list of them) as a tuple of patterns, regular expressions compiled once
    to refuse bad ones."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(f"{where} must be a list of name patterns (strings)")
    for p in value:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise RecipeError(f"{where}: bad regular expression {quote(p)}: {e}") from None
    return tuple(value)
