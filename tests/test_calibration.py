"""Calibration data, statistics with padding masked out, and the block-by-block pass."""

import weakref

import pytest
import torch
from torch import nn

import matpress
from matpress.passes.sequential import compress_sequential
from matpress.recipe import CalibrationSettings
from matpress.walk import CalibrationData, collect_stats
from matpress.walk.blocks import find_blocks
from matpress.errors import CalibrationError, RecipeError
from matpress.evaluation.text import CALIBRATION, corpus
from matpress.nn.layers import CompressedLinear
from matpress.nn.layout import find_linear_layers
from matpress.recipe import Recipe

from conftest import random_data, tiny_bert, tiny_llama


def test_windows_from_builtin_text(minilm):
    data = CalibrationData.from_text(minilm.tokenizer, "builtin", n_samples=10, seq_len=32, batch_size=4)
    assert [b["input_ids"].shape for b in data.batches] == [(4, 32), (4, 32), (2, 32)]
    assert data.n_tokens == 10 * 32
    # windows are spread over the whole calibration split: the first and the last whole window of it
    ids = minilm.tokenizer(corpus(CALIBRATION), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    last = len(ids) // 32 - 1
    assert data.batches[0]["input_ids"][0].tolist() == ids[:32].tolist()
    assert data.batches[-1]["input_ids"][-1].tolist() == ids[last * 32 : (last + 1) * 32].tolist()


def test_sentences_are_padded_with_mask(minilm, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("A short sentence about nothing much at all.\n\nA much longer sentence that goes on and on "
                    "about lists, tuples, dictionaries and sets in Python.\n")
    data = CalibrationData.from_text(minilm.tokenizer, str(path), n_samples=5, seq_len=64, unit="sentence")
    assert data.n_samples == 2
    mask = data.batches[0]["attention_mask"]
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]  # the short one is padded


@pytest.mark.parametrize("text", ["", "   ", [], ["", "x"]])
def test_empty_text_is_a_clear_error(minilm, text):
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationData.from_text(minilm.tokenizer, text)


def test_text_shorter_than_one_sequence(minilm):
    with pytest.raises(CalibrationError, match="fewer than one sequence of 128"):
        CalibrationData.from_text(minilm.tokenizer, ["Just a few words here."], seq_len=128)


def test_missing_file_and_bad_settings(minilm, tmp_path):
    with pytest.raises(CalibrationError, match="not an existing file"):
        CalibrationData.from_text(minilm.tokenizer, str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match="unit"):
        CalibrationData.from_text(minilm.tokenizer, unit="paragraph")
    with pytest.raises(CalibrationError, match="seq_len"):
        CalibrationData.from_text(minilm.tokenizer, seq_len=0)


def test_padding_is_masked_out_of_statistics():
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(5, 128, (16,), generator=gen), torch.randint(5, 128, (9,), generator=gen)
    padded = torch.stack([a, torch.cat([b, torch.zeros(7, dtype=torch.long)])])
    mask = torch.stack([torch.ones(16, dtype=torch.long), torch.cat([torch.ones(9), torch.zeros(7)]).long()])
    together = collect_stats(model, CalibrationData.from_token_ids(padded, 2, mask), progress=False)
    alone_a = collect_stats(model, CalibrationData.from_token_ids(a[None], 1), progress=False)
    alone_b = collect_stats(model, CalibrationData.from_token_ids(b[None], 1), progress=False)
    for name, st in together.items():
        if name == "pooler.dense":  # reads the first token of each sequence: no padding to mask
            assert st.n_tokens == 2
            continue
        assert st.n_tokens == 25
        expected = alone_a[name].xtx + alone_b[name].xtx
        # same tokens, same activations (attention ignores padding): equal up to fp32 summation order
        assert torch.allclose(st.xtx, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert torch.allclose(st.abs_sum, alone_a[name].abs_sum + alone_b[name].abs_sum, rtol=1e-4, atol=1e-3)


def test_collect_stats_bad_layers():
    with pytest.raises(CalibrationError, match="no linear layers"):
        collect_stats(nn.Sequential(nn.ReLU()), random_data(10), progress=False)
    with pytest.raises(CalibrationError, match="not linear layers"):
        collect_stats(tiny_llama(), random_data(128), ["model.layers.0.nope"], progress=False)


@pytest.mark.parametrize("make, prefix", [(tiny_llama, "model.layers"), (tiny_bert, "encoder.layer")])
def test_find_blocks(make, prefix):
    name, blocks = find_blocks(make(layers=3))
    assert name == prefix and len(blocks) == 3


def test_gptq_compresses_each_architecture_block_by_block(tiny_model):
    inputs = random_data(tiny_model.config.vocab_size, n=2, seq=12, seed=1).batches[0]
    with torch.inference_mode():
        before = tiny_model(**inputs)[0]
    report = matpress.compress(
        tiny_model, {"default": {"method": "gptq", "bits": 8, "group_size": 32}},
        calibration=random_data(tiny_model.config.vocab_size), progress=False,
    )
    assert report.layers and all(isinstance(tiny_model.get_submodule(r.name), CompressedLinear) for r in report.layers)
    with torch.inference_mode():
        after = tiny_model(**inputs)[0]
    # 8-bit weights: each within half a step (1/510 of its group's range) of the original
    assert float((after - before).norm() / before.norm()) < 0.02


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x)) * mask.unsqueeze(-1)


