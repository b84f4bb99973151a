"""Size budgets and the candidates a budget chooses among, as plain data: a budget (``3.2bpw``,
``40MB``), candidate rules from a preset or a list, their labels, and which candidates a layer may use.
The choice itself is made by :mod:`matpress.passes.budget`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union, Optional

from matpress.errors import BudgetError, RecipeError, quote
from matpress.recipe.patterns import name_matches
from matpress.recipe.rules import Rule, method_params

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bpw|bytes|b|kb|mb|gb|kib|mib|gib)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "bytes": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A size budget for the selected linear layers' weights (embeddings, biases and excluded layers
    are not counted): average bits per weight (``3.2bpw``) or bytes (``4MB``, ``12MiB``, ``500000B``)."""

    bits_per_weight: Optional[float] = None
    nbytes: Optional[int] = None

    @classmethod
    def parse(cls, text: Union[str, "Budget"]) -> "Budget":
        if isinstance(text, Budget):
            return text
        m = _BUDGET.match(str(text))
        if not m:
            raise BudgetError(
                f"cannot read the budget {quote(text)}: give a number with its unit, e.g. '3.2bpw', '4MB', '12MiB' "
                "or '500000B'"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
        if value <= 0:
            raise BudgetError(f"the budget must be positive, got {quote(text)}")
        if unit == "bpw":
            return cls(bits_per_weight=value)
        nbytes = int(value * _UNITS[unit])
        if nbytes < 1000:
            raise BudgetError(f"a budget of {nbytes} bytes is too small for any layer; did you mean '{m.group(1)}bpw'?")
        return cls(nbytes=nbytes)

    def bytes_for(self, n_weights: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.bits_per_weight * n_weights / 8)

    def __str__(self) -> str:
        return f"{self.bits_per_weight:g}bpw" if self.nbytes is None else f"{self.nbytes}B"


def candidate_label(rule: Rule) -> str:
    """Short readable name of a candidate, e.g. ``rtn-4b-g128``, ``rtn-3b-ch-sym``, ``dense-fp16``,
    ``gptq-q4_k`` (a K-quant grid replaces bits, group and symmetry)."""
    parts = [rule.method]
    kquant = getattr(rule.params, "kquant", None)
    for f in dataclasses.fields(rule.params):
        v = getattr(rule.params, f.name)
        if kquant is not None and f.name in ("bits", "group_size", "symmetric"):
            continue
        if f.name == "kquant":
            if v is not None:
                parts.append(v)
        elif f.name == "bits":
            parts.append(f"{v}b")
        elif f.name == "group_size":
            parts.append("ch" if v is None else f"g{v}")
        elif f.name == "symmetric":
            if v:
                parts.append("sym")
        elif f.name == "dtype":
            parts.append(str(v))
        elif v != f.default:
            parts.append(f.name if v is True else f"{f.name}={v}")
    return "-".join(parts)


def candidate_rules(specs: Sequence[dict[str, Any]], where: str = "candidates") -> dict[str, Rule]:
    """Validated candidate rules keyed by label, from plain dicts such as ``{"method": "rtn", "bits": 3}``."""
    rules: dict[str, Rule] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}[{i}] must be a mapping with a 'method'")
        spec = dict(spec)
        method = spec.pop("method", "rtn")
        rule = Rule(method, method_params(method, spec, f"{where}[{i}]"))
        rules[candidate_label(rule)] = rule
    if not rules:
        raise RecipeError(f"{where}: no candidates given")
    return rules


# The integer quantizer each preset uses: GPTQ with act-order and randomized Hadamard rotation when
# calibration text is at hand (the best 3- and 4-bit method in benchmarks/results/quality.md), RTN otherwise.
CALIBRATED_INT: dict[str, Any] = {"method": "gptq", "act_order": True, "rotate": True}
PLAIN_INT: dict[str, Any] = {"method": "rtn"}


def _quant(calibrated: bool) -> list[dict[str, Any]]:
    base = CALIBRATED_INT if calibrated else PLAIN_INT
    return [{**base, "bits": b, "group_size": g} for b in (2, 3, 4, 5, 6, 8) for g in (64, 128, None)] + [
        {"method": "dense", "dtype": "fp16"}
    ]


def _quant_fast(calibrated: bool) -> list[dict[str, Any]]:
    # a quarter of quant's integer candidates (2, 3, 4, 8 bits, groups of 128): a quarter of its
    # sensitivity encodings, the part of a budgeted run that grows with the candidates
    base = CALIBRATED_INT if calibrated else PLAIN_INT
    return [{**base, "bits": b, "group_size": 128} for b in (2, 3, 4, 8)] + [{"method": "dense", "dtype": "fp16"}]


