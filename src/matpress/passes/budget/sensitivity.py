"""Per-layer sensitivity: for each layer and each candidate, its bytes and its estimated damage.

The cheap estimate is the relative output error on calibration activations,
``e = tr(dW H dW^T) / tr(W H W^T)`` with ``H = E[x x^T]`` (the identity without statistics), which is
``||X W^T - X Ŵ^T||^2 / ||X W^T||^2``. Layers differ in how much their output error reaches the model's
output, so each layer's estimates are scaled by a measured end-to-end weight: compress that layer alone
with a probe candidate, measure the model's distortion ``D`` (for example KL of the final output, or
1 - cosine of sentence embeddings), and use ``damage = e * D_probe / e_probe``. To first order the
distortions of several layers add up, which is what the allocator assumes.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import BudgetError, FormatError
from matpress.formats import Format
from matpress.methods import LayerStats, get_method
from matpress.nn.experts import starved_rule
from matpress.nn.layout import install_format, linear_weight, set_submodule
from matpress.recipe import Rule


def relative_output_error(weight: torch.Tensor, fmt: Format, stats: Optional[LayerStats]) -> float:
    """``||X (W - Ŵ)^T||^2 / ||X W^T||^2`` from the second moment of X (Frobenius without stats)."""
    w = weight.double()
    delta = w - fmt.decode().double()
    if stats is None:
        return float((delta * delta).sum() / (w * w).sum().clamp(min=1e-300))
    h = stats.hessian.double()
    return float(((delta @ h) * delta).sum() / ((w @ h) * w).sum().clamp(min=1e-300))


@dataclass
class SensitivityTable:
    """``nbytes[i][j]`` and ``error[i][j]`` of candidate ``j`` on layer ``i``; ``weight[i]`` scales layer
    ``i``'s errors to estimated end-to-end damage. ``allowed[i]`` lists the candidates layer ``i`` may use."""

    layers: list[str]
    n_weights: list[int]
    candidates: list[str]
    nbytes: list[list[int]]
    error: list[list[float]]
    weight: list[float]
    allowed: list[list[int]]
    probe: Optional[str] = None
    formats: dict[tuple[int, int], Format] = field(default_factory=dict, repr=False)

    def damage(self, i: int, j: int) -> float:
        return self.weight[i] * self.error[i][j]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("layers", "n_weights", "candidates", "nbytes", "error", "weight", "allowed", "probe")}

    @classmethod
    def from_dict(cls, data: Any) -> "SensitivityTable":
        """The table :meth:`to_dict` wrote; ValueError naming the first field that does not fit."""
        fields = ("layers", "n_weights", "candidates", "nbytes", "error", "weight", "allowed")
        if not isinstance(data, dict) or any(k not in data for k in fields) or set(data) - {*fields, "probe"}:
            raise ValueError(f"a sensitivity table has the fields {list(fields)} and optionally probe")
        n = _check_list(data["layers"], str, None, "layers")
        m = _check_list(data["candidates"], str, None, "candidates")
        _check_list(data["n_weights"], int, n, "n_weights")
        _check_list(data["weight"], float, n, "weight")
        for key, kind in (("nbytes", int), ("error", float), ("allowed", int)):
            _check_list(data[key], list, n, key)
            for i, row in enumerate(data[key]):
                _check_list(row, kind, None if key == "allowed" else m, f"{key}[{i}]")
        if any(not 0 <= j < m for row in data["allowed"] for j in row):
            raise ValueError(f"allowed holds a candidate index outside 0..{m - 1}")
        return cls(**data)