class Deep(nn.Module):
    """A test double of a transformer: an embedding and 10 residual blocks taking a keyword argument."""

    WIDTH = 40

    def __init__(self, depth: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, self.WIDTH)
        self.blocks = nn.ModuleList(Block(self.WIDTH) for _ in range(depth))
        self.activations: weakref.WeakSet = weakref.WeakSet()  # every block input or output still alive
        self.live: list[int] = []
        for block in self.blocks:
            block.register_forward_hook(self.count)

    def count(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.activations.add(out)
        self.live.append(len(self.activations))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        self.activations.add(x)
        for block in self.blocks:
            x = block(x, mask=attention_mask.float())
        return x


def test_sequential_pass_holds_one_block_of_activations():
    model = Deep()
    data = random_data(50, n=12, seq=8, batch_size=2)  # 6 batches
    rule = Recipe.simple("gptq", bits=4, group_size=None).default
    reports = compress_sequential(model, {f"blocks.{i}.fc": rule for i in range(10)}, data, progress=False)
    assert len(reports) == 10
    # 6 batches of inputs plus the output just computed; holding every block's activations would be 60
    assert max(model.live) == 6 + 1


def test_stage_statistics_run_the_block_only_up_to_the_stage():
    """Each stage's statistics stop the block's forward at the stage's input: in a Llama block the
    attention completes only in the forwards for gate/up and down, the MLP's activation only in the
    one for down (plus, for each, the one traced call)."""
    model = tiny_llama(layers=1)
    data = random_data(model.config.vocab_size, n=8, batch_size=2)  # 4 batches
    calls = {"self_attn": 0, "mlp.act_fn": 0}  # modules that stay in place (linear layers are replaced)
    for name in calls:
        model.get_submodule(f"model.layers.0.{name}").register_forward_hook(
            lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    rule = Recipe.simple("gptq", bits=4, group_size=None).default
    chosen = {name: rule for name in find_linear_layers(model) if name.startswith("model.layers.0.")}
    compress_sequential(model, chosen, data, progress=False)
    batches = len(data.batches)  # the one block has no propagation: nothing follows it
    assert calls == {"self_attn": 1 + 2 * batches, "mlp.act_fn": 1 + batches}


def test_compress_needs_calibration_text():
    with pytest.raises(CalibrationError, match="tokenizer"):
        matpress.compress(tiny_llama(), {"default": {"method": "gptq"}}, progress=False)


def test_recipe_calibration_settings():
    recipe = Recipe.from_dict({"default": {"method": "awq"}, "calibration": {"samples": 16, "seq_len": 32}})
    assert recipe.calibration == CalibrationSettings(samples=16, seq_len=32)
    assert Recipe.from_dict(recipe.to_dict()).calibration == recipe.calibration
    with pytest.raises(CalibrationError, match="unknown key"):
        Recipe.from_dict({"calibration": {"sample": 16}})
    with pytest.raises(CalibrationError, match="samples"):
        Recipe.from_dict({"calibration": {"samples": -1}})


def test_recipe_calibration_drives_compress(minilm):
    import copy

    model = copy.deepcopy(minilm.model)
    recipe = {"default": {"method": "gptq", "bits": 4}, "include": ["encoder.layer.0.*"],
              "calibration": {"samples": 16, "seq_len": 32}}
    report = matpress.compress(model, recipe, tokenizer=minilm.tokenizer, progress=False)
    assert len(report.layers) == 6
    assert len([m for m in model.modules() if isinstance(m, CompressedLinear)]) == 6


def test_stats_argument_still_works():
    model = tiny_llama()
    names = [n for n in find_linear_layers(model) if n != "lm_head"]
    stats = collect_stats(model, random_data(128), names, progress=False)
    report = matpress.compress(model, {"default": {"method": "awq", "bits": 4, "group_size": 32}}, stats=stats, progress=False)
    assert len(report.layers) == len(names)
    with pytest.raises(RecipeError, match="needs calibration"):
        matpress.compress(tiny_llama(), {"default": {"method": "gptq"}}, stats={}, progress=False)


def test_awq_folds_scales_where_the_architecture_allows():
    model = tiny_llama()  # 4 heads sharing 2 key/value heads: o_proj cannot fold into v_proj
    inputs = random_data(128, n=2, seq=12, seed=1).batches[0]
    with torch.inference_mode():
        before = model(**inputs).logits
    report = matpress.compress(model, {"default": {"method": "awq", "bits": 8, "group_size": 32}},
                               calibration=random_data(128), progress=False)
    formats = {r.name.split(".", 3)[-1]: r.format for r in report.layers if ".0." in r.name}
    # folded into input_layernorm, post_attention_layernorm and up_proj: plain int, no stored scale
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert formats[name] == "int8 g32 asym", name
    assert formats["self_attn.o_proj"] == "scaled int8 g32 asym"
    with torch.inference_mode():
        after = model(**inputs).logits
    assert float((after - before).norm() / before.norm()) < 0.02  # a wrong fold would change the function