def _quant_lowrank(calibrated: bool) -> list[dict[str, Any]]:
    # EoRA: a low-bit int part plus an int8 low-rank correction fitted in the activation eigenspace,
    # its rank set by the bits per weight the factors may take (so one entry fits every layer shape)
    quantizer = {"quantizer": CALIBRATED_INT["method"]} if calibrated else {}
    return _quant(calibrated) + [
        {"method": "eora", "bits": b, "group_size": 128, "rank_bits": r, "factor_bits": 8, **quantizer}
        for b in (2, 3, 4)
        for r in (0.25, 0.5)
    ]


# Codebook candidates: non-uniform tables (the fixed Lloyd-Max Gaussian one) with a scale per 32 or 64
# columns, onto which GPTQ rounds with calibration text (with act-order and rotation, as the int ones).
CALIBRATED_CODEBOOK: dict[str, Any] = {"method": "gptq_codebook", "table": "nl", "act_order": True, "rotate": True}
PLAIN_CODEBOOK: dict[str, Any] = {"method": "codebook", "table": "nl"}


def _codebook(calibrated: bool) -> list[dict[str, Any]]:
    base = CALIBRATED_CODEBOOK if calibrated else PLAIN_CODEBOOK
    return [{**base, "bits": b, "group_size": g} for b in (2, 3, 4) for g in (32, 64)]


def _quant_codebook(calibrated: bool) -> list[dict[str, Any]]:
    return _quant(calibrated) + _codebook(calibrated)


# GGUF's block types, each as the candidate whose codes export to it exactly (``matpress export --to
# gguf``): the legacy types in blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), the K-quants (a layer whose
# rows are not a multiple of 256 takes the legacy type llama.cpp falls back to), IQ4_NL, F16. GPTQ with
# act-order but no rotation: GGUF applies no input transform, so a rotated layer could not be exported.
GGUF_LEGACY_GRIDS = ((4, True), (4, False), (5, True), (5, False), (8, True))  # (bits, symmetric)
GGUF_KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _gguf(calibrated: bool) -> list[dict[str, Any]]:
    base = {"method": "gptq", "act_order": True} if calibrated else PLAIN_INT
    codebook = {"method": "gptq_codebook", "act_order": True} if calibrated else {"method": "codebook"}
    return (
        [{**base, "bits": b, "group_size": 32, "symmetric": s} for b, s in GGUF_LEGACY_GRIDS]
        + [{**base, "kquant": k} for k in GGUF_KQUANTS]
        + [{**codebook, "table": "iq4nl", "bits": 4, "group_size": 32}, {"method": "dense", "dtype": "fp16"}]
    )


def _all(calibrated: bool) -> list[dict[str, Any]]:
    return (
        _quant_lowrank(calibrated)
        + _codebook(calibrated)
        + [{"method": "sparsegpt", "sparsity": 0.5, "value_bits": b} for b in (4, 8)]
        + [{"method": "sparsegpt", "nm": "2:4", "value_bits": b} for b in (4, 8)]
        + [{"method": "ternary_calibrated", "group_size": g} for g in (64, 128)]
        + [{"method": "svd_llm", "rank_bits": b, "factor_bits": 8} for b in (2, 3, 4)]
        + [{"method": "monarch_aw", "nblocks": n} for n in (8, 16)]
    )


# Candidate sets by name; each gives a list of rules (as in a recipe), with or without calibration.
PRESETS: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "quant": _quant,
    "quant-fast": _quant_fast,
    "quant+lowrank": _quant_lowrank,
    "quant+codebook": _quant_codebook,
    "gguf": _gguf,
    "all": _all,
}


def resolve_candidates(
    spec: Union[str, Sequence[dict[str, Any]]], where: str = "candidates", calibrated: bool = False
) -> dict[str, Rule]:
    """Candidate rules from a preset name (``calibrated``: with calibration statistics at hand) or a
    list of rule dicts."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise RecipeError(f"{where}: unknown candidate preset {quote(spec)}; presets: {sorted(PRESETS)}")
        spec = PRESETS[spec](calibrated)
    if not isinstance(spec, (list, tuple)):
        raise RecipeError(f"{where}: give a preset name {sorted(PRESETS)} or a list of rules")
    return candidate_rules(spec, where)


def allowed_candidates(
    layer_names: Sequence[str], labels: Sequence[str], allow: Sequence[dict[str, Any]] = ()
) -> dict[str, list[str]]:
    """Which candidates each layer may use: all of them, unless an ``allow`` entry
    ``{"pattern": "*.value", "candidates": ["rtn-8b*", ...]}`` matches the layer (first match wins)."""
    result = {}
    for name in layer_names:
        allowed = list(labels)
        for k, entry in enumerate(allow):
            if name_matches(entry["pattern"], name):
                allowed = [c for c in labels if any(name_matches(p, c) for p in entry["candidates"])]
                if not allowed:
                    raise RecipeError(f"allow[{k}] leaves layer {name} no candidate among {list(labels)}")
                break
        result[name] = allowed
    return result
