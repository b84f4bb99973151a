"""GGUF export (matpress.export, ``matpress export --to gguf``): every exact block mapping read back by
the gguf package equals matpress's decode bit for bit (asymmetric ones within the fp16 rounding of the
block minimum), whole files load through transformers' GGUF loader with the same logits and tokenizer,
and bad input is refused without leaving a file behind."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import transformers

import matpress
from matpress.cli import main
from matpress.errors import MatpressError
from matpress.export.blocks import BLOCK, CODEBOOK_TYPE, INT_TYPES, format_blocks, q1_minimum_error
from matpress.export.gguf import EXACT, FP16_MINIMUM, REQUANTIZED, qk_row_order
from matpress.formats import IntFormat
from matpress.formats.codebook import IQ4NL_LEVELS, CodebookFormat
from matpress.formats.dense import DenseFormat
from matpress.formats.kquant import KQUANTS
from matpress.formats.transformed import TransformedFormat
from matpress.methods import LayerStats, get_method
from matpress.nn.layers import FormatModule, TiedLinear
from matpress.recipe import resolve_candidates

from conftest import byte_level_tokenizer, tiny_gpt2

gguf = pytest.importorskip("gguf")

FP32_EPS = 2.0**-24  # unit roundoff of fp32


def dequantized(data: torch.Tensor, type_name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[type_name]).copy())


# -- block mappings, tensor by tensor -----------------------------------------------------------------

INT_CASES = [  # (bits, symmetric, group): every exact pair, groups of 32*k, a short last group, per channel
    (4, True, 32), (4, True, 96), (4, False, 64), (5, True, 64), (5, False, 32), (5, False, None), (8, True, 128), (8, True, None),
]


@pytest.mark.parametrize("bits,symmetric,group", INT_CASES)
def test_int_blocks_dequantize_to_matpress_decode(bits, symmetric, group):
    # 37 rows, 224 columns: 7 blocks, so a group of 96 or 128 leaves a shorter last group
    torch.manual_seed(bits)
    weight = torch.randn(37, 224) * torch.logspace(-3, 1, 37).unsqueeze(1) + 0.3
    fmt = IntFormat.encode(weight, bits=bits, group_size=group, symmetric=symmetric)
    blocks = format_blocks(fmt)
    assert blocks.type_name == {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}[(bits, symmetric)]
    ours = fmt.decode().double()
    theirs = dequantized(blocks.data, blocks.type_name).double()
    if symmetric:  # the same codes times the same fp16 scale: bit-exact
        assert torch.equal(theirs, ours)
        return
    # Q4_1 / Q5_1 store m = fp16(-z*s): every weight of a block moves by exactly |m + z*s|, and both sides
    # round their last fp32 operation (at most an ulp of the result each)
    shift = q1_minimum_error(fmt).repeat_interleave(BLOCK, dim=1)
    bound = shift + 2 * FP32_EPS * (ours.abs() + theirs.abs())
    assert ((theirs - ours).abs() <= bound).all()
    assert shift.max() > 0  # the test exercises the rounding it bounds


@pytest.mark.parametrize("dtype,type_name", [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_dense_blocks_hold_the_stored_values(dtype, type_name):
    fmt = DenseFormat.encode(torch.randn(5, 48), dtype={torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype])
    blocks = format_blocks(fmt)
    assert blocks.type_name == type_name
    assert torch.equal(dequantized(blocks.data, type_name), fmt.weight.float())


@pytest.mark.parametrize("bits,symmetric,group,why", [
    (3, True, 32, "no 3-bit symmetric grid"), (8, False, 32, "no 8-bit asymmetric grid"), (4, True, 16, "multiples of 32"),
])
def test_int_formats_without_a_gguf_grid_are_refused(bits, symmetric, group, why):
    fmt = IntFormat.encode(torch.randn(8, 64), bits=bits, group_size=group, symmetric=symmetric)
    with pytest.raises(MatpressError, match=why):
        format_blocks(fmt)


FP16_MIN_NORMAL = 2.0**-14


@pytest.mark.parametrize("group,magnitude", [(32, 1.0), (64, 1.0), (None, 1.0), (32, 1e-4)])
def test_iq4nl_codebook_blocks_dequantize_to_matpress_decode(group, magnitude):
    # 224 columns: 7 blocks, so a group of 64 leaves a last group of one block. Weights of 1e-4 put every
    # scale (about max|w| / 127) below fp16's normal range: subnormal d, still bit-exact
    torch.manual_seed(3)
    weight = torch.randn(37, 224) * torch.logspace(-1, 0, 37).unsqueeze(1) * magnitude
    fmt = CodebookFormat.encode(weight, bits=4, group_size=group, table="iq4nl")
    if magnitude < 1:
        assert (fmt.scales.float().abs() < FP16_MIN_NORMAL).all() and (fmt.scales != 0).all()
    blocks = format_blocks(fmt)
    assert blocks.type_name == "IQ4_NL" and blocks.data.shape == (37, 224 // BLOCK * 18)  # 2 bytes of d + 16 of codes
    # the same fp16 scale times the same integer level, both products exact in fp32: bit-exact
    assert torch.equal(dequantized(blocks.data, "IQ4_NL"), fmt.decode())


def test_learned_tables_equal_to_iq4nl_levels_map_and_others_do_not():
    torch.manual_seed(4)
    weight = torch.randn(6, 64)
    exact = CodebookFormat.encode(weight, bits=4, group_size=32, table="iq4nl")
    rows = torch.tensor(IQ4NL_LEVELS).expand(6, -1)
    for kind, table in (("layer", rows[:1]), ("row", rows)):  # what a table is called does not decide: its levels do
        fmt = CodebookFormat.from_codes(exact.codes(), exact.scales, table, 4, 32, kind)
        assert torch.equal(dequantized(format_blocks(fmt).data, "IQ4_NL"), fmt.decode())
    one_row_off = rows.clone()
    one_row_off[5, 0] = -126
    fmt = CodebookFormat.from_codes(exact.codes(), exact.scales, one_row_off, 4, 32, "row")
    with pytest.raises(MatpressError, match="row table's levels are not IQ4_NL's.*--table iq4nl --bits 4 --group 32"):
        format_blocks(fmt)


@pytest.mark.parametrize("bits,group,table,columns,why", [
    (4, 32, "nl", 64, "nl table's levels are not IQ4_NL's"),
    (3, 32, "nl", 64, "codes are 3-bit, not 4-bit"),
    (4, 16, "iq4nl", 64, r"the group \(16\) must be multiples of 32"),
    (4, None, "iq4nl", 80, r"row length \(80\).*multiples of 32"),
])
def test_codebooks_without_an_iq4nl_counterpart_are_refused_saying_what_maps(bits, group, table, columns, why):
    fmt = CodebookFormat.encode(torch.randn(8, columns), bits=bits, group_size=group, table=table)
    with pytest.raises(MatpressError, match=why + r".*compress with --method gptq_codebook.*--table iq4nl --bits 4 --group 32"):
        format_blocks(fmt)


def test_a_rotated_iq4nl_codebook_is_refused_naming_the_rotation():
    fmt = TransformedFormat.encode(torch.randn(8, 64), rotate=True, child="codebook", bits=4, group_size=32, table="iq4nl")
    with pytest.raises(MatpressError, match="Hadamard rotation.*cannot be folded into GGUF.*without rotate"):
        format_blocks(fmt)
    format_blocks(fmt.child)  # the child alone maps: the transform is what is refused


def test_qk_row_order_is_llama_cpps_rotary_interleave():
    # head h, half i, position j (rows h*2*half + i*half + j) goes to row h*2*half + 2*j + i
    heads, half = 3, 4
    order = qk_row_order(heads * 2 * half, heads)
    for h in range(heads):
        for i in range(2):
            for j in range(half):
                assert order[h * 2 * half + 2 * j + i] == h * 2 * half + i * half + j


# -- whole models -------------------------------------------------------------------------------------


# every exact mapping in one model, the embedding compressed and the LM head tied to it
MIXED_RULES = [
    {"pattern": "*q_proj", "bits": 4, "group_size": 32, "symmetric": True},
    {"pattern": "*k_proj", "bits": 4, "group_size": 64, "symmetric": False},
    {"pattern": "*v_proj", "bits": 5, "group_size": 32, "symmetric": True},
    {"pattern": "*o_proj", "bits": 5, "group_size": 64, "symmetric": False},
    {"pattern": "*gate_proj", "bits": 8, "group_size": 32, "symmetric": True},
    {"pattern": "*up_proj", "method": "dense", "dtype": "fp16"},
    {"pattern": "*embed_tokens", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
]


def llama_checkpoint(
    root: Path, name: str, rules: list, default: dict, model_type: str = "llama", hidden_size: int = 64, intermediate_size: int = 160,
    budget: Optional[dict] = None,
) -> Path:
    tokenizer = byte_level_tokenizer()
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    source = root / f"{name}-source"
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    loaded = matpress.models.load_pretrained(str(source))
    matpress.compress(loaded.model, {"default": default, "rules": rules, **(budget or {})}, tokenizer=loaded.tokenizer)
    return matpress.save(loaded.model, root / name, tokenizer=loaded.tokenizer)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    checkpoint = llama_checkpoint(root, "mixed", MIXED_RULES, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True})
    report = matpress.export(checkpoint, root / "mixed.gguf")
    return {"root": root, "checkpoint": checkpoint, "report": report, "file": root / "mixed.gguf"}


def assert_exported_tensors_dequantize_to_decode(checkpoint: Path, file: Path, report) -> dict:
    """Every tensor of ``file`` read back by the gguf package equals matpress's decode (in llama.cpp's q/k
    row order), bit for bit where the report says exact, within the fp16 rounding of the block minimum
    where it says so. Returns the report's entries by name."""
    model = matpress.load(checkpoint)
    reader = gguf.GGUFReader(file)
    stored = {t.name: t for t in reader.tensors}
    entries = {e.name: e for e in report.tensors}
    assert "output.weight" not in stored  # the tied head travels as the embedding
    assert {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"} <= set(stored)
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for name, entry in entries.items():
        tensor = stored[name]
        assert tensor.tensor_type.name == entry.type_name
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).double()
        module_name, _, kind = entry.source.rpartition(".")
        module = model.get_submodule(module_name)
        ours = module.fmt.decode() if hasattr(module, "fmt") else getattr(module, kind).detach().float()
        ours = ours.double()
        block_kind = name.split(".")[-2]
        if block_kind in heads:  # llama.cpp's row order for its RoPE
            ours = ours[qk_row_order(ours.shape[0], heads[block_kind])]
        if entry.how == EXACT:
            assert torch.equal(values, ours), name
        else:
            assert entry.how == FP16_MINIMUM and entry.type_name in ("Q4_1", "Q5_1")
            shift = q1_minimum_error(module.fmt).repeat_interleave(BLOCK, dim=1)
            if block_kind in heads:
                shift = shift[qk_row_order(shift.shape[0], heads[block_kind])]
            assert ((values - ours).abs() <= shift + 2 * FP32_EPS * (values.abs() + ours.abs())).all(), name
            assert entry.max_error == pytest.approx(float(shift.max()))
    return entries


