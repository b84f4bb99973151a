"""Rules: a method name with its validated parameters, for the layers a pattern names.

A method's parameters are a frozen dataclass defined with the method (:mod:`matpress.methods`), which
registers a maker for them here (:func:`register_params`) when it is imported; so recipes are validated
as they are read, against every known method, while this layer imports nothing above it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

from matpress.errors import RecipeError, quote

ParamsMaker = Callable[[dict[str, Any], str], Any]  # (plain values, where) -> validated parameters

METHOD_PARAMS: dict[str, ParamsMaker] = {}  # method name -> its parameter maker, see register_params


def register_params(method: str, maker: ParamsMaker) -> None:
    """Make recipes accept method ``method``, its parameters built and validated by ``maker``."""
    METHOD_PARAMS[method] = maker


def unknown_method(name: Any, where: Optional[str]) -> RecipeError:
    """The error for a method name no method is registered under; ``where`` prefixes it."""
    prefix = f"{where}: " if where else ""
    return RecipeError(f"{prefix}unknown method {quote(name)}; known methods: {sorted(METHOD_PARAMS)}")


def method_params(method: Any, values: dict[str, Any], where: str) -> Any:
    """Method ``method``'s validated parameters from the plain ``values``."""
    try:
        maker = METHOD_PARAMS[method]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list) given as the name
        raise unknown_method(method, where) from None
    return maker(values, where)


@dataclass(frozen=True)
class Rule:
    """A method with its validated parameters, for the layers whose name matches ``pattern``."""

    method: str
    params: Any
    pattern: str = "*"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {} if self.pattern == "*" else {"pattern": self.pattern}
        d["method"] = self.method
        d.update(dataclasses.asdict(self.params))
        return d


def build_rule(values: dict[str, Any], base: Optional[Rule], where: str) -> Rule:
    """A rule from plain ``values``; a rule naming ``base``'s method starts from ``base``'s parameters,
    one naming another method from that method's defaults."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: a rule must be a mapping, got {type(values).__name__}")
    values = dict(values)
    pattern = values.pop("pattern", "*")
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"{where}: 'pattern' must be a non-empty string")
    method_name = values.pop("method", base.method if base else "rtn")
    merged: dict[str, Any] = {}
    if base is not None and base.method == method_name:
        merged.update(dataclasses.asdict(base.params))
    merged.update(values)
    return Rule(method_name, method_params(method_name, merged, where), pattern)
