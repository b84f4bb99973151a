"""compressed-tensors export (``matpress export --to compressed-tensors``): the package's own
pack-quantized decompression of every exported layer equals matpress's decode bit for bit (an fp32
model: scales in fp32), and layers it cannot hold are refused naming them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import matpress
from matpress.cli import main
from matpress.errors import MatpressError
from matpress.export.compressed_tensors import int32_words
from matpress.formats import IntFormat

from test_export_gguf import llama_checkpoint

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402

DEFAULT = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}
RULES = [  # symmetric and asymmetric, groups and per channel, 4 and 8 bits, a dense layer, a compressed embedding
    {"pattern": "*k_proj", "bits": 4, "group_size": 32, "symmetric": False},
    {"pattern": "*v_proj", "bits": 8, "group_size": None, "symmetric": True},
    {"pattern": "*o_proj", "method": "gptq", "bits": 4, "group_size": 64, "symmetric": False},
    {"pattern": "*up_proj", "method": "dense", "dtype": "fp16"},
    {"pattern": "*embed_tokens", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
]


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_words_are_the_packages_packing(bits):
    codes = torch.randint(0, 1 << bits, (5, 72))
    fmt = IntFormat.from_codes(codes, torch.ones(5, 1), torch.full((5, 1), 2.0 ** (bits - 1)), bits, None, True)
    theirs = pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)
    assert torch.equal(int32_words(fmt.packed, 72, bits), theirs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ct")
    checkpoint = llama_checkpoint(root, "ck", RULES, DEFAULT)
    report = matpress.export(checkpoint, root / "out", to="compressed-tensors")
    return {"root": root, "checkpoint": checkpoint, "report": report, "out": root / "out"}


def test_the_packages_decompression_equals_matpress_decode(exported):
    model = matpress.load(exported["checkpoint"])
    config = json.loads((exported["out"] / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    stored = load_file(str(exported["out"] / "model.safetensors"))
    schemes = {}
    for group in quantization["config_groups"].values():
        scheme = QuantizationScheme(**group)
        schemes.update(dict.fromkeys(group["targets"], scheme))
    assert len(schemes) == 12  # 2 blocks x (q, k, v, o, gate, down); up_proj is dense
    for name, scheme in schemes.items():
        local = {key.rsplit(".", 1)[1]: t for key, t in stored.items() if key.rsplit(".", 1)[0] == name}
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, model.get_submodule(name).fmt.decode()), name
    assert {"model.layers.0.mlp.up_proj", "lm_head"} <= set(quantization["ignore"])
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    embedding = model.get_submodule("model.embed_tokens").fmt.decode()
    assert torch.equal(stored["model.embed_tokens.weight"], embedding)  # written decoded, exactly
    assert "lm_head.weight" not in stored and config["tie_word_embeddings"]
    assert (exported["out"] / "tokenizer.json").is_file()


def test_layers_it_cannot_hold_are_refused_naming_them(tmp_path):
    for rule, why in (
        ({"pattern": "model.layers.1.mlp.down_proj", "bits": 3, "group_size": 32}, "4 or 8 bits"),
        ({"pattern": "model.layers.1.mlp.down_proj", "bits": 4, "group_size": 96}, "not whole groups of 96"),
        ({"pattern": "model.layers.1.mlp.down_proj", "method": "hqq", "bits": 4, "group_size": 32}, "not integers"),
    ):
        checkpoint = llama_checkpoint(tmp_path, f"odd-{len(why)}", [rule], DEFAULT)
        with pytest.raises(MatpressError, match=rf"layer model\.layers\.1\.mlp\.down_proj: .*{why}"):
            matpress.export(checkpoint, tmp_path / "out", to="compressed-tensors")
        assert not (tmp_path / "out").exists()


def test_options_of_another_target_and_taken_outputs_are_refused(exported, tmp_path, capsys):
    with pytest.raises(MatpressError, match="takes no option allow_requantize"):
        matpress.export(exported["checkpoint"], tmp_path / "x", to="compressed-tensors", allow_requantize=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep").write_text("mine")
    assert main(["export", str(exported["checkpoint"]), str(taken), "--to", "compressed-tensors"]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "keep").read_text() == "mine"
    assert main(["export", str(exported["checkpoint"]), str(taken), "--to", "compressed-tensors", "--force"]) == 0
    assert (taken / "config.json").is_file() and not (taken / "keep").exists()
