"""GPTQ's asymmetric target (GPTAQ): the walk's cross terms with the uncompressed model's inputs, the
target's normal equations, and refusals of bad strengths."""

import copy
import dataclasses

import pytest
import torch

import matpress
from matpress.errors import RecipeError
from matpress.methods import METHODS, LayerStats
from matpress.methods.obs import asymmetric_target, held_out_strength
from matpress.nn.layout import find_linear_layers
from matpress.recipe import Recipe
from matpress.walk import CalibrationData, walk
from matpress.walk.blocks import find_blocks
from matpress.walk.stats import real_tokens

from conftest import TINY_MODELS, random_data, tiny_llama


def layer_inputs(model, names, data):
    """Each layer's inputs over ``data`` as ``(tokens, in)``, padding dropped as the statistics drop it."""
    seen = {n: [] for n in names}
    mask = [None]
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(real_tokens(a[0].detach(), mask[0]).float()))
        for n in names
    ]
    with torch.inference_mode():
        for batch in data.batches:
            mask[0] = batch["attention_mask"].bool()
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(x) for n, x in seen.items()}


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_the_walk_sums_the_cross_terms_with_the_uncompressed_models_inputs(family):
    model = TINY_MODELS[family]()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding, which no statistic may count
    data = CalibrationData.from_token_ids(ids, 3, mask)
    prefix, _ = find_blocks(model)
    names = [n for n in find_linear_layers(model) if n.startswith(prefix + ".")]  # not lm_head, after the blocks
    gen = torch.Generator().manual_seed(1)
    collected = {}
    # each stage perturbed once its statistics are in, as the sequential pass compresses it
    for block in walk(model, names, data, progress=False, reference=True):
        for stage in block.stages:
            collected.update(block.stats(stage))
            for n in stage:
                w = model.get_submodule(n).weight
                with torch.no_grad():
                    w.add_(0.3 * w.std() * torch.randn(w.shape, generator=gen))
    x = layer_inputs(model, names, data)  # the perturbed model: each layer's input once its predecessors changed
    x_ref = layer_inputs(original, names, data)
    for n in names:
        st = collected[n]
        assert st.n_tokens == x[n].shape[0] == data.n_tokens, n
        exact = x_ref[n].double().T @ x[n].double()
        # float32 sums of n_tokens products: relative error within a few n_tokens * 2^-24 of the scale
        tol = 8 * st.n_tokens * 2**-24 * float((x_ref[n].double().norm(dim=0)[:, None] * x[n].double().norm(dim=0)[None]).max())
        assert torch.allclose(st.cross.double(), exact, atol=tol, rtol=0), n
        assert torch.allclose(st.xtx.double(), x[n].double().T @ x[n].double(), atol=tol, rtol=0), n
        # the fold: every other batch, here the first of the two (its real tokens come first in x)
        xtx_fold, cross_fold, n_fold = st.fold
        first_batch = int(data.batches[0]["attention_mask"].sum())
        assert n_fold == first_batch, n
        xa, xa_ref = x[n][:first_batch].double(), x_ref[n][:first_batch].double()
        assert torch.allclose(cross_fold.double(), xa_ref.T @ xa, atol=tol, rtol=0), n
        assert torch.allclose(xtx_fold.double(), xa.T @ xa, atol=tol, rtol=0), n
    # block 0's first stage reads the embeddings, which nothing perturbed: its cross term is its x x^T
    first, later = names[0], next(n for n in names if n.startswith(f"{prefix}.1."))
    assert torch.equal(collected[first].cross, collected[first].xtx)
    assert not torch.allclose(collected[later].cross, collected[later].xtx, rtol=1e-3)


def test_without_reference_the_walk_collects_no_cross_terms():
    model = tiny_llama()
    data = random_data(128, n=4, seq=8)
    names = list(find_linear_layers(model))
    for block in walk(model, names, data, progress=False):
        assert block.references is None
        for stage in block.stages:
            assert all(st.cross is None for st in block.stats(stage).values())


