"""The one walk (matpress.walk.walk) and the passes consuming it: statistics stage by stage equal to a
whole-model collection, block hooks of methods, the weight source's materialise/release points, and the
budget measurement's bounded memory."""

import dataclasses
import gc
from collections import Counter

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


GPTQ_ROTATED = {"default": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True, "rotate": True}}


def counting_linear_calls(model, monkeypatch):
    """Counts forward calls per linear layer name, the layers' compressed replacements included."""
    from matpress.nn.layers import CompressedLinear

    counts = Counter()
    names = {}

    def counted(cls):
        original = cls.forward

        def forward(self, x):
            counts[names.get(id(self), "?")] += 1
            return original(self, x)

        monkeypatch.setattr(cls, "forward", forward)

    counted(torch.nn.Linear)
    counted(CompressedLinear)
    original_install = matpress.passes.layers.install_format

    def install(model_, name, module, fmt):
        original_install(model_, name, module, fmt)
        names[id(model_.get_submodule(name))] = name

    monkeypatch.setattr(matpress.passes.layers, "install_format", install)
    names.update({id(m): n for n, m in find_linear_layers(model).items()})
    return counts


def test_sequential_pass_runs_each_block_layer_once_per_batch(monkeypatch):
    """The block's runs per stage reuse what earlier runs computed before the changed layers
    (walk.replay): each layer computes each calibration batch once (plus once in the trace of the
    block on the first batch), where re-running each stage from the block's input computed q/k/v for
    every later stage (4 times per batch)."""
    model = TINY_MODELS["llama"](layers=3)
    data = random_data(128, n=8, seq=12, batch_size=2)
    blocks = [n for n in find_linear_layers(model) if n.startswith("model.layers.")]
    counts = counting_linear_calls(model, monkeypatch)
    matpress.compress(model, GPTQ_ROTATED, calibration=data, progress=False)
    assert blocks and all(counts[n] <= len(data.batches) + 1 for n in blocks), dict(counts)


def test_replayed_runs_give_the_same_compressed_model(monkeypatch):
    """Reusing outputs changes nothing: the same tensors, bit for bit, as running every stage in full."""
    from matpress.walk.replay import BlockReplay

    data = random_data(128, n=6, seq=12, batch_size=3)
    models = []
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(BlockReplay, "run", lambda self, batch, forward, keep_before=None: forward())
        torch.manual_seed(0)
        model = TINY_MODELS["llama"](layers=2)
        matpress.compress(model, GPTQ_ROTATED, calibration=data, progress=False)
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_replay_recomputes_what_follows_a_changed_module():
    """A module changed in place (its parameter's version) invalidates the kept outputs of its call
    and of every call after it; those before it are handed back, and the result is what a fresh run
    computes."""
    from matpress.walk.replay import BlockReplay

    computed = Counter()

    class Counted(torch.nn.Linear):
        def forward(self, x):
            computed[self.tag] += 1
            return super().forward(x)

    torch.manual_seed(0)
    first, second = Counted(4, 4), Counted(4, 4)
    first.tag, second.tag = "first", "second"
    block = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    x = torch.randn(3, 4)
    replay = BlockReplay(block)
    replay.run(0, lambda: block(x), keep_before=["2"])
    with torch.no_grad():
        second.weight.mul_(2)  # in place: same object and storage, a new version
    out = replay.run(0, lambda: block(x), keep_before=["2"])
    assert computed == Counter({"first": 1, "second": 2})  # the first layer's output was handed back
    assert torch.equal(out, block(x))
    computed.clear()
    with torch.no_grad():
        first.weight.mul_(2)
    out = replay.run(0, lambda: block(x))
    assert computed == Counter({"first": 1, "second": 1})  # recomputed from the changed layer on
    assert torch.equal(out, block(x))


def test_sequential_pass_runs_calibration_forwards_through_decoded_weights(monkeypatch):
    """The block forwards over the calibration batches multiply compressed layers by their decoded
    weights (nn.decoded_forwards), never through the formats' kernels (which re-apply the rotation
    and unpack the codes at each call)."""
    from matpress.nn import layers

    kernel_calls = []
    matmul = layers.kernels.matmul
    monkeypatch.setattr(layers.kernels, "matmul", lambda fmt, x: kernel_calls.append(fmt) or matmul(fmt, x))
    model = TINY_MODELS["llama"](layers=2)
    matpress.compress(model, GPTQ_ROTATED, calibration=random_data(128, n=6, seq=12, batch_size=3), progress=False)
    assert kernel_calls == []


def test_decoded_forwards_multiply_by_the_decoded_weight():
    """Inside decoded_forwards a compressed layer's product is the plain dense product with its decoded
    weight (for a rotated format: no transform of the input), decoded once per cache; outside, the
    layer is back on its format's kernel."""
    from matpress.formats import format_class
    from matpress.nn import CompressedLinear, decoded_forwards

    torch.manual_seed(0)
    fmt = format_class("transformed").encode(torch.randn(48, 256), rotate=True, bits=4, group_size=64)
    layer = torch.nn.Sequential(CompressedLinear(fmt))
    x = torch.randn(5, 256)
    cache = {}
    with decoded_forwards(layer, cache):
        dense = layer(x)
    decoded = cache["0"][1]
    with decoded_forwards(layer, cache):
        assert layer[0].decoded is decoded  # not decoded again
    assert layer[0].decoded is None
    assert torch.equal(decoded, fmt.decode()) and torch.equal(dense, torch.nn.functional.linear(x, decoded))