def test_every_exported_tensor_dequantizes_to_matpress_decode(mixed):
    entries = assert_exported_tensors_dequantize_to_decode(mixed["checkpoint"], mixed["file"], mixed["report"])
    types = {e.source.rsplit(".", 2)[-2]: e.type_name for e in entries.values() if e.source.startswith("model.layers.0.")}
    assert types == {"q_proj": "Q4_0", "k_proj": "Q4_1", "v_proj": "Q5_0", "o_proj": "Q5_1", "gate_proj": "Q8_0",
                     "up_proj": "F16", "down_proj": "Q4_0", "input_layernorm": "F32", "post_attention_layernorm": "F32"}
    assert entries["token_embd.weight"].type_name == "Q4_0"


# every layer a 4-bit codebook on IQ4_NL's levels: groups of 32, 64 (the down projection's 160 columns: a
# last group of one block), per channel, and the embedding (so the tied head) too
IQ4NL_CODEBOOK = {"method": "codebook", "bits": 4, "group_size": 32, "table": "iq4nl"}
IQ4NL_RULES = [
    {"pattern": "*k_proj", "group_size": 64}, {"pattern": "*down_proj", "group_size": 64},
    {"pattern": "*v_proj", "group_size": None}, {"pattern": "*embed_tokens", **IQ4NL_CODEBOOK},
]


