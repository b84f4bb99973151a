"""Budgeted mixed compression: the best candidate per layer under a size budget.

1. Candidates: (method, parameters) pairs, from a preset or listed by the user (:mod:`matpress.recipe.budget`).
2. Sensitivity (:mod:`.sensitivity`, measured over a walk by :class:`.measurement.BudgetMeasurement`):
   every allowed candidate of every layer, encoded once: its bytes and its estimated damage.
3. Allocation (:mod:`.allocate`): one candidate per layer, least total damage within the budget; then
   the chosen candidates are applied over a walk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from torch import nn

from matpress.errors import BudgetError, CheckpointError, RecipeError, quote
from matpress.evaluation import distortion_measure
from matpress.inputs import read_file
from matpress.methods import get_method
from matpress.passes.budget.measurement import Allocation, BudgetMeasurement, Distortion, choose
from matpress.passes.budget.sensitivity import SensitivityTable, default_probe, relative_output_error
from matpress.passes.context import PassContext
from matpress.passes.layers import CompressionReport
from matpress.recipe import Budget, Recipe, Rule, allowed_candidates, candidate_label, resolve_candidates
from matpress.walk import calibration_data
from matpress.walk.source import read_whole


def compress_budgeted(
    model: nn.Module, recipe: Recipe, chosen: dict[str, Rule], context: PassContext = PassContext(),
    distortion: Optional[Distortion] = None,
) -> CompressionReport:
    """The budget path of :func:`matpress.compress`: layers matched by an explicit recipe rule keep it;
    every other selected layer gets the best of the recipe's candidates within ``recipe.budget``.

    With calibration text (``context.calibration``, or its tokenizer and the recipe's calibration
    settings), errors are measured on the layers' real inputs (statistics of the uncompressed model,
    stage by stage), each layer's weight end to end is measured on the model's output, and the chosen
    rules are applied by the sequential calibrated pass. Without it, errors are plain weight errors.
    The report's ``allocation`` holds the sensitivity table, the choice and the budget."""
    stats, calibration, tokenizer = context.stats, context.calibration, context.tokenizer
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
    calibrated = sorted({candidates[c].method for n in names for c in allowed[n] if get_method(candidates[c].method).needs_calibration})
    if calibrated and stats is None and calibration is None:
        raise RecipeError(
            f"candidates using {calibrated} need calibration statistics: pass tokenizer= (or calibration=) to "
            "compress, or use the calibration-free preset 'quant'"
        )
    if distortion is not None or tokenizer is not None:
        read_whole(model)  # the end-to-end weighting runs the whole model once per layer: not streamed
    if distortion is None and tokenizer is not None:
        text_file = recipe.calibration.text_file if recipe.calibration is not None else None  # None: the built-in text
        distortion = distortion_measure(model, tokenizer, text_file=text_file)
    budget = Budget.parse(recipe.budget)
    measurement = BudgetMeasurement.measure(
        model, names, candidates, allowed, stats, calibration, distortion, progress=context.progress
    )
    allocation = measurement.allocate(budget)
    report = measurement.apply(model, allocation, progress=context.progress)
    report.allocation = allocation
    return report


SENSITIVITY = "sensitivity.json"
MAX_ALLOCATION_BYTES = 64 << 20  # a table of 10,000 layers by 100 candidates is about 20 MB


def save_allocation(path: Union[str, Path], allocation: Allocation) -> None:
    """Write the sensitivity table with the chosen candidates (read by ``matpress report``)."""
    data = {"budget": str(allocation.budget), "choice": list(allocation.choice), "table": allocation.table.to_dict()}
    Path(path).write_text(json.dumps(data))


def load_allocation(path: Union[str, Path]) -> Allocation:
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
        budget = Budget.parse(str(data["budget"]))
    except (UnicodeDecodeError, ValueError, RecursionError, BudgetError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{path} is damaged ({quote(str(e))}); delete it (the checkpoint loads without it) or compress again"
        ) from None
    return Allocation(table, choice, budget)


__all__ = [
    "SENSITIVITY",
    "Allocation",
    "BudgetMeasurement",
    "SensitivityTable",
    "choose",
    "compress_budgeted",
    "default_probe",
    "load_allocation",
    "relative_output_error",
    "save_allocation",
]
