import pytest
import torch
import transformers

from matpress.errors import BudgetError, RecipeError
from matpress.formats import IntFormat
from matpress.nn.layers import CompressedLinear
from matpress.methods import LayerStats, get_method
from matpress.nn.layout import find_linear_layers, linear_weight
from matpress.passes.budget import BudgetMeasurement, choose, relative_output_error
from matpress.recipe import Budget, CalibrationSettings, allowed_candidates, candidate_rules, resolve_candidates
from matpress.walk import calibration_data, collect_stats

from conftest import tiny_llama

CANDIDATES = [{"method": "rtn", "bits": b, "group_size": g} for b in (2, 3, 4, 8) for g in (32, None)] + [
    {"method": "dense", "dtype": "fp16"}
]


@pytest.mark.parametrize(
    "text,bpw,nbytes",
    [("3.2bpw", 3.2, None), ("40MB", None, 40_000_000), ("12MiB", None, 12 * 2**20), ("123456B", None, 123456), (" 2.5 BPW", 2.5, None)],
)
def test_budget_parsing(text, bpw, nbytes):
    b = Budget.parse(text)
    assert b.bits_per_weight == bpw and b.nbytes == nbytes


@pytest.mark.parametrize("text", ["", "3.2 bits", "-1MB", "0bpw", "MB", "3.5", "3b"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(BudgetError, match="budget"):
        Budget.parse(text)


def test_relative_output_error_is_the_output_error_on_the_calibration_inputs():
    torch.manual_seed(0)
    w, x = torch.randn(16, 48), torch.randn(200, 48) * torch.linspace(0.1, 3, 48)
    fmt = IntFormat.encode(w, bits=3, group_size=16)
    xd, wd = x.double(), w.double()
    direct = float(((xd @ (wd - fmt.decode().double()).T) ** 2).sum() / ((xd @ wd.T) ** 2).sum())
    stats = LayerStats(xtx=xd.T @ xd, n_tokens=200)
    assert relative_output_error(w, fmt, stats) == pytest.approx(direct, rel=1e-9)
    frobenius = float(((wd - fmt.decode().double()) ** 2).sum() / (wd**2).sum())
    assert relative_output_error(w, fmt, None) == pytest.approx(frobenius, rel=1e-9)


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama()
    layers = {n: m for n, m in find_linear_layers(model).items() if n != "lm_head"}
    cands = candidate_rules(CANDIDATES)
    table = BudgetMeasurement.measure(model, list(layers), cands, progress=False).table
    return model, layers, table


def test_every_candidate_is_measured_once(measured):
    _, layers, table = measured
    assert all(b > 0 for row in table.nbytes for b in row) and table.allowed == [list(range(len(CANDIDATES)))] * len(layers)
    for i in range(len(layers)):
        errors = dict(zip(table.candidates, table.error[i]))
        # more bits never hurt, and fp16 is almost exact
        assert errors["rtn-2b-g32"] > errors["rtn-3b-g32"] > errors["rtn-4b-g32"] > errors["rtn-8b-g32"]
        assert errors["dense-fp16"] < 1e-6


def test_sensitivity_prints_a_time_estimate_before_the_long_part(measured, capsys):
    """With progress on, the estimate comes once the first encoding of each (layer shape, method) is
    timed, and names every encoding; the table is the same as without progress."""
    model, layers, table = measured
    cands = candidate_rules(CANDIDATES)
    again = BudgetMeasurement.measure(model, list(layers), cands, progress=True).table
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sensitivity:")]
    shapes = {tuple(m.weight.shape) for m in layers.values()}
    methods = {rule.method for rule in cands.values()}
    assert lines == [
        f"sensitivity: {len(layers) * len(CANDIDATES)} encodings, about {lines[0].split('about ')[1].split(' min')[0]} min "
        f"on this machine (timed one of each of the {len(shapes) * len(methods)} layer shapes and methods)"
    ]
    assert again.error == table.error and again.nbytes == table.nbytes


def test_choice_fits_the_budget_and_more_budget_never_hurts(measured):
    _, _, table = measured
    n = sum(table.n_weights)
    previous = float("inf")
    for bpw in (2.5, 2.75, 3.0, 3.5, 4.0, 5.0, 8.0):
        choice = choose(table, Budget(bits_per_weight=bpw))
        nbytes = sum(table.nbytes[i][j] for i, j in enumerate(choice))
        damage = sum(table.damage(i, j) for i, j in enumerate(choice))
        assert 8 * nbytes / n <= bpw
        assert damage <= previous
        previous = damage


def test_infeasible_budget_reports_the_smallest_reachable_size(measured):
    _, _, table = measured
    smallest = 8 * sum(min(row) for row in table.nbytes) / sum(table.n_weights)
    with pytest.raises(BudgetError, match=rf"below the smallest reachable size .* \({smallest:.3f} bits per weight\)"):
        choose(table, Budget(bits_per_weight=smallest - 0.01))
    choose(table, Budget(bits_per_weight=smallest + 1e-9))


def test_measure_allocate_apply_with_constraints_and_end_to_end_weights():
    model = tiny_llama()
    layers = {n: m for n, m in find_linear_layers(model).items() if n != "lm_head"}
    cands = candidate_rules(CANDIDATES)
    allowed = allowed_candidates(list(layers), list(cands), [{"pattern": "*.v_proj", "candidates": ["rtn-8b-*"]}])
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits.log_softmax(-1)

    def kl(m):
        with torch.no_grad():
            lp = m(ids).logits.log_softmax(-1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    measurement = BudgetMeasurement.measure(model, list(layers), cands, allowed, distortion=kl, probe="rtn-2b-g32", progress=False)
    allocation = measurement.allocate(Budget(bits_per_weight=3.0))
    report = measurement.apply(model, allocation, progress=False)
    table, choice = allocation.table, allocation.choice
    assert report.bits_per_weight <= 3.0
    for i, name in enumerate(table.layers):
        assert isinstance(model.get_submodule(name), CompressedLinear)
        if name.endswith("v_proj"):
            assert table.candidates[choice[i]].startswith("rtn-8b")
    # end-to-end weights: the probe's estimated damage equals the distortion measured for it
    assert all(w > 0 for w in table.weight)


def test_allow_entry_that_leaves_no_candidate_is_refused():
    with pytest.raises(RecipeError, match="leaves layer a.b no candidate"):
        allowed_candidates(["a.b"], ["rtn-4b-g32"], [{"pattern": "a.*", "candidates": ["sparse*"]}])


def test_recipe_budget_pins_explicit_rules_and_fits():
    import matpress

    model = tiny_llama()
    report = matpress.compress(
        model,
        {"budget": "3.3bpw", "rules": [{"pattern": "*.v_proj", "method": "dense", "dtype": "fp16"}]},
        progress=False,
    )
    assert report.bits_per_weight <= 3.3
    table, choice, budget = report.allocation.table, report.allocation.choice, report.allocation.budget
    assert str(budget) == "3.3bpw"
    for r in report.layers:
        if r.name.endswith("v_proj"):
            assert r.format == "dense fp16"


@pytest.mark.parametrize(
    "data,match",
    [
        ({"candidates": "quant"}, "only apply under a 'budget'"),
        ({"budget": "3bpw", "candidates": "everything"}, "unknown candidate preset"),
        ({"budget": "three"}, "cannot read the budget"),
        ({"budget": "3bpw", "allow": [{"pattern": "*"}]}, r"allow\[0\] must be"),
        ({"budget": "3bpw", "candidates": [{"method": "rtn", "bits": 11}]}, "bits must be"),
    ],
)
def test_bad_budget_recipes(data, match):
    from matpress.recipe import Recipe

    with pytest.raises((RecipeError, BudgetError), match=match):
        Recipe.from_dict(data)


def test_cli_budget_and_report(tiny_causal_dir, tmp_path, capsys):
    from matpress.cli import main

    path = tiny_causal_dir
    out = tmp_path / "budgeted"
    assert main(["compress", str(path), "--budget", "3.5bpw", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    for png in ("layers.png", "sensitivity.png", "budget_curve.png"):
        assert (out / png).stat().st_size > 10_000
        assert f"({png})" in text
    assert "budget of 3.5bpw" in text
    assert main(["compress", str(path), "--budget", "1bpw", "--out", str(out), "--quiet"]) == 2
    assert "smallest reachable size" in capsys.readouterr().err


SMALL_CALIBRATION = {"samples": 8, "seq_len": 32, "batch_size": 4}


@pytest.mark.parametrize("preset", ["quant", "quant-fast", "quant+codebook", "all"])
def test_calibrated_budget_uses_the_best_quantizer_and_fits(minilm, preset):
    import matpress
    from matpress.recipe import CALIBRATED_INT

    model = tiny_llama(vocab=minilm.tokenizer.vocab_size)
    original = tiny_llama(vocab=minilm.tokenizer.vocab_size)
    recipe = {"budget": "3.5bpw", "candidates": preset, "calibration": SMALL_CALIBRATION}
    report = matpress.compress(model, recipe, tokenizer=minilm.tokenizer, progress=False)
    table, choice = report.allocation.table, report.allocation.choice
    assert report.bits_per_weight <= 3.5
    assert table.probe is not None and any(w != 1.0 for w in table.weight)  # end-to-end weights measured
    # with calibration text the integer candidates come from the calibrated quantizer, not RTN
    assert any(c.startswith(CALIBRATED_INT["method"]) for c in table.candidates)
    assert not any(c.startswith("rtn") for c in table.candidates)
    data = calibration_data(CalibrationSettings(**SMALL_CALIBRATION), minilm.tokenizer, original)
    stats = collect_stats(original, data, table.layers, progress=False)  # what the layers were measured on
    candidates = resolve_candidates(preset, calibrated=True)
    re_encoded = 0
    for i, name in enumerate(table.layers):
        # the sequential re-encoding never exceeds the size the allocator gave each layer
        fmt = model.get_submodule(name).fmt
        assert fmt.nbytes <= table.nbytes[i][choice[i]]
        rule = candidates[table.candidates[choice[i]]]
        measured = get_method(rule.method).run(linear_weight(original.get_submodule(name)).float(), rule.params, stats[name])
        assert measured.nbytes == table.nbytes[i][choice[i]]
        re_encoded += not torch.equal(fmt.decode(), measured.decode())
    # later layers were re-encoded on the inputs of the already compressed earlier ones
    assert re_encoded > 0


def test_calibrated_candidates_without_calibration_text_are_refused():
    import matpress

    recipe = {"budget": "4bpw", "candidates": [{"method": "gptq", "bits": 4}, {"method": "rtn", "bits": 8}]}
    with pytest.raises(RecipeError, match=r"need calibration statistics: pass tokenizer="):
        matpress.compress(tiny_llama(), recipe, progress=False)


def test_candidates_a_layer_shape_cannot_take_are_skipped_for_that_layer():
    import matpress

    # monarch with 7 blocks divides no dimension of the tiny Llama: every layer falls back to the int candidates
    recipe = {"budget": "6bpw", "candidates": [{"method": "monarch", "nblocks": 7}, {"method": "rtn", "bits": 4}]}
    report = matpress.compress(tiny_llama(), recipe, progress=False)
    table, choice = report.allocation.table, report.allocation.choice
    assert all(table.candidates[c] == "rtn-4b-g128" for c in choice)
    only_monarch = {"budget": "6bpw", "candidates": [{"method": "monarch", "nblocks": 7}]}
    with pytest.raises(BudgetError, match="none of its candidates can encode"):
        matpress.compress(tiny_llama(), only_monarch, progress=False)


def test_a_kquant_target_is_measured_once_where_it_falls_back_to_an_equal_candidate():
    # hidden 256: the attention and gate/up rows fit Q4_K's super-blocks of 256; the down projection's
    # 544 do not, so its Q4_K target is the int5 g32 symmetric grid llama.cpp falls back to (Q5_0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=544, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    layers = [n for n in find_linear_layers(model) if n != "lm_head"]
    cands = candidate_rules([{"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}, {"method": "rtn", "kquant": "q4_k"}])
    table = BudgetMeasurement.measure(model, layers, cands, progress=False).table
    for name, allowed in zip(layers, table.allowed):
        assert allowed == ([0] if name.endswith("down_proj") else [0, 1]), name
    fits = [i for i, n in enumerate(layers) if not n.endswith("down_proj")]
    assert all(table.nbytes[i][1] < table.nbytes[i][0] for i in fits)  # Q4_K: 4.5 bits a weight, Q5_0 5.5


def test_pinned_layer_is_not_subject_to_allow_entries():
    import matpress

    recipe = {
        "budget": "7bpw",
        "rules": [{"pattern": "*.v_proj", "method": "dense", "dtype": "fp16"}],
        "allow": [{"pattern": "*.v_proj", "candidates": ["rtn-8b-*"]}, {"pattern": "*", "candidates": ["rtn-4b-*"]}],
    }
    report = matpress.compress(tiny_llama(), recipe, progress=False)
    assert all(r.format == "dense fp16" for r in report.layers if r.name.endswith("v_proj"))


def test_layers_the_probe_cannot_encode_take_the_typical_end_to_end_weight():
    model = tiny_llama()
    layers = {n: m for n, m in find_linear_layers(model).items() if n != "lm_head"}
    cands = candidate_rules([{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "rtn", "bits": 8, "group_size": 32}])
    allowed = allowed_candidates(list(layers), list(cands), [{"pattern": "*.0.mlp.down_proj", "candidates": ["rtn-8b-*"]}])
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits

    def distortion(m):
        with torch.no_grad():
            return float((m(ids).logits - ref).square().mean())

    table = BudgetMeasurement.measure(model, list(layers), cands, allowed, distortion=distortion, probe="rtn-3b-g32", progress=False).table
    others = sorted(w for n, w in zip(table.layers, table.weight) if n != "model.layers.0.mlp.down_proj")
    assert table.weight[table.layers.index("model.layers.0.mlp.down_proj")] == others[len(others) // 2]


def test_cli_refuses_single_rule_flags_with_a_budget(tmp_path, capsys):
    from matpress.cli import main

    assert main(["compress", "minilm", "--budget", "3bpw", "--bits", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--bits describe one rule for every layer" in capsys.readouterr().err


def test_pinned_awq_keeps_its_scales_in_the_format_on_the_budget_path(minilm):
    # AWQ folding would divide up_proj's rows by the scale found for down_proj; a budget-chosen up_proj
    # that falls back to its measured format would then no longer match the folded down_proj
    import matpress

    model = tiny_llama(vocab=minilm.tokenizer.vocab_size)
    up = model.model.layers[0].mlp.up_proj
    before = up.weight.detach().clone()
    recipe = {
        "budget": "6bpw", "candidates": "quant", "calibration": SMALL_CALIBRATION,
        "rules": [{"pattern": "*.down_proj", "method": "awq", "bits": 4, "group_size": 32}],
    }
    matpress.compress(model, recipe, tokenizer=minilm.tokenizer, progress=False)
    assert torch.equal(up.weight, before)