def _check_list(value: Any, kind: type, length: Optional[int], name: str) -> int:
    """The length of ``value``, a list of ``length`` items of ``kind`` (int for float; bool is neither)."""
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, list) or any(not isinstance(v, kinds) or isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a list of {kind.__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} has {len(value)} entries, expected {length}")
    return len(value)


def time_estimate(seconds: dict[tuple, float], kinds: Sequence[tuple]) -> str:
    """What the sensitivity pass will take: ``kinds`` (layer shape, method) of every encoding, from the
    time of one encoding of each kind."""
    total = sum(seconds[kind] for kind in kinds)
    return (
        f"sensitivity: {len(kinds)} encodings, about {total / 60:.1f} min on this machine "
        f"(timed one of each of the {len(seconds)} layer shapes and methods)"
    )


def measure_sensitivity(
    layers: dict[str, nn.Module],
    candidates: dict[str, Rule],
    allowed: dict[str, Sequence[str]],
    stats: Optional[dict[str, LayerStats]] = None,
    progress: bool = True,
    experts: frozenset[str] = frozenset(),
) -> SensitivityTable:
    """Encode every allowed candidate of every layer once (kept in ``table.formats`` for reuse) and
    measure its bytes and relative output error. The layers in ``experts`` (MoE expert matrices) short
    of calibration tokens are measured under the fallback they will be compressed with
    (:func:`matpress.nn.experts.starved_rule`)."""
    names = list(candidates)
    table = SensitivityTable(
        layers=list(layers),
        n_weights=[linear_weight(m).numel() for m in layers.values()],
        candidates=names,
        nbytes=[[0] * len(names) for _ in layers],
        error=[[float("nan")] * len(names) for _ in layers],
        weight=[1.0] * len(layers),
        allowed=[[names.index(c) for c in allowed[n]] for n in layers],
    )
    work = [(i, name, j) for i, name in enumerate(layers) for j in table.allowed[i]]
    kinds = [(tuple(linear_weight(layers[name]).shape), candidates[names[j]].method) for _, name, j in work]
    # one encoding of each kind (layer shape, method) first: their times give the estimate of the whole
    first = sorted({kind: k for k, kind in reversed(list(enumerate(kinds)))}.values())
    order = first + sorted(set(range(len(work))) - set(first))
    seconds: dict[tuple, float] = {}
    for step, k in enumerate(tqdm(order, desc="sensitivity", unit="candidate", disable=not progress)):
        i, name, j = work[k]
        rule = candidates[names[j]]
        weight = linear_weight(layers[name]).float()
        layer_stats = (stats or {}).get(name)
        if name in experts:
            rule = starved_rule(name, rule, layer_stats)[0]
        start = time.perf_counter()
        try:
            fmt: Optional[Format] = get_method(rule.method).run(weight, rule.params, layer_stats)
        except FormatError:
            fmt = None
        seconds.setdefault(kinds[k], time.perf_counter() - start)
        if progress and step == len(first) - 1:
            tqdm.write(time_estimate(seconds, kinds))
        if fmt is None:  # a candidate this layer's shape cannot take (e.g. blocks that do not divide it)
            table.allowed[i].remove(j)
            continue
        table.formats[(i, j)] = fmt
        table.nbytes[i][j] = fmt.nbytes
        table.error[i][j] = relative_output_error(weight, fmt, layer_stats)
    for i, name in enumerate(table.layers):
        if not table.allowed[i]:
            rows, cols = linear_weight(layers[name]).shape
            raise BudgetError(
                f"layer {name}: none of its candidates can encode a {rows}x{cols} weight; add a candidate such as dense fp16"
            )
    return table


def default_probe(table: SensitivityTable, target_error: float = 0.01) -> Optional[str]:
    """The candidate, allowed on most layers, whose typical error is nearest ``target_error`` (on a log
    scale): damaging enough to measure, small enough for the first-order (additive) regime."""
    best, best_key = None, None
    for j, label in enumerate(table.candidates):
        errors = [table.error[i][j] for i in range(len(table.layers)) if j in table.allowed[i] and table.error[i][j] > 0]
        if not errors:
            continue
        typical = statistics.median_high(errors)
        key = (-len(errors), abs(math.log(typical / target_error)))
        if best_key is None or key < best_key:
            best, best_key = label, key
    return best


def weigh_end_to_end(
    table: SensitivityTable,
    model: nn.Module,
    layers: dict[str, nn.Module],
    distortion: Callable[[nn.Module], float],
    probe: Optional[str] = None,
    progress: bool = True,
) -> None:
    """Set ``table.weight``: each layer, compressed alone with the probe candidate, is measured end to
    end, and its estimates are scaled so that the probe's estimated damage equals that measurement."""
    probe = probe or default_probe(table)
    if probe is None:
        return
    table.probe = probe
    p = table.candidates.index(probe)
    measured = []
    for i, name in enumerate(tqdm(table.layers, desc="end-to-end", unit="layer", disable=not progress)):
        if (i, p) not in table.formats or table.error[i][p] <= 0:
            continue
        original = layers[name]
        install_format(model, name, original, table.formats[(i, p)])
        try:
            table.weight[i] = max(distortion(model), 0.0) / table.error[i][p]
            measured.append(i)
        finally:
            set_submodule(model, name, original)
    if measured:  # layers the probe cannot encode (shape, allow list) take the typical measured weight
        typical = statistics.median_high(table.weight[i] for i in measured)
        for i in set(range(len(table.layers))) - set(measured):
            table.weight[i] = typical
