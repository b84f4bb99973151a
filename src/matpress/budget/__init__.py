"""Budgeted mixed compression: the best candidate per layer under a size budget.

1. Candidates: (method, parameters) pairs, from a preset or listed by the user.
2. Sensitivity (:mod:`.sensitivity`): every allowed candidate of every layer, encoded once: its bytes and
   its estimated damage.
3. Allocation (:mod:`.allocate`): one candidate per layer, least total damage within the budget.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from torch import nn

from matpress.budget.allocate import Option, allocate, cheapest_total
from matpress.budget.sensitivity import (
    SensitivityTable,
    default_probe,
    measure_sensitivity,
    relative_output_error,
    weigh_end_to_end,
)
from matpress.errors import BudgetError, CheckpointError, RecipeError, quote
from matpress.experts import is_expert
from matpress.inputs import read_file
from matpress.methods import LayerStats, get_method
from matpress.model_pass import CompressionReport, find_linear_layers, install_format, layer_report, linear_weight
from matpress.recipe import Recipe, Rule, name_matches

if TYPE_CHECKING:
    from matpress.calibration import CalibrationData

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
    """Short readable name of a candidate, e.g. ``rtn-4b-g128``, ``rtn-3b-ch-sym``, ``dense-fp16``."""
    parts = [rule.method]
    for f in dataclasses.fields(rule.params):
        v = getattr(rule.params, f.name)
        if f.name == "bits":
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
        method = get_method(spec.pop("method", "rtn"), f"{where}[{i}]")
        rule = Rule(method.name, method.make_params(spec, f"{where}[{i}]"))
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


def _quant_lowrank(calibrated: bool) -> list[dict[str, Any]]:
    # EoRA: a low-bit int part plus an int8 low-rank correction fitted in the activation eigenspace,
    # its rank set by the bits per weight the factors may take (so one entry fits every layer shape)
    quantizer = {"quantizer": CALIBRATED_INT["method"]} if calibrated else {}
    return _quant(calibrated) + [
        {"method": "eora", "bits": b, "group_size": 128, "rank_bits": r, "factor_bits": 8, **quantizer}
        for b in (2, 3, 4)
        for r in (0.25, 0.5)
    ]


def _all(calibrated: bool) -> list[dict[str, Any]]:
    return (
        _quant_lowrank(calibrated)
        + [{"method": "sparsegpt", "sparsity": 0.5, "value_bits": b} for b in (4, 8)]
        + [{"method": "sparsegpt", "nm": "2:4", "value_bits": b} for b in (4, 8)]
        + [{"method": "ternary_calibrated", "group_size": g} for g in (64, 128)]
        + [{"method": "svd_llm", "rank_bits": b, "factor_bits": 8} for b in (2, 3, 4)]
        + [{"method": "monarch_aw", "nblocks": n} for n in (8, 16)]
    )


# Candidate sets by name; each gives a list of rules (as in a recipe), with or without calibration.
PRESETS: dict[str, Callable[[bool], list[dict[str, Any]]]] = {
    "quant": _quant,
    "quant+lowrank": _quant_lowrank,
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


def choose(table: SensitivityTable, budget: Budget, resolution: int = 20000) -> list[int]:
    """Candidate index per layer minimising the estimated damage within ``budget``."""
    options = [[Option(table.nbytes[i][j], table.damage(i, j)) for j in table.allowed[i]] for i in range(len(table.layers))]
    total = budget.bytes_for(sum(table.n_weights))
    try:
        picks = allocate(options, total, resolution)
    except BudgetError:
        minimum = cheapest_total(options)
        raise BudgetError(
            f"the budget {budget} ({total / 1e6:.3f} MB) is below the smallest reachable size "
            f"{minimum / 1e6:.3f} MB ({8 * minimum / sum(table.n_weights):.3f} bits per weight) with these candidates; "
            "raise the budget to at least that, or allow smaller candidates (e.g. --candidates all)"
        ) from None
    return [table.allowed[i][k] for i, k in enumerate(picks)]


def apply_choice(
    model: nn.Module,
    layers: dict[str, nn.Module],
    table: SensitivityTable,
    choice: Sequence[int],
    candidates: Optional[dict[str, Rule]] = None,
    calibration: Optional["CalibrationData"] = None,
    progress: bool = True,
) -> CompressionReport:
    """Replace each layer with its chosen candidate.

    Without ``calibration`` the formats encoded during the sensitivity pass are used as they are. With
    it (and the ``candidates`` rules), the chosen rules are re-run by the sequential block-by-block pass,
    so calibrated methods see the inputs of the already-compressed earlier layers, as GPTQ intends; a
    layer whose re-encoding came out larger than the size it was allocated (a rank picked by energy,
    say) takes back its measured format, so the budget holds.
    """
    if calibration is not None and candidates is not None:
        from matpress.calibration import compress_sequential

        chosen = {name: scales_in_format(candidates[table.candidates[choice[i]]]) for i, name in enumerate(table.layers)}
        reports = compress_sequential(model, chosen, calibration, progress=progress)
    else:
        reports = [None] * len(table.layers)
    for i, name in enumerate(table.layers):
        measured = table.formats[(i, choice[i])]
        if reports[i] is None or reports[i].nbytes > measured.nbytes:
            install_format(model, name, layers[name], measured)
            reports[i] = layer_report(name, linear_weight(layers[name]).float(), measured)
    return CompressionReport(reports)


def scales_in_format(rule: Rule) -> Rule:
    """``rule`` with AWQ's input scales kept in the format instead of folded into a neighbouring layer
    during the pass: a neighbour that falls back to its measured format (see apply_choice) was measured
    unscaled, so it must not be changed. Sensitivity is measured without folding either way."""
    return Rule(rule.method, dataclasses.replace(rule.params, fold=False)) if hasattr(rule.params, "fold") else rule


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


SENSITIVITY = "sensitivity.json"
MAX_ALLOCATION_BYTES = 64 << 20  # a table of 10,000 layers by 100 candidates is about 20 MB


def save_allocation(path: Union[str, Path], table: SensitivityTable, choice: Sequence[int], budget: Budget) -> None:
    """Write the sensitivity table with the chosen candidates (read by ``matpress report``)."""
    Path(path).write_text(json.dumps({"budget": str(budget), "choice": list(choice), "table": table.to_dict()}))


def load_allocation(path: Union[str, Path]) -> tuple[SensitivityTable, list[int], str]:
    """What :func:`save_allocation` wrote; a damaged file is a CheckpointError naming it."""
    path = Path(path)
    raw = read_file(path, "sensitivity table", MAX_ALLOCATION_BYTES, CheckpointError)
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {"budget", "choice", "table"}:
            raise ValueError("expected the keys budget, choice and table")
        table = SensitivityTable.from_dict(data["table"])
        choice = data["choice"]
        if not isinstance(choice, list) or len(choice) != len(table.layers) or any(
            not isinstance(j, int) or j not in allowed for j, allowed in zip(choice, table.allowed)
        ):
            raise ValueError("choice must give one allowed candidate index per layer")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path} is damaged ({quote(str(e))}); delete it (the checkpoint loads without it) or compress again"
        ) from None
    return table, choice, str(data["budget"])


def compress_to_budget(
    model: nn.Module,
    layers: dict[str, nn.Module],
    candidates: dict[str, Rule],
    budget: Budget,
    allowed: Optional[dict[str, Sequence[str]]] = None,
    stats: Optional[dict[str, LayerStats]] = None,
    distortion: Optional[Callable[[nn.Module], float]] = None,
    probe: Optional[str] = None,
    progress: bool = True,
    calibration: Optional["CalibrationData"] = None,
) -> tuple[CompressionReport, SensitivityTable, list[int]]:
    """Measure, allocate and apply; returns the report, the sensitivity table and the choice."""
    allowed = allowed or {name: list(candidates) for name in layers}
    table = measure_sensitivity(layers, candidates, allowed, stats, progress, frozenset(n for n in layers if is_expert(model, n)))
    if distortion is not None:
        weigh_end_to_end(table, model, layers, distortion, probe, progress)
    choice = choose(table, budget)
    report = apply_choice(model, layers, table, choice, candidates, calibration, progress)
    return report, table, choice


def compress_budgeted(
    model: nn.Module,
    recipe: Recipe,
    chosen: dict[str, Rule],
    stats: Optional[dict[str, LayerStats]] = None,
    distortion: Optional[Callable[[nn.Module], float]] = None,
    progress: bool = True,
    calibration: Optional["CalibrationData"] = None,
    tokenizer: Any = None,
) -> CompressionReport:
    """The budget path of :func:`matpress.compress`: layers matched by an explicit recipe rule keep it;
    every other selected layer gets the best of the recipe's candidates within ``recipe.budget``.

    With calibration text (``calibration``, or ``tokenizer`` and the recipe's calibration settings),
    errors are measured on the layers' real inputs (statistics of the uncompressed model), each layer's
    weight end to end is measured on the model's output, and the chosen rules are applied by the
    sequential calibrated pass. Without it, errors are plain weight errors. The report's ``allocation``
    holds the sensitivity table, the choice and the budget."""
    if calibration is None and tokenizer is not None:
        calibration = recipe.calibration_data(tokenizer, model)
    candidates = resolve_candidates(recipe.candidates, calibrated=calibration is not None or stats is not None)
    names = list(chosen)
    pinned = {name: rule for name in names if (rule := recipe.pinned_rule(name)) is not None}
    allowed = allowed_candidates([n for n in names if n not in pinned], list(candidates), recipe.allow)
    for name, rule in pinned.items():  # explicit recipe rules win over allow entries
        label = "pinned-" + candidate_label(rule)
        candidates.setdefault(label, Rule(rule.method, rule.params))
        allowed[name] = [label]
    if stats is None and calibration is not None:
        from matpress.calibration import collect_stats

        stats = collect_stats(model, calibration, names, progress=progress)
    calibrated = sorted({candidates[c].method for n in names for c in allowed[n] if get_method(candidates[c].method).needs_calibration})
    if calibrated and stats is None:
        raise RecipeError(
            f"candidates using {calibrated} need calibration statistics: pass tokenizer= (or calibration=) to "
            "compress, or use the calibration-free preset 'quant'"
        )
    if distortion is None and tokenizer is not None:
        from matpress.calibration import BUILTIN
        from matpress.evaluation import distortion_measure

        text = recipe.calibration.text if recipe.calibration is not None else None
        text_file = text if isinstance(text, str) and text != BUILTIN else None  # a file; else the built-in text
        distortion = distortion_measure(model, tokenizer, text_file=text_file)
    all_layers = find_linear_layers(model)
    budget = Budget.parse(recipe.budget)
    report, table, choice = compress_to_budget(
        model, {n: all_layers[n] for n in names}, candidates, budget, allowed, stats, distortion, None, progress, calibration
    )
    report.allocation = (table, choice, budget)
    return report


__all__ = [
    "compress_budgeted",
    "SENSITIVITY",
    "Budget",
    "SensitivityTable",
    "allowed_candidates",
    "apply_choice",
    "candidate_label",
    "candidate_rules",
    "choose",
    "compress_to_budget",
    "PRESETS",
    "load_allocation",
    "resolve_candidates",
    "default_probe",
    "measure_sensitivity",
    "weigh_end_to_end",
    "save_allocation",
    "relative_output_error",
]
