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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from matpress.formats import Format
from matpress.methods import LayerStats


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
