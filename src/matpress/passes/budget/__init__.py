"""Budgeted mixed compression: the best candidate per layer under a size budget.

1. Candidates: (method, parameters) pairs, from a preset or listed by the user (:mod:`matpress.recipe.budget`).
2. Sensitivity (:mod:`.sensitivity`): every allowed candidate of every layer, encoded once: its bytes and
   its estimated damage.
3. Allocation (:mod:`.allocate`): one candidate per layer, least total damage within the budget.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from matpress.errors import BudgetError, CheckpointError, RecipeError, quote
from matpress.evaluation import distortion_measure
from matpress.inputs import read_file
from matpress.methods import LayerStats, get_method
from matpress.nn.experts import is_expert
from matpress.nn.layout import find_linear_layers, install_format, linear_weight
from matpress.passes.budget.allocate import Option, allocate, cheapest_total
from matpress.passes.budget.sensitivity import (
    SensitivityTable,
    default_probe,
    measure_sensitivity,
    relative_output_error,
    weigh_end_to_end,
)
from matpress.passes.layers import CompressionReport, layer_report
from matpress.passes.sequential import compress_sequential
from matpress.recipe import Budget, Recipe, Rule, allowed_candidates, candidate_label, resolve_candidates
from matpress.walk.data import CalibrationData, calibration_data
from matpress.walk.stats import collect_stats

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
    calibration: Optional[CalibrationData] = None,
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
    calibration: Optional[CalibrationData] = None,
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
    calibration: Optional[CalibrationData] = None,
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
        calibration = calibration_data(recipe.calibration, tokenizer, model)
    candidates = resolve_candidates(recipe.candidates, calibrated=calibration is not None or stats is not None)
    names = list(chosen)
    pinned = {name: rule for name in names if (rule := recipe.pinned_rule(name)) is not None}
    allowed = allowed_candidates([n for n in names if n not in pinned], list(candidates), recipe.allow)
    for name, rule in pinned.items():  # explicit recipe rules win over allow entries
        label = "pinned-" + candidate_label(rule)
        candidates.setdefault(label, Rule(rule.method, rule.params))
        allowed[name] = [label]
    if stats is None and calibration is not None:
        stats = collect_stats(model, calibration, names, progress=progress)
    calibrated = sorted({candidates[c].method for n in names for c in allowed[n] if get_method(candidates[c].method).needs_calibration})
    if calibrated and stats is None:
        raise RecipeError(
            f"candidates using {calibrated} need calibration statistics: pass tokenizer= (or calibration=) to "
            "compress, or use the calibration-free preset 'quant'"
        )
    if distortion is None and tokenizer is not None:
        text_file = recipe.calibration.text_file if recipe.calibration is not None else None  # None: the built-in text
        distortion = distortion_measure(model, tokenizer, text_file=text_file)
    all_layers = find_linear_layers(model)
    budget = Budget.parse(recipe.budget)
    report, table, choice = compress_to_budget(
        model, {n: all_layers[n] for n in names}, candidates, budget, allowed, stats, distortion, None, progress, calibration
    )
    report.allocation = (table, choice, budget)
    return report


__all__ = [
    "SENSITIVITY",
    "SensitivityTable",
    "apply_choice",
    "choose",
    "compress_budgeted",
    "compress_to_budget",
    "default_probe",
    "load_allocation",
    "measure_sensitivity",
    "relative_output_error",
    "save_allocation",
    "weigh_end_to_end",
]