def test_iq4nl_codebook_model_exports_every_tensor_exactly(tmp_path):
    checkpoint = llama_checkpoint(tmp_path, "iq4nl", IQ4NL_RULES, IQ4NL_CODEBOOK)
    report = matpress.export(checkpoint, tmp_path / "iq4nl.gguf")
    entries = assert_exported_tensors_dequantize_to_decode(checkpoint, tmp_path / "iq4nl.gguf", report)
    assert {e.type_name for e in entries.values() if len(e.shape) == 2} == {"IQ4_NL"}
    assert {e.how for e in entries.values()} == {EXACT}
    reader = gguf.GGUFReader(tmp_path / "iq4nl.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_IQ4_NL


# one K-quant per layer kind; the down projection's rows (576) are no multiple of 256 and fall back
KQUANT_RULES = [
    {"pattern": "*q_proj", "kquant": "q2_k"}, {"pattern": "*k_proj", "kquant": "q3_k"}, {"pattern": "*v_proj", "kquant": "q4_k"},
    {"pattern": "*o_proj", "kquant": "q5_k"}, {"pattern": "*gate_proj", "kquant": "q6_k"}, {"pattern": "*down_proj", "kquant": "q4_k"},
    {"pattern": "*embed_tokens", "method": "rtn", "kquant": "q6_k"},
]


def test_kquant_models_export_every_k_type_exactly(tmp_path):
    checkpoint = llama_checkpoint(
        tmp_path, "kquant", KQUANT_RULES, {"method": "rtn", "kquant": "q4_k"}, hidden_size=256, intermediate_size=576,
    )
    report = matpress.export(checkpoint, tmp_path / "kquant.gguf")
    entries = assert_exported_tensors_dequantize_to_decode(checkpoint, tmp_path / "kquant.gguf", report)
    types = {e.source.rsplit(".", 2)[-2]: e.type_name for e in entries.values() if e.source.startswith("model.layers.1.")}
    assert types == {"q_proj": "Q2_K", "k_proj": "Q3_K", "v_proj": "Q4_K", "o_proj": "Q5_K", "gate_proj": "Q6_K",
                     "up_proj": "Q4_K", "down_proj": "Q5_0", "input_layernorm": "F32", "post_attention_layernorm": "F32"}
    assert entries["token_embd.weight"].type_name == "Q6_K"
    fallbacks = [n for n in report.notes if "falls back" in n]
    assert len(fallbacks) == 2 and all("ffn_down" in n and "576" in n and "Q5_0" in n for n in fallbacks)


# every exact GGUF type matpress writes, as the budget's ``gguf`` candidates produce them
GGUF_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "F16"}


