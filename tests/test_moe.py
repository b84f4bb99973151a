"""Fused mixture-of-experts parameters compressed per expert (matpress.nn.experts): tiny random Mixtral,
Qwen3-MoE and OLMoE models built from configs."""

import copy
import importlib
import inspect
import warnings

import pytest
import torch
import transformers
from torch import nn

import matpress
from matpress.nn import experts as experts_module
from matpress.passes import layers as passes_layers
from matpress.errors import CheckpointError, RecipeError
from matpress.nn.experts import CALIBRATION_FREE, MIN_EXPERT_TOKENS, SUPPORTED_EXPERTS, UnfusedExperts, find_fused_experts
from matpress.formats import IntFormat
from matpress.io import read_checkpoint
from matpress.nn.layers import CompressedLinear
from matpress.methods import METHODS

from checkpoint_edits import edit_manifest
from conftest import random_data
from format_checks import assert_within_kernel_bound, exact_matmul, kernel_error_bound

LAYERS, EXPERTS, TOP_K, VOCAB = 2, 4, 2, 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, num_experts_per_tok=TOP_K)


def tiny_mixtral() -> nn.Module:
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE, intermediate_size=96, num_local_experts=EXPERTS))


def tiny_qwen3_moe() -> nn.Module:
    cfg = transformers.Qwen3MoeConfig(**SHAPE, head_dim=16, intermediate_size=128, moe_intermediate_size=48, num_experts=EXPERTS)
    return transformers.Qwen3MoeForCausalLM(cfg)


def tiny_olmoe() -> nn.Module:
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**SHAPE, intermediate_size=80, num_experts=EXPERTS))


FAMILIES = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "olmoe": tiny_olmoe}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def experts_of(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp.experts for layer in model.model.layers]


def expert_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if ".experts." in n and isinstance(m, CompressedLinear)}


RTN4 = {"default": {"method": "rtn", "bits": 4, "group_size": 32}}


def test_every_supported_class_runs_the_forward_the_unfused_module_follows():
    """The allowlist is only as good as this: each class's own forward is Mixtral's loop, line for line."""
    reference = inspect.getsource(transformers.models.mixtral.modeling_mixtral.MixtralExperts.forward.__wrapped__)
    for name, family in SUPPORTED_EXPERTS.items():
        cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
        assert inspect.getsource(cls.forward.__wrapped__) == reference, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_is_compressed_and_computes_with_its_decoded_weight(family, tmp_path):
    model = build(family)
    reference = copy.deepcopy(model)
    report = matpress.compress(model, RTN4, progress=False)
    layers = expert_layers(model)
    assert len(layers) == LAYERS * EXPERTS * 2  # gate_up_proj and down_proj of every expert of every layer
    assert all(isinstance(e, UnfusedExperts) for e in experts_of(model))
    rows = {r.name: r for r in report.layers}
    for name, layer in layers.items():
        assert rows[name].format == "int4 g32 asym" and rows[name].bits_per_weight == layer.fmt.bits_per_weight
        assert f"| {name} | {layer.fmt.shape[0]}x{layer.fmt.shape[1]} | int4 g32 asym |" in report.table()
    # the reference: the same attention layers (RTN is deterministic), each expert's slice of the fused
    # parameters replaced by its format's decode(), routed by the model's own fused module
    matpress.compress(reference, {**RTN4, "exclude": ["*lm_head", "*embed*", "*.experts.*"]}, progress=False)
    for fused, unfused in zip(experts_of(reference), experts_of(model)):
        for projection in ("gate_up_proj", "down_proj"):
            for e, layer in enumerate(getattr(unfused, projection)):
                getattr(fused, projection).data[e] = layer.fmt.decode()
    # with the kernels off both sides run F.linear on the same fp32 weights and inputs in the same
    # order; the BLAS may still sum a product in another order for a weight that is a slice of the fused
    # parameter (seen on an AMD EPYC, not on a Xeon), so each logit may move by fp32 roundings of sums of
    # at most hidden + intermediate + positions terms per block, each at most max|logit| in size
    with exact_matmul():
        ours, theirs = logits(model, ids()), logits(reference, ids())
    terms = LAYERS * (SHAPE["hidden_size"] + 128 + SHAPE["max_position_embeddings"])
    assert bool(((ours - theirs).abs() <= terms * torch.finfo(torch.float32).eps * theirs.abs().max()).all())
    seen = {}  # through the kernels, an expert is within the kernels' tested bound of x @ decode().T
    name, layer = next(iter(layers.items()))
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    expected = logits(model, ids())
    assert_within_kernel_bound(seen["y"], layer.fmt, seen["x"], 32)
    matpress.save(model, tmp_path / "ckpt")
    assert read_checkpoint(tmp_path / "ckpt").manifest["experts"] == {
        f"model.layers.{i}.mlp.experts": type(experts_of(reference)[i]).__name__ for i in range(LAYERS)
    }
    loaded = matpress.load(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, ids()), expected)
    for name, layer in expert_layers(loaded).items():
        assert all(torch.equal(t, layers[name].fmt.to_tensors()[k]) for k, t in layer.fmt.to_tensors().items())


