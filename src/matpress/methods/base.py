"""Methods: algorithms that turn a dense weight (and, for calibrated ones, statistics of the layer's
inputs) into a :class:`~matpress.formats.Format`.

A method is registered with a frozen dataclass of its parameters; recipes are validated against that
dataclass, so an unknown key or a bad value fails when the recipe is read, not halfway through a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from matpress.errors import RecipeError, quote
from matpress.formats import Format
from matpress.recipe.rules import Rule, register_params, unknown_method


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
    # sum of x_ref x^T, x_ref the layer's input at the same token in the uncompressed model (in, in):
    # collected by a sequential pass whose rules ask for the asymmetric target, None otherwise
    cross: Optional[torch.Tensor] = None
    # the sums of x x^T and x_ref x^T, and the tokens, of every other calibration batch (the first,
    # third, ...): with the rest they are two folds, for choices fitted on one half and checked on the other
    fold: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None

    @property
    def hessian(self) -> torch.Tensor:
        """Mean second moment ``E[x x^T]`` (the layer-wise quantization Hessian up to a factor 2)."""
        return self.xtx / max(self.n_tokens, 1)

    @property
    def reference_moment(self) -> Optional[torch.Tensor]:
        """Mean ``E[x_ref x^T]`` over the calibration tokens, or None without ``cross``."""
        return None if self.cross is None else self.cross / max(self.n_tokens, 1)

    @property
    def mean_abs(self) -> Optional[torch.Tensor]:
        """Mean ``|x|`` per input channel, when ``abs_sum`` was collected."""
        return None if self.abs_sum is None else self.abs_sum / max(self.n_tokens, 1)


MethodFn = Callable[[torch.Tensor, Any, Optional[LayerStats]], Format]


class BlockView(Protocol):
    """What a method's block hook sees of one block of the model, before the block's layers are
    compressed (the walk gives it, :class:`matpress.walk.walker.TracedBlock`): ``stages``, the block's
    layers to compress by shared input (model names, in execution order), and ``calls``, one traced run
    of the block on a calibration batch (each call has ``name``, local to the block, ``module``, and its
    first ``input`` and ``output`` tensors, in order of completion)."""

    stages: list[list[str]]
    calls: list[Any]

    def layer(self, name: str) -> nn.Module:
        """The module of layer ``name``."""

    def call_of(self, name: str) -> Optional[Any]:
        """The traced call of layer ``name`` (its last, if it ran twice), or None if it did not run."""

    def run(self) -> torch.Tensor:
        """The block's output on the traced batch, as the block is now."""

    def stats(self, names: list[str]) -> dict[str, LayerStats]:
        """Input statistics of the layers ``names`` on the calibration data, as the block is now."""

    def is_linear(self, module: nn.Module) -> bool:
        """Whether ``module`` is a linear layer (nn.Linear or Conv1D)."""

    def weight(self, module: nn.Module) -> torch.Tensor:
        """A linear layer's weight as ``(out, in)``."""

    def scale_rows(self, module: nn.Module, s: torch.Tensor) -> None:
        """Divide a module's output channels by ``s`` (a norm's weight, a linear layer's rows)."""

    def scale_inputs(self, module: nn.Module, s: torch.Tensor) -> None:
        """Multiply a linear layer's input columns by ``s``."""


# (the block, the rules of the block's layers) -> the rules it changed, after changing the block
BlockHook = Callable[[BlockView, dict[str, Rule]], dict[str, Rule]]


@dataclass(frozen=True)
class Method:
    """A registered method. ``block_hook``: a block-level step of the algorithm (AWQ folds its scales
    into neighbouring layers), run by the walk on each block holding a layer under this method, before
    the block's layers are compressed."""

    name: str
    params_type: type
    run: MethodFn
    needs_calibration: bool
    summary: str
    block_hook: Optional[BlockHook] = None

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


def register_block_hook(name: str, hook: BlockHook) -> None:
    """Give method ``name`` (registered) a block-level step, see :class:`Method`."""
    METHODS[name] = dataclasses.replace(get_method(name), block_hook=hook)


def get_method(name: str, where: Optional[str] = None) -> Method:
    """The method registered as ``name``; ``where`` (a recipe and its rule) prefixes the error."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list) given as the name
        raise unknown_method(name, where) from None