def test_the_gguf_candidates_are_every_exact_gguf_type():

    weight = torch.randn(8, 512)  # two super-blocks of 256 a row: every K-quant applies
    for calibrated in (False, True):
        x = torch.randn(600, 512)
        stats = LayerStats(x.T @ x, 600) if calibrated else None
        types = {format_blocks(get_method(r.method).run(weight, r.params, stats)).type_name
                 for r in resolve_candidates("gguf", calibrated=calibrated).values()}
        assert types == GGUF_TYPES == {*INT_TYPES.values(), *(k.upper() for k in KQUANTS), CODEBOOK_TYPE, "F16"}


def test_a_budget_over_the_gguf_candidates_exports_every_tensor_exactly(tmp_path):
    # hidden 256: K-quants fit every projection but the down projection (576 columns), which falls back;
    # 3.5 bits a weight is below every legacy type's 4.5, so the 256-wide rows must take Q2_K or Q3_K
    bpw = 3.5
    checkpoint = llama_checkpoint(
        tmp_path, "budget", [{"pattern": "*embed_tokens", "method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}],
        {"method": "rtn"}, hidden_size=256, intermediate_size=576,
        budget={"budget": f"{bpw}bpw", "candidates": "gguf"},
    )
    report = matpress.export(checkpoint, tmp_path / "budget.gguf")
    entries = assert_exported_tensors_dequantize_to_decode(checkpoint, tmp_path / "budget.gguf", report)
    blocks = [e for e in entries.values() if ".layers." in e.source and len(e.shape) == 2]
    assert {e.type_name for e in blocks} <= GGUF_TYPES
    stored_bits = sum(matpress.load(checkpoint).get_submodule(e.source.rpartition(".")[0]).fmt.nbytes for e in blocks) * 8
    assert stored_bits <= bpw * sum(e.shape[0] * e.shape[1] for e in blocks)
    assert {e.type_name for e in blocks} & {"Q2_K", "Q3_K"}


def test_hyperparameters_and_tokenizer_are_written(mixed):
    reader = gguf.GGUFReader(mixed["file"])

    def field(key):
        f = reader.fields[key]
        return f.contents()

    config = matpress.load(mixed["checkpoint"]).config
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.feed_forward_length") == 160 and field("llama.rope.dimension_count") == 16
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps, rel=1e-7)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokenizer = matpress.io.load_tokenizer(mixed["checkpoint"])
    assert field("tokenizer.ggml.tokens")[:len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert "<|im_start|>" in field("tokenizer.chat_template")
    assert len(field("tokenizer.ggml.merges")) > 0


def test_transformers_loads_the_weights_and_tokenizer(mixed):
    pytest.importorskip("accelerate")
    model = matpress.load(mixed["checkpoint"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(mixed["root"]), gguf_file=mixed["file"].name, dtype=torch.float32)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, module in model.named_modules():
        if not isinstance(module, FormatModule) or isinstance(module, TiedLinear):
            continue
        # transformers undoes the q/k row permutation: each weight is matpress's decode, moved only by the
        # fp16 block minimum of Q4_1 / Q5_1 (zero for the exact types) and the last fp32 rounding
        ours = module.fmt.decode().double()
        theirs = loaded.get_submodule(name).weight.detach().double()
        shift = q1_minimum_error(module.fmt).repeat_interleave(BLOCK, dim=1) if isinstance(module.fmt, IntFormat) else 0.0
        assert ((theirs - ours).abs() <= shift + 2 * FP32_EPS * (theirs.abs() + ours.abs())).all(), name
    tokenizer = matpress.io.load_tokenizer(mixed["checkpoint"])
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(mixed["root"]), gguf_file=mixed["file"].name)
    text = "Lists are mutable sequences, 3.14 and <|im_end|> too"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert gguf_tokenizer.eos_token == tokenizer.eos_token


def test_exact_only_model_loads_with_identical_logits(tmp_path, kernels_off):
    pytest.importorskip("accelerate")
    rules = [{"pattern": "*v_proj", "bits": 8, "group_size": 64, "symmetric": True}]
    checkpoint = llama_checkpoint(tmp_path, "exact", rules, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}, "qwen2")
    report = matpress.export(checkpoint, tmp_path / "exact.gguf")
    assert {t.how for t in report.tensors} == {EXACT}
    assert "blk.0.attn_q.bias" in {t.name for t in report.tensors}  # Qwen2's attention biases, F32
    model = matpress.load(checkpoint)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="exact.gguf", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same fp32 weights and the same operations: the same logits
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_a_gguf_file_is_a_model_source_to_compress(tmp_path, capsys):
    # the dequantized model is cached by the file's SHA-256 (matpress's cache, as for the embedded SmolLM2)
    pytest.importorskip("accelerate")
    checkpoint = llama_checkpoint(tmp_path, "source", [], {"method": "dense"})
    file = tmp_path / "matpress-test-tiny-llama.gguf"
    matpress.export(checkpoint, file)
    loaded = matpress.models.load_pretrained(str(file))
    assert loaded.source == str(file.resolve()) and loaded.tokenizer is not None
    model = matpress.load(checkpoint)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # F32 tensors: the same weights, so the same logits
        assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    out = tmp_path / "compressed"
    assert main(["compress", str(file), "--bits", "4", "--group", "32", "--out", str(out), "--quiet"]) == 0
    assert main(["compress", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.gguf: no such GGUF file" in capsys.readouterr().err


# -- refusals -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    """A checkpoint with a layer in int3 (no GGUF grid)."""
    root = tmp_path_factory.mktemp("gguf-odd")
    rules = [{"pattern": "model.layers.1.mlp.down_proj", "bits": 3, "group_size": 32, "symmetric": False}]
    return llama_checkpoint(root, "odd", rules, {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True})


def test_a_layer_without_counterpart_is_refused_naming_it(odd, tmp_path):
    out = tmp_path / "odd.gguf"
    with pytest.raises(MatpressError, match=r"model\.layers\.1\.mlp\.down_proj: int3 g32 asym.*--allow-requantize"):
        matpress.export(odd, out)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_allow_requantize_reports_the_added_error_within_the_types_bound(odd, tmp_path):
    report = matpress.export(odd, tmp_path / "odd.gguf", allow_requantize=True)
    entry = next(t for t in report.tensors if t.source == "model.layers.1.mlp.down_proj.weight")
    assert entry.how == REQUANTIZED and entry.type_name == "Q4_0"  # 3.5 bits per weight: the nearest is Q4_0
    fmt = matpress.load(odd).get_submodule("model.layers.1.mlp.down_proj").fmt
    # Q4_0 as the gguf package quantizes: d = (signed max of the block) / -8, codes trunc(w/d + 8.5) clipped
    # to 15, so a weight moves by at most |d| (the clipped far end); d is stored in fp16 (relative 2^-11)
    blocks = fmt.decode().reshape(fmt.out_features, -1, BLOCK)
    step = blocks.abs().amax(dim=-1) / 8
    assert 0 < entry.max_error <= float(step.max()) * (1 + 8 * 2.0**-11)
    assert 0 < entry.relative_error < 1
    assert "re-quantized" in report.table()


def test_other_families_are_refused(tmp_path):
    model = tiny_gpt2()
    matpress.compress(model, {"default": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}})
    checkpoint = matpress.save(model, tmp_path / "gpt2")
    with pytest.raises(MatpressError, match="model_type 'gpt2'.*Llama family"):
        matpress.export(checkpoint, tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists()


def test_an_existing_output_is_kept_unless_forced(mixed, tmp_path):
    out = tmp_path / "taken.gguf"
    out.write_text("keep me")
    with pytest.raises(MatpressError, match="exists.*--force"):
        matpress.export(mixed["checkpoint"], out)
    assert out.read_text() == "keep me"
    matpress.export(mixed["checkpoint"], out, force=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_missing_gguf_package_says_what_to_install(mixed, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(MatpressError, match=r"needs the package gguf: pip install 'matpress\[gguf\]'"):
        matpress.export(mixed["checkpoint"], tmp_path / "x.gguf")


def test_cli_exports_and_refuses_with_exit_2(mixed, odd, tmp_path, capsys):
    assert main(["export", str(mixed["checkpoint"]), str(tmp_path / "cli.gguf"), "--to", "gguf"]) == 0
    assert "token_embd.weight" in capsys.readouterr().out
    assert main(["export", str(odd), str(tmp_path / "odd.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matpress export: error: layer model.layers.1.mlp.down_proj") and "Traceback" not in err
    assert not (tmp_path / "odd.gguf").exists()
