"""Methods: algorithms that turn a dense weight (and, for calibrated ones, statistics of the layer's
inputs) into a :class:`~matpress.formats.Format`.

A method is registered with a frozen dataclass of its parameters; recipes are validated against that
dataclass, so an unknown key or a bad value fails when the recipe is read, not halfway through a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from matpress.errors import RecipeError, quote
from matpress.formats import Format
from matpress.recipe.rules import register_params, unknown_method


def check_int(name: str, value: object, minimum: int = 1, null: Optional[str] = None) -> None:
    """Refuse anything but an integer of at least ``minimum`` for parameter ``name`` (``True`` is not an
    integer here); ``null`` says what None means where None is allowed."""
    if null is not None and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "positive integer" if minimum == 1 else f"integer >= {minimum}" if minimum else "non-negative integer"
        raise ValueError(f"{name} must be a {kind}{f' or null ({null})' if null else ''}, got {quote(value)}")


def check_flag(name: str, value: object) -> None:
    """Refuse anything but ``true`` or ``false`` for parameter ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {quote(value)}")


@dataclass
class LayerStats:
    """Statistics of one linear layer's inputs, gathered on calibration data.

    ``xtx`` is the sum over calibration tokens of ``x x^T`` (``(in, in)``, fp32); ``n_tokens`` how many
    tokens contributed; ``abs_sum`` (optional) the sum of ``|x|`` per input channel (``(in,)``), the
    activation magnitude AWQ scales by. Padding tokens are masked out before they are added.
    """

    xtx: torch.Tensor
    n_tokens: int
    abs_sum: Optional[torch.Tensor] = None

    @property
    def hessian(self) -> torch.Tensor:
        """Mean second moment ``E[x x^T]`` (the layer-wise quantization Hessian up to a factor 2)."""
        return self.xtx / max(self.n_tokens, 1)

    @property
    def mean_abs(self) -> Optional[torch.Tensor]:
        """Mean ``|x|`` per input channel, when ``abs_sum`` was collected."""
        return None if self.abs_sum is None else self.abs_sum / max(self.n_tokens, 1)


MethodFn = Callable[[torch.Tensor, Any, Optional[LayerStats]], Format]


@dataclass(frozen=True)
class Method:
    name: str
    params_type: type
    run: MethodFn
    needs_calibration: bool
    summary: str

    def make_params(self, values: dict[str, Any], where: str) -> Any:
        """Build (and validate) this method's parameter dataclass from plain data."""
        fields = {f.name for f in dataclasses.fields(self.params_type)}
        unknown = sorted(set(values) - fields, key=str)
        if unknown:
            raise RecipeError(
                f"{where}: unknown parameter(s) {quote(unknown)} for method '{self.name}'; "
                f"it takes {sorted(fields)}"
            )
        try:
            return self.params_type(**values)
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{where}: bad parameters for method '{self.name}': {e}") from None


METHODS: dict[str, Method] = {}


def register_method(
    name: str, params_type: type, needs_calibration: bool = False
) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(weight, params, stats) -> Format`` as method ``name``."""

    def wrap(fn: MethodFn) -> MethodFn:
        if name in METHODS:
            raise RecipeError(f"method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, params_type, fn, needs_calibration, summary)
        register_params(name, METHODS[name].make_params)  # recipes validate against it from now on
        return fn

    return wrap


def get_method(name: str, where: Optional[str] = None) -> Method:
    """The method registered as ``name``; ``where`` (a recipe and its rule) prefixes the error."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list) given as the name
        raise unknown_method(name, where) from None