def test_8bit_rtn_experts_are_within_half_a_quantization_step_of_the_original():
    model = build("mixtral")
    fused = {f"model.layers.{i}.mlp.experts": e for i, e in enumerate(experts_of(model))}
    original = {
        f"{name}.{p}.{e}": getattr(module, p).detach()[e].clone()
        for name, module in fused.items() for p in ("gate_up_proj", "down_proj") for e in range(EXPERTS)
    }
    matpress.compress(model, {"default": {"method": "rtn", "bits": 8, "group_size": 32}}, progress=False)
    seen = {}
    for name, layer in expert_layers(model).items():
        layer.register_forward_hook(lambda m, args, out, name=name: seen.update({name: (args[0], out)}))
    logits(model, ids())
    assert len(seen) >= EXPERTS  # 18 tokens, top-2 of 4 experts per layer: most experts see some
    for name, (x, y) in seen.items():
        fmt = expert_layers(model)[name].fmt
        assert isinstance(fmt, IntFormat)
        # RTN moves each weight by at most half its group's step s; then |x (W' - W)^T| <= |x| (s/2)^T,
        # plus the kernel's own rounding, bounded against decode()
        step = fmt.scale_zero()[0].repeat_interleave(32, dim=1)[:, : fmt.in_features].double()
        quantization = x.double().abs() @ (step / 2).T
        exact = x.double() @ original[name].double().T
        bound = quantization + kernel_error_bound(fmt.decode(), x, 32) + 1e-6 * exact.abs()
        assert bool(((y.double() - exact).abs() <= bound).all()), name


def test_recipe_patterns_select_experts_by_name():
    model = build("qwen3_moe")
    recipe = {
        "default": {"method": "rtn", "bits": 4, "group_size": 16},
        "rules": [
            {"pattern": "*.experts.down_proj.*", "bits": 3},
            {"pattern": "model.layers.1.mlp.experts.gate_up_proj.2", "method": "hqq", "bits": 2, "group_size": 16},
        ],
    }
    report = matpress.compress(model, recipe, progress=False)
    formats = {r.name: r.format for r in report.layers}
    for i in range(LAYERS):
        for e in range(EXPERTS):
            assert formats[f"model.layers.{i}.mlp.experts.down_proj.{e}"] == "int3 g16 asym"
            expected = "int2 g16 asym" if (i, e) == (1, 2) else "int4 g16 asym"
            assert formats[f"model.layers.{i}.mlp.experts.gate_up_proj.{e}"] == expected


def uncompressed_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "left uncompressed" in str(w.message)]


def test_compressed_experts_leave_the_warning_and_excluded_ones_stay_in_it():
    model = build("mixtral")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        matpress.compress(model, RTN4, progress=False)
    assert all(".mlp.experts" not in m for m in uncompressed_warnings(record))
    model = build("mixtral")
    with pytest.warns(UserWarning, match="left uncompressed") as record:
        matpress.compress(model, {**RTN4, "exclude": ["*lm_head", "*embed*", "*.experts.*"]}, progress=False)
    message = uncompressed_warnings(record)[0]
    assert not any(isinstance(e, UnfusedExperts) for e in experts_of(model))
    for i in range(LAYERS):
        assert f"model.layers.{i}.mlp.experts.gate_up_proj 4x192x64" in message
        assert f"model.layers.{i}.mlp.experts.down_proj 4x64x96" in message


