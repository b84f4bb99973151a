"""The one walk (matpress.walk.walk) and the passes consuming it: statistics stage by stage equal to a
whole-model collection, block hooks of methods, the weight source's materialise/release points, and the
budget measurement's bounded memory."""

import dataclasses
import gc

import pytest
import torch

import matpress
from matpress.formats import Format
from matpress.methods import METHODS, LayerStats
from matpress.nn.layers import FormatModule
from matpress.nn.layout import find_linear_layers
from matpress.passes.budget import BudgetMeasurement
from matpress.recipe import candidate_rules
from matpress.walk import collect_stats, walk

from conftest import TINY_MODELS, random_data


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_stage_statistics_equal_the_whole_model_collection(family):
    model = TINY_MODELS[family]()
    data = random_data(128, n=6, seq=12, batch_size=3)
    names = list(find_linear_layers(model))
    whole = collect_stats(model, data, names, progress=False)
    seen = {}
    for block in walk(model, names, data, propagate=False, progress=False):
        for stage in block.stages:
            seen.update(block.stats(stage))
    assert sorted(seen) == sorted(names)
    for name in names:  # bit for bit: the budget path measures on these
        assert seen[name].n_tokens == whole[name].n_tokens, name
        assert torch.equal(seen[name].xtx, whole[name].xtx), name
        assert torch.equal(seen[name].abs_sum, whole[name].abs_sum), name


def test_block_hooks_of_methods_run_once_per_block_before_its_layers(monkeypatch):
    events = []

    def hook(view, rules):
        events.append(("hook", tuple(map(tuple, view.stages))))
        return {}

    def run(weight, params, stats):
        events.append(("compress", weight.shape))
        return gptq_run(weight, params, stats)

    gptq_run = METHODS["gptq"].run
    monkeypatch.setitem(METHODS, "gptq", dataclasses.replace(METHODS["gptq"], run=run, block_hook=hook))
    model = TINY_MODELS["llama"]()
    matpress.compress(model, {"default": {"method": "gptq", "bits": 4, "group_size": 32}}, calibration=random_data(128), progress=False)
    hooks = [i for i, e in enumerate(events) if e[0] == "hook"]
    assert hooks == [0, 8]  # two blocks of seven linear layers, each hook before its block's layers
    attention = ("q_proj", "k_proj", "v_proj")
    assert tuple(f"model.layers.0.self_attn.{p}" for p in attention) in events[0][1]  # q/k/v: one stage


class RecordingSource:
    def __init__(self):
        self.events = []

    def materialise(self, name, module):
        self.events.append(("materialise", name))

    def release(self, name, module):
        self.events.append(("release", name))


@pytest.mark.parametrize("calibrated", [False, True])
def test_the_weight_source_sees_each_block_around_its_compression(monkeypatch, calibrated):
    from matpress.passes.context import PassContext
    from matpress.passes.pipeline import run_pass
    from matpress.recipe import Recipe

    model = TINY_MODELS["llama"]()
    source = RecordingSource()
    real = matpress.passes.layers.compress_layer

    def compress_layer(model, name, rule, stats=None):
        source.events.append(("compress", name.split(".")[2]))
        return real(model, name, rule, stats)

    monkeypatch.setattr(matpress.passes.layers, "compress_layer", compress_layer)  # what both passes call
    recipe = Recipe.simple("gptq" if calibrated else "rtn", bits=4, group_size=32)
    chosen = {n: recipe.default for n in find_linear_layers(model) if n != "lm_head"}
    run_pass(model, recipe, chosen, PassContext(calibration=random_data(128) if calibrated else None, source=source, progress=False))
    assert source.events == [
        ("materialise", "model.layers.0"), *[("compress", "0")] * 7, ("release", "model.layers.0"),
        ("materialise", "model.layers.1"), *[("compress", "1")] * 7, ("release", "model.layers.1"),
    ]


def test_the_budget_measurement_holds_one_stage_of_statistics_and_no_encoded_candidate(monkeypatch):
    """Measured on a walk, a layer's candidates are encoded on one stage's statistics and only their
    bytes and errors kept; before, every layer's statistics were collected first and every encoded
    candidate kept (checked on the previous main: 14 statistics and 27 formats alive)."""
    model = TINY_MODELS["llama"]()
    alive_stats, loose_formats = [], []

    def count() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        installed = {id(m.fmt) for m in model.modules() if isinstance(m, FormatModule)}
        # type() rather than isinstance: some module objects warn when asked for attributes
        return sum(type(o) is LayerStats for o in objects), sum(issubclass(type(o), Format) and id(o) not in installed for o in objects)

    def run(weight, params, stats):
        n_stats, n_formats = count()
        alive_stats.append(n_stats - before[0])  # beyond what earlier tests left alive
        loose_formats.append(n_formats - before[1])
        return rtn_run(weight, params, stats)

    before = count()
    rtn_run = METHODS["rtn"].run
    monkeypatch.setitem(METHODS, "rtn", dataclasses.replace(METHODS["rtn"], run=run))
    names = [n for n in find_linear_layers(model) if n != "lm_head"]
    candidates = candidate_rules([{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 8, "group_size": 32}])
    measurement = BudgetMeasurement.measure(model, names, candidates, calibration=random_data(128), progress=False)
    assert len(alive_stats) == 2 * len(names)
    assert max(alive_stats) == 1  # q/k/v and gate/up share one: a stage's statistics, one at a time
    assert max(loose_formats) <= 1
    assert measurement.kept == {}
