"""Measure once, allocate many budgets, apply one: :class:`BudgetMeasurement`.

:meth:`BudgetMeasurement.measure` walks the model (:func:`matpress.walk.walk`) stage by stage: for each
layer, every allowed candidate is encoded on the stage's statistics and its bytes and relative output
error recorded; the encoded tensors are dropped (statistics are held for one stage at a time). With a
distortion measure, a second walk re-encodes each layer's probe candidate and measures the model's
distortion with that layer alone compressed (the end-to-end weight of its errors).
:meth:`~BudgetMeasurement.allocate` picks one candidate per layer within a budget (any number of
budgets on one measurement); :meth:`~BudgetMeasurement.apply` re-encodes the chosen candidates into a
model: by the sequential calibrated pass when the measurement had calibration data, else over a walk
without data. A streamed model (:mod:`matpress.walk.source`) is read block by block by both walks and
the application; only the end-to-end weighting, which runs the whole model once per layer, needs all
of it in memory (:func:`matpress.passes.budget.compress_budgeted` reads it whole for that).
"""

from __future__ import annotations

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
from matpress.nn.experts import is_expert, starved_rule
from matpress.nn.layout import find_linear_layers, install_format, linear_weight, set_submodule
from matpress.passes.budget.allocate import Option, allocate, cheapest_total
from matpress.passes.budget.sensitivity import SensitivityTable, default_probe, relative_output_error, time_estimate
from matpress.passes.layers import CompressionReport, LayerReport, layer_report
from matpress.passes.sequential import compress_sequential
from matpress.recipe import Budget, Rule
from matpress.walk import CalibrationData, walk
from matpress.walk.source import materialised

Distortion = Callable[[nn.Module], float]  # how far a model's output drifts from the original's


@dataclass
class Allocation:
    """The candidate chosen for each layer of ``table`` (an index into ``table.candidates``) within ``budget``."""

    table: SensitivityTable
    choice: list[int]
    budget: Budget


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


def encode_candidate(name: str, weight: torch.Tensor, rule: Rule, stats: Optional[LayerStats], expert: bool) -> Format:
    """Candidate ``rule`` on layer ``name``; an expert short of calibration tokens under the fallback it
    is compressed with (:func:`matpress.nn.experts.starved_rule`)."""
    if expert:
        rule = starved_rule(name, rule, stats)[0]
    return get_method(rule.method).run(weight, rule.params, stats)


def encoding_key(rule: Rule, in_features: int) -> tuple[str, Any]:
    """What ``rule`` encodes a layer of ``in_features`` inputs with: candidates of one key give one
    format there (a K-quant target on rows it does not fit, and the legacy grid it falls back to)."""
    for_width = getattr(rule.params, "for_width", None)
    return rule.method, for_width(in_features) if for_width is not None else rule.params