def test_gptq_on_experts_uses_the_tokens_routed_to_each_and_falls_back_when_too_few(monkeypatch):
    routed = {}
    rule_of = experts_module.expert_rule

    def recording(model, name, rule, stats):
        routed[name] = 0 if stats is None else stats.n_tokens
        return rule_of(model, name, rule, stats)

    monkeypatch.setattr(passes_layers, "expert_rule", recording)
    model = build("mixtral")
    data = random_data(VOCAB, n=8, seq=16)  # 128 tokens, 256 routed per layer, 64 per expert on average
    report = matpress.compress(model, {"default": {"method": "gptq", "bits": 4, "group_size": 32}}, calibration=data, progress=False)
    rows = {r.name: r for r in report.layers}
    for i in range(LAYERS):
        head = f"model.layers.{i}.mlp.experts"
        # each token goes to TOP_K distinct experts: the experts' statistics count every routed token once
        assert sum(routed[f"{head}.gate_up_proj.{e}"] for e in range(EXPERTS)) == TOP_K * data.n_tokens
        for e in range(EXPERTS):
            for p in ("gate_up_proj", "down_proj"):
                row, n = rows[f"{head}.{p}.{e}"], routed[f"{head}.{p}.{e}"]
                if n >= MIN_EXPERT_TOKENS:
                    assert row.note == ""
                else:
                    assert row.note == f"rtn fallback: {n} calibration tokens routed" and row.note in report.table()
    # methods without a calibration-free counterpart refuse a starved expert (starved_rule's RecipeError)
    assert set(CALIBRATION_FREE) == {m.name for m in METHODS.values() if m.needs_calibration} - {"eora", "vq", "gptq_vq"}
    few = random_data(VOCAB, n=1, seq=8)  # 16 routed tokens per layer: every expert falls back
    model = build("mixtral")
    report = matpress.compress(model, {"default": {"method": "gptq", "bits": 4, "group_size": 32}}, calibration=few, progress=False)
    notes = [r.note for r in report.layers if ".experts." in r.name]
    assert len(notes) == LAYERS * EXPERTS * 2 and all(n.startswith("rtn fallback: ") for n in notes)
    assert all(r.note == "" for r in report.layers if ".experts." not in r.name)


class CustomExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 8))
        self.down_proj = nn.Parameter(torch.randn(3, 8, 8))


class CustomMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = CustomExperts()


def test_unknown_fused_classes_are_left_dense_or_refused_when_a_rule_names_them():
    model = CustomMoE()
    with pytest.warns(UserWarning, match=r"experts\.gate_up_proj 3x16x8"):
        matpress.compress(model, {"default": {"method": "rtn", "bits": 4, "group_size": 8}}, progress=False)
    assert isinstance(model.experts, CustomExperts)
    with pytest.raises(RecipeError, match=r"fused experts experts: CustomExperts is not a fused-experts class matpress knows .*"
                       r"e\.g\. experts\.down_proj\.0.*exclude: \['experts\.\*'\]"):
        matpress.compress(CustomMoE(), {"rules": [{"pattern": "*.down_proj.*", "bits": 8, "group_size": 8}]}, progress=False)


def test_a_calibrated_method_without_a_calibration_free_counterpart_is_refused_for_starved_experts():
    with pytest.raises(RecipeError, match=r"expert model\.layers\.0\.mlp\.experts\.\w+\.\d was routed \d+ calibration tokens.*"
                       "'eora' has no calibration-free counterpart"):
        matpress.compress(build("mixtral"), {"default": {"method": "eora", "bits": 4, "group_size": 32, "rank": 4}},
                          calibration=random_data(VOCAB, n=1, seq=8), progress=False)


def test_a_checkpoint_naming_experts_the_model_lacks_is_refused(tmp_path):
    model = build("olmoe")
    matpress.compress(model, RTN4, progress=False)
    matpress.save(model, tmp_path / "ckpt")
    # re-signed (the digests recomputed), so the edit reaches the checks behind them
    edit_manifest(tmp_path / "ckpt", lambda m: m["experts"].update({"model.layers.1.mlp.experts": "MixtralExperts"}))
    with pytest.raises(CheckpointError, match="no fused MixtralExperts experts module model.layers.1.mlp.experts"):
        matpress.load(tmp_path / "ckpt")
    assert find_fused_experts(build("olmoe"))  # a fresh model is fused until a checkpoint says otherwise


def test_a_budget_allocates_per_expert_and_measures_starved_experts_under_their_fallback():
    model = build("mixtral")
    # 4 tokens: 8 routed per layer, every expert short of MIN_EXPERT_TOKENS (some routed none at all)
    report = matpress.compress(model, {"budget": "4.5bpw", "candidates": "quant"}, calibration=random_data(VOCAB, n=1, seq=4),
                               progress=False)
    table = report.allocation.table
    names = [f"model.layers.{i}.mlp.experts.{p}.{e}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj") for e in range(EXPERTS)]
    assert set(names) <= set(table.layers)  # one row, and one choice, per expert matrix
    assert report.bits_per_weight <= 4.5
    rows = {r.name: r for r in report.layers}
    assert all(rows[n].note.startswith("rtn fallback: ") and rows[n].format.startswith("int") for n in names)
