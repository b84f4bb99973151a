import copy

import pytest
import torch
from torch import nn

import matpress
from matpress.errors import CheckpointError, FormatError, RecipeError
from matpress.io import MANIFEST, TENSORS
from matpress.nn.layers import CompressedLinear
from matpress.nn.layout import find_linear_layers, linear_weight

from checkpoint_edits import edit_manifest
from conftest import tiny_gpt2, tiny_llama


def inputs_for(model: nn.Module) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def outputs_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_compress_save_load_gives_identical_outputs(tiny_model, tmp_path):
    dense_layers = find_linear_layers(tiny_model)
    weights = {n: linear_weight(m).clone() for n, m in dense_layers.items()}
    report = matpress.compress(tiny_model, {"default": {"bits": 3, "group_size": 32}}, progress=False)
    compressed = {r.name for r in report.layers}
    assert compressed == {n for n in dense_layers if "lm_head" not in n and "embed" not in n}
    for r in report.layers:
        module = tiny_model.get_submodule(r.name)
        assert isinstance(module, CompressedLinear)
        # the reported relative error is the real one, and 3-bit RTN is far from exact but not garbage
        w = weights[r.name]
        assert r.relative_error == pytest.approx(float((w - module.fmt.decode()).norm() / w.norm()), rel=1e-5)
        assert 0.01 < r.relative_error < 0.3
    inputs = inputs_for(tiny_model)
    before = outputs_of(tiny_model, inputs)
    matpress.save(tiny_model, tmp_path / "ckpt")
    loaded = matpress.load(tmp_path / "ckpt")
    assert torch.equal(outputs_of(loaded, inputs), before)
    assert {n for n, m in loaded.named_modules() if isinstance(m, CompressedLinear)} == compressed


def test_save_pretrained_of_a_compressed_model_writes_a_matpress_checkpoint(tmp_path):
    # transformers' own save_pretrained wrote a plain-looking directory whose reload silently gave
    # freshly initialised weights in place of every compressed layer
    model = tiny_llama()
    matpress.compress(model, {"default": {"method": "rtn", "bits": 4, "group_size": 32}}, progress=False)
    inputs = inputs_for(model)
    copy_of = copy.deepcopy(model)
    copy_of.save_pretrained(tmp_path / "ckpt")  # the copy saves itself, not the model it was copied from
    loaded = matpress.load(tmp_path / "ckpt")
    assert torch.equal(outputs_of(loaded, inputs), outputs_of(model, inputs))
    assert (tmp_path / "ckpt" / MANIFEST).is_file()
    loaded.save_pretrained(tmp_path / "again")  # a loaded model too
    assert torch.equal(outputs_of(matpress.load(tmp_path / "again"), inputs), outputs_of(model, inputs))