def synthetic_stats(n_in: int, n_tokens: int, seed: int) -> tuple[LayerStats, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(n_tokens, n_in, generator=gen, dtype=torch.float64)
    # earlier layers' error: a linear distortion (which a linear map can undo) and noise (which it cannot)
    distortion = torch.eye(n_in, dtype=torch.float64) + 0.2 * torch.randn(n_in, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
    x = x_ref @ distortion.T + 0.05 * torch.randn(n_tokens, n_in, generator=gen, dtype=torch.float64)
    stats = LayerStats(xtx=(x.T @ x).float(), n_tokens=n_tokens, cross=(x_ref.T @ x).float())
    return stats, x, x_ref


def test_the_asymmetric_target_solves_its_normal_equations_and_scales_with_its_strength():
    stats, x, x_ref = synthetic_stats(24, 400, seed=2)
    w = torch.randn(10, 24, generator=torch.Generator().manual_seed(3))
    percdamp = 0.01
    h = (x.T @ x) / 400
    damped = h + percdamp * h.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    target = asymmetric_target(w, stats, 1.0, percdamp).double()
    # T (H + damp I) = W E[x_ref x^T]: residual at float32 rounding of T (solved in float64)
    residual = target @ damped - w.double() @ ((x_ref.T @ x) / 400)
    assert float(residual.abs().max()) < 1e-5 * float(w.abs().max() * damped.abs().max()) * 24
    assert torch.equal(asymmetric_target(w, stats, 0.0, percdamp), w)
    half = asymmetric_target(w, stats, 0.5, percdamp).double()
    assert torch.allclose(half, w.double() + 0.5 * (target - w.double()), atol=1e-5)
    # without damping the target is the least-squares map: the output error against W x_ref falls
    exact = asymmetric_target(w, stats, 1.0, 0.0).double()
    err = lambda m: float(((x @ m.T - x_ref @ w.double().T) ** 2).sum())
    assert err(exact) < err(w.double())
    assert err(exact) <= err(target) * (1 + 1e-6)


def with_folds(stats: LayerStats, x: torch.Tensor, x_ref: torch.Tensor, n_fold: int) -> LayerStats:
    """``stats`` with its first ``n_fold`` tokens as the fold."""
    a, a_ref = x[:n_fold], x_ref[:n_fold]
    return dataclasses.replace(stats, fold=((a.T @ a).float(), (a_ref.T @ a).float(), n_fold))


def held_out_error(w: torch.Tensor, x, x_ref, n_fold: int, strength: float, percdamp: float) -> float:
    """Error of the step fitted on each fold, scored token by token on the other, both ways summed."""
    w = w.double()
    total = 0.0
    for fit, score in ((slice(0, n_fold), slice(n_fold, None)), (slice(n_fold, None), slice(0, n_fold))):
        xf, xf_ref = x[fit], x_ref[fit]
        fitted = LayerStats(xtx=(xf.T @ xf).float(), n_tokens=xf.shape[0], cross=(xf_ref.T @ xf).float())
        moved = asymmetric_target(w, fitted, strength, percdamp)
        total += float(((x[score] @ moved.T - x_ref[score] @ w.T) ** 2).sum() / x[score].shape[0])
    return total


@pytest.mark.parametrize("n_tokens", [60, 4000])
def test_the_held_out_strength_minimises_the_held_out_error(n_tokens):
    stats, x, x_ref = synthetic_stats(24, n_tokens, seed=7)
    stats = with_folds(stats, x, x_ref, n_tokens // 2)
    w = torch.randn(10, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    chosen = held_out_strength(w, stats, 0.01)
    grid = [i / 200 for i in range(201)]
    errors = [held_out_error(w, x, x_ref, n_tokens // 2, s, 0.01) for s in grid]
    best = grid[min(range(len(grid)), key=errors.__getitem__)]
    assert 0 <= chosen <= 1
    # the error is a parabola in s: the grid's best lies within one step of its minimum (or at an end)
    assert abs(chosen - best) <= 1 / 200 + 1e-9
    if n_tokens == 4000:
        assert chosen > 0.8  # plenty of tokens for 24 inputs: the fitted linear distortion holds out


def test_the_held_out_strength_is_zero_when_nothing_holds_out():
    # inputs without error: the step is float rounding alone
    stats, x, _ = synthetic_stats(16, 200, seed=9)
    stats = with_folds(dataclasses.replace(stats, cross=stats.xtx.clone()), x, x, 100)
    w = torch.randn(6, 16, dtype=torch.float64)
    assert held_out_strength(w, stats, 0.01) == pytest.approx(0.0, abs=1e-3)
    # one batch only: no second fold to score on
    single = dataclasses.replace(stats, fold=(stats.xtx, stats.cross, stats.n_tokens))
    assert held_out_strength(w, single, 0.01) == 0.0
    assert torch.equal(asymmetric_target(w.float(), single, "auto", 0.01), w.float())


def test_without_cross_terms_the_weight_is_left_as_given():
    stats, _, _ = synthetic_stats(16, 100, seed=4)
    stats.cross = None
    w = torch.randn(4, 16)
    assert asymmetric_target(w, stats, 0.7, 0.01) is w


def test_asymmetric_gptq_lowers_the_output_error_against_the_uncompressed_layer():
    # one layer whose input carries an earlier layer's error: with the full step GPTQ's result tracks
    # W x_ref, the uncompressed model's output, better than plain GPTQ's, which tracks W x
    stats, x, x_ref = synthetic_stats(64, 2000, seed=5)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    gptq = METHODS["gptq"]
    err = {}
    for strength in (0.0, 1.0):
        params = Recipe.from_dict({"default": {"method": "gptq", "bits": 4, "group_size": 32, "asymmetric": strength}}).default.params
        q = gptq.run(w, params, stats).decode().double()
        err[strength] = float(((x @ q.T - x_ref @ w.double().T) ** 2).mean())
    assert err[1.0] < 0.5 * err[0.0]  # the distortion's error dominates 4-bit rounding here


def test_the_sequential_pass_gives_cross_terms_only_when_a_rule_asks(monkeypatch):
    seen = {}
    run = METHODS["gptq"].run

    def recording(weight, params, stats):
        seen[weight.shape, len(seen)] = (params.asymmetric, stats.cross is not None)
        return run(weight, params, stats)

    monkeypatch.setitem(METHODS, "gptq", dataclasses.replace(METHODS["gptq"], run=recording))
    data = random_data(128)
    plain = matpress.compress(tiny_llama(), {"default": {"method": "gptq", "bits": 4, "group_size": 32}}, calibration=data, progress=False)
    assert all(not cross for _, cross in seen.values())
    seen.clear()
    report = matpress.compress(
        tiny_llama(), {"default": {"method": "gptq", "bits": 4, "group_size": 32, "asymmetric": 0.3}}, calibration=data, progress=False,
    )
    assert len(seen) == 14 and all(cross for _, cross in seen.values())
    assert all(r.note == "" for r in report.layers)
    assert len(plain.layers) == len(report.layers)


def test_asymmetric_zero_is_plain_gptq():
    data = random_data(128)
    rules = [{"method": "gptq", "bits": 3, "group_size": 32}, {"method": "gptq", "bits": 3, "group_size": 32, "asymmetric": 0}]
    weights = []
    for rule in rules:
        model = tiny_llama()
        matpress.compress(model, {"default": rule}, calibration=data, progress=False)
        weights.append(model.model.layers[1].mlp.down_proj.fmt.decode())
    assert torch.equal(*weights)


def test_experts_get_no_cross_terms_and_say_so():
    from test_moe import VOCAB, build

    report = matpress.compress(
        build("mixtral"), {"default": {"method": "gptq", "bits": 4, "group_size": 32, "asymmetric": 0.5}},
        calibration=random_data(VOCAB, n=16, seq=16), progress=False,
    )
    assert sum(".experts." in row.name for row in report.layers) == 2 * 4 * 2  # layers x experts x (gate_up, down)
    for row in report.layers:
        if ".experts." in row.name:
            assert "asymmetric target not applied" in row.note, row.name
        else:
            assert "asymmetric" not in row.note, row.name


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.3", "Auto"])
@pytest.mark.parametrize("method", ["gptq", "gptq_codebook"])
def test_bad_strengths_are_refused(method, value):
    rule = {"method": method, "bits": 3, "asymmetric": value}
    if method == "gptq_codebook":
        rule["table"] = "nl"
    with pytest.raises(RecipeError, match="asymmetric must be a number in \\[0, 1\\] or 'auto'"):
        Recipe.from_dict({"default": rule})


def test_the_cli_refuses_bad_strengths_and_methods_without_it(tmp_path, capsys):
    from matpress.cli import main

    for flags in (["--method", "gptq", "--asymmetric", "2"], ["--method", "rtn", "--asymmetric", "0.3"]):
        assert main(["compress", "minilm", "--out", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err
        assert "asymmetric" in err and "Traceback" not in err