@dataclass
class BudgetMeasurement:
    """A model's sensitivity table, and what applying an allocation needs: the candidate rules, the
    statistics or calibration data it was measured on, and the formats of the candidates whose size
    follows the data (a rank chosen by energy), which a re-encoding could not reproduce in size."""

    table: SensitivityTable
    candidates: dict[str, Rule]
    experts: frozenset[str]
    stats: Optional[dict[str, LayerStats]] = None
    calibration: Optional[CalibrationData] = None
    kept: dict[tuple[int, int], Format] = field(default_factory=dict, repr=False)

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        names: Sequence[str],
        candidates: dict[str, Rule],
        allowed: Optional[dict[str, Sequence[str]]] = None,
        stats: Optional[dict[str, LayerStats]] = None,
        calibration: Optional[CalibrationData] = None,
        distortion: Optional[Distortion] = None,
        probe: Optional[str] = None,
        progress: bool = True,
    ) -> "BudgetMeasurement":
        """Measure the candidates (``allowed``: the labels each layer may use; all by default) of the
        linear layers ``names`` of ``model``, on ``stats`` or on statistics collected stage by stage
        from ``calibration`` (Frobenius errors without either); with ``distortion``, weigh each layer
        end to end with the ``probe`` candidate (by default one typical of a 1% error)."""
        layers = find_linear_layers(model)
        labels = list(candidates)
        allowed = allowed or {name: labels for name in names}
        table = SensitivityTable(
            layers=list(names),
            n_weights=[linear_weight(layers[n]).numel() for n in names],
            candidates=labels,
            nbytes=[[0] * len(labels) for _ in names],
            error=[[float("nan")] * len(labels) for _ in names],
            weight=[1.0] * len(names),
            allowed=[[labels.index(c) for c in allowed[n]] for n in names],
        )
        measurement = cls(table, candidates, frozenset(n for n in names if is_expert(model, n)), stats, calibration)
        index = {name: i for i, name in enumerate(names)}
        # (layer shape, method) of every encoding: once one of each is timed, the estimate of them all
        kinds = [(tuple(linear_weight(layers[n]).shape), candidates[labels[j]].method) for i, n in enumerate(names) for j in table.allowed[i]]
        seconds: dict[tuple, float] = {}
        estimate = progress  # printed once
        bar = tqdm(total=len(kinds), desc="sensitivity", unit="candidate", disable=not progress)
        for block in walk(model, names, calibration, stats, propagate=False, progress=False):
            for stage in block.stages:
                stage_stats = block.stats(stage)
                for name in stage:
                    measurement._measure_layer(index[name], layers[name], stage_stats.get(name), seconds)
                    bar.update(len(allowed[name]))
                    if estimate and len(seconds) == len(set(kinds)):
                        tqdm.write(time_estimate(seconds, kinds))
                        estimate = False
        bar.close()
        for i, name in enumerate(table.layers):
            if not table.allowed[i]:
                rows, cols = linear_weight(layers[name]).shape
                raise BudgetError(
                    f"layer {name}: none of its candidates can encode a {rows}x{cols} weight; add a candidate such as dense fp16"
                )
        if distortion is not None:
            measurement._weigh_end_to_end(model, distortion, probe, progress)
        return measurement

    def _measure_layer(self, i: int, layer: nn.Module, stats: Optional[LayerStats], seconds: dict[tuple, float]) -> None:
        """Encode layer ``i``'s candidates; ``seconds``: the time of the first encoding of each (shape, method)."""
        table, name = self.table, self.table.layers[i]
        weight = linear_weight(layer).float()
        encoded: list[tuple[str, Any]] = []
        for j in list(table.allowed[i]):
            rule = self.candidates[table.candidates[j]]
            start = time.perf_counter()
            try:
                key = encoding_key(rule, weight.shape[1])
                if key in encoded:  # the same encoding as an earlier candidate's on this layer: measured once
                    table.allowed[i].remove(j)
                    continue
                encoded.append(key)
                fmt: Optional[Format] = encode_candidate(name, weight, rule, stats, name in self.experts)
            except FormatError:
                fmt = None
            seconds.setdefault((tuple(weight.shape), rule.method), time.perf_counter() - start)
            if fmt is None:  # a candidate this layer's shape cannot take (e.g. blocks that do not divide it)
                table.allowed[i].remove(j)
                continue
            table.nbytes[i][j] = fmt.nbytes
            table.error[i][j] = relative_output_error(weight, fmt, stats)
            if getattr(rule.params, "size_follows_data", False):
                self.kept[(i, j)] = fmt

    def _weigh_end_to_end(self, model: nn.Module, distortion: Distortion, probe: Optional[str], progress: bool) -> None:
        """Set ``table.weight``: each layer, compressed alone with the probe candidate, is measured end
        to end, and its estimates are scaled so that the probe's estimated damage equals that measurement."""
        table = self.table
        probe = probe or default_probe(table)
        if probe is None:
            return
        table.probe = probe
        p = table.candidates.index(probe)
        measured = [i for i in range(len(table.layers)) if p in table.allowed[i] and table.error[i][p] > 0]
        index = {table.layers[i]: i for i in measured}
        layers = find_linear_layers(model)
        bar = tqdm(total=len(measured), desc="end-to-end", unit="layer", disable=not progress)
        for block in walk(model, list(index), self.calibration, self.stats, propagate=False, progress=False):
            for stage in block.stages:
                stage_stats = block.stats(stage)
                for name in stage:
                    i, original = index[name], layers[name]
                    weight = linear_weight(original).float()
                    fmt = encode_candidate(name, weight, self.candidates[probe], stage_stats.get(name), name in self.experts)
                    install_format(model, name, original, fmt)
                    try:
                        table.weight[i] = max(distortion(model), 0.0) / table.error[i][p]
                    finally:
                        set_submodule(model, name, original)
                    bar.update()
        bar.close()
        if measured:  # layers the probe cannot encode (shape, allow list) take the typical measured weight
            typical = statistics.median_high(table.weight[i] for i in measured)
            for i in set(range(len(table.layers))) - set(measured):
                table.weight[i] = typical

    def allocate(self, budget: Budget) -> Allocation:
        """One candidate per layer, least estimated damage within ``budget``."""
        return Allocation(self.table, choose(self.table, budget), budget)

    def apply(self, model: nn.Module, allocation: Allocation, progress: bool = True) -> CompressionReport:
        """Compress the measured layers of ``model`` (the measured model or a copy of it) as
        ``allocation`` chose. With calibration data the chosen rules run in the sequential pass, so
        calibrated methods see the inputs of the already-compressed earlier layers, as GPTQ intends
        (without block hooks: a layer whose size came out larger than measured takes back its measured
        format, and a neighbour folded into would then be wrong); otherwise each is re-encoded as measured."""
        table, choice = self.table, allocation.choice
        layers = find_linear_layers(model)
        originals = {name: layers[name] for name in table.layers}
        chosen = {name: self.candidates[table.candidates[choice[i]]] for i, name in enumerate(table.layers)}
        if self.calibration is not None:
            reports = compress_sequential(model, chosen, self.calibration, progress=progress, block_hooks=False)
            for i, name in enumerate(table.layers):
                measured = self.kept.get((i, choice[i]))
                if measured is not None and reports[i].nbytes > measured.nbytes:
                    reports[i] = self._install(model, name, originals[name], measured, chosen[name], None)
            return CompressionReport(reports)
        index = {name: i for i, name in enumerate(table.layers)}
        done: dict[str, LayerReport] = {}
        for block in walk(model, table.layers, stats=self.stats or {}, progress=progress, desc="compressing"):
            for stage in block.stages:
                given = block.stats(stage)
                for name in stage:
                    i = index[name]
                    done[name] = self._install(model, name, originals[name], self.kept.get((i, choice[i])), chosen[name], given.get(name))
        return CompressionReport([done[name] for name in table.layers])

    def _install(
        self, model: nn.Module, name: str, original: nn.Module, fmt: Optional[Format], rule: Rule, stats: Optional[LayerStats]
    ) -> LayerReport:
        """Put ``fmt`` (or, when None, ``rule`` encoded on ``stats``) in place of layer ``name`` of ``model``,
        whose original module is ``original`` (back in the model first if it was replaced), its weights read
        for the while on a streamed model; report it."""
        set_submodule(model, name, original)
        with materialised(model, name):
            weight = linear_weight(original).float()
            fmt = fmt or encode_candidate(name, weight, rule, stats, name in self.experts)
            install_format(model, name, original, fmt)
            return layer_report(name, weight, fmt)