@pytest.mark.parametrize("options", [{"push_to_hub": True}, {"safe_serialization": False}, {"max_shard_size": "1GB"}])
def test_save_pretrained_options_a_matpress_checkpoint_cannot_honour_are_refused(tmp_path, options):
    model = tiny_llama()
    matpress.compress(model, {"default": {"method": "rtn", "bits": 8}}, progress=False)
    with pytest.raises(CheckpointError, match="matpress.save"):
        model.save_pretrained(tmp_path / "ckpt", **options)
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_really_shrinks(tmp_path):
    model = tiny_llama(layers=2, hidden=128)
    n_linear = sum(linear_weight(m).numel() for n, m in find_linear_layers(model).items() if n != "lm_head")
    matpress.save(model, tmp_path / "dense")
    report = matpress.compress(model, {"default": {"bits": 4, "group_size": 64}}, progress=False)
    matpress.save(model, tmp_path / "int4")
    saved = (tmp_path / "dense" / TENSORS).stat().st_size - (tmp_path / "int4" / TENSORS).stat().st_size
    # the file shrinks by the fp32 bytes of the linear weights minus what their int4 form holds
    assert saved == pytest.approx(4 * n_linear - report.nbytes, rel=0.01)
    # 4-bit codes plus an fp16 scale and zero per group of 64 (a short last group where in % 64 != 0)
    expected = sum(o * (i * 4 // 8) + o * -(-i // 64) * 4 for o, i in (r.shape for r in report.layers))
    assert report.nbytes == expected


def test_gpt2_conv1d_layers_are_transposed_correctly():
    model = tiny_gpt2()
    x = torch.randn(3, model.config.n_embd)
    conv = model.transformer.h[0].mlp.c_fc
    expected = conv(x)
    matpress.compress(model, {"default": {"method": "dense"}}, progress=False)
    assert torch.allclose(model.transformer.h[0].mlp.c_fc(x), expected, atol=1e-6)


def test_tied_lm_head_survives_save_and_load(tmp_path):
    model = tiny_gpt2()
    matpress.compress(model, None, progress=False)
    matpress.save(model, tmp_path)
    loaded = matpress.load(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_moving_and_casting_keeps_the_stored_format():
    model = tiny_llama()
    matpress.compress(model, None, progress=False)
    layer = model.model.layers[0].mlp.up_proj
    packed = layer.fmt.packed.clone()
    model.half().float()
    assert layer.fmt.packed.dtype == torch.uint8 and torch.equal(layer.fmt.packed, packed)
    assert layer.fmt.scales.dtype == torch.float16
    assert {k for k in layer.state_dict()} == {"packed", "scales", "zeros"}


def test_plain_torch_module_round_trips_with_a_skeleton(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))  # noqa: E731
    model = make()
    x = torch.randn(5, 40)
    matpress.compress(model, {"default": {"bits": 5, "group_size": 16}}, progress=False)
    expected = model(x)
    matpress.save(model, tmp_path)
    with pytest.raises(CheckpointError, match="pass the model skeleton"):
        matpress.load(tmp_path)
    assert torch.equal(matpress.load(tmp_path, model=make())(x), expected)


def test_recipe_matching_nothing_is_an_error():
    with pytest.raises(RecipeError, match="matches no linear layer.*model.layers.0"):
        matpress.compress(tiny_llama(), {"include": ["nothing*"]}, progress=False)


def test_nan_weights_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(FormatError, match=r"layer model.layers.1.self_attn.k_proj: .*NaN"):
        matpress.compress(model, None, progress=False)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_llama()
    matpress.compress(model, None, progress=False)
    return matpress.save(model, tmp_path / "ckpt")


def test_truncated_tensor_file_is_refused(checkpoint):
    data = (checkpoint / TENSORS).read_bytes()
    (checkpoint / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{TENSORS}: tensor .* lies outside the file .* truncated"):
        matpress.load(checkpoint)


def test_tampered_tensor_file_is_refused(checkpoint):
    data = bytearray((checkpoint / TENSORS).read_bytes())
    data[-10] ^= 0xFF
    (checkpoint / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        matpress.load(checkpoint)


def test_manifest_shape_mismatch_names_the_layer(checkpoint):
    def change(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [7, 7]

    edit_manifest(checkpoint, change)
    with pytest.raises(CheckpointError, match=r"layer model.layers.0.mlp.up_proj: manifest shape \(7, 7\)"):
        matpress.load(checkpoint)


def test_manifest_tensor_mismatch_names_the_layer(checkpoint):
    def change(m):
        m["layers"]["model.layers.1.self_attn.o_proj"]["config"]["bits"] = 3

    edit_manifest(checkpoint, change)
    with pytest.raises(CheckpointError, match="layer model.layers.1.self_attn.o_proj: .*packed"):
        matpress.load(checkpoint)


def test_unknown_format_version_is_refused(checkpoint):
    edit_manifest(checkpoint, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        matpress.load(checkpoint)


def test_unknown_layer_format_is_refused(checkpoint):
    def change(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["format"] = "hologram"

    edit_manifest(checkpoint, change)
    with pytest.raises(CheckpointError, match="unknown format 'hologram'"):
        matpress.load(checkpoint)


def test_missing_or_corrupt_manifest(checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not a matpress checkpoint"):
        matpress.load(tmp_path / "elsewhere")
    (checkpoint / MANIFEST).write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        matpress.load(checkpoint)
