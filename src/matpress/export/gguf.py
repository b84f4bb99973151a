"""A matpress checkpoint of a Llama-family causal LM as one GGUF file (llama.cpp, ollama, transformers'
GGUF loader), written with the ``gguf`` package's writer.

What is written is what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for these
architectures: the tensors under GGUF's names (through the ``gguf`` package's name map), the rows of
the query and key projections permuted the way llama.cpp's Llama RoPE reads them (not for Qwen, whose
RoPE is llama.cpp's NeoX kind), the hyperparameters under ``<arch>.*``, and the tokenizer: vocabulary
with token types, merges, special token ids, whether BOS/EOS are added, and the chat template (the
``gguf`` package's ``SpecialVocab`` reads those from the checkpoint's tokenizer files).

Each compressed layer travels as the GGUF block type that holds its grid (:mod:`matpress.export.blocks`;
K-quants from the ``kquant`` format, IQ4_NL from a 4-bit codebook on the ``iq4nl`` table, and in a file with K-quants the report notes the matrices that hold
llama.cpp's legacy fallback because their rows are not a multiple of 256);
a layer whose format has none is refused, naming it and its format, or with ``allow_requantize``
decoded and re-quantized by the ``gguf`` package to the nearest legacy type (Q4_0 / Q5_0 / Q8_0 by its
bits per weight, F16 when rows are not a multiple of 32), its added error reported. Norms and other
1-D tensors are F32, as the converter writes them; other dense tensors keep their stored dtype.

The file is written beside ``out`` under a temporary name and renamed into place when complete, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch

from matpress.errors import MatpressError, quote
from matpress.export.blocks import BLOCK, Blocks, NoCounterpart, dense_blocks, format_blocks, q1_minimum_error
from matpress.formats import Format
from matpress.formats.integer import IntFormat
from matpress.formats.kquant import KQUANTS, SUPER
from matpress.export.tensors import EXACT, FP16_MINIMUM, REQUANTIZED, ExportedTensor, ExportReport, model_tensors
from matpress.io import load, load_tokenizer, read_checkpoint

GGUF_INSTALL = "pip install 'matpress[gguf]' (or `make smollm2`, which installs it too)"
# model_type of a transformers config -> the GGUF architecture llama.cpp runs it as
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK = {"llama"}  # architectures whose q/k rows llama.cpp's converter permutes for its RoPE
# nearest legacy type by bits per weight (block overhead included) for a re-quantized layer
REQUANTIZE_TYPES = ((4.5, "Q4_0"), (5.5, "Q5_0"), (math.inf, "Q8_0"))
# the file type recorded for a model whose weight matrices are mostly of one type
FILE_TYPES = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S",
    "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL",
}
K_TYPES = {spec.gguf_type for spec in KQUANTS.values()}
LEGACY_FALLBACKS = {spec.fallback_type for spec in KQUANTS.values()}


def import_gguf() -> Any:
    """The ``gguf`` package, or a MatpressError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise MatpressError(f"exporting to GGUF needs the package gguf: {GGUF_INSTALL}") from None
    return gguf


def qk_row_order(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives a query (``heads`` heads) or key (KV heads) projection:
    each head's two interleaved halves of rotary pairs become consecutive pairs."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def requantize(gguf: Any, fmt: Format) -> tuple[Blocks, float, float]:
    """``fmt`` decoded and re-quantized by the ``gguf`` package to the nearest legacy type, with the
    largest and the relative RMS change it adds."""
    weight = fmt.decode(torch.float32)
    if fmt.in_features % BLOCK:
        exported = dense_blocks(weight.to(torch.float16))
        back = exported.data.view(torch.float16).float()
    else:
        type_name = next(t for bits, t in REQUANTIZE_TYPES if fmt.bits_per_weight <= bits)
        qtype = gguf.GGMLQuantizationType[type_name]
        data = gguf.quants.quantize(weight.numpy(), qtype)
        exported = Blocks(type_name, torch.from_numpy(data))
        back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(weight.shape)
    change = back.double() - weight.double()
    rms = float(weight.double().pow(2).mean().sqrt())
    return exported, float(change.abs().max()), float(change.pow(2).mean().sqrt()) / rms if rms else 0.0


def fp16_minimum_change(fmt: Format, blocks: Blocks) -> tuple[float, float]:
    """The largest and the relative RMS change of storing an asymmetric int format's block minimum in fp16."""
    if not (isinstance(fmt, IntFormat) and blocks.type_name in ("Q4_1", "Q5_1")):
        return 0.0, 0.0
    shift = q1_minimum_error(fmt)
    rms = float(fmt.decode().double().pow(2).mean().sqrt())
    return float(shift.max()), float(shift.pow(2).mean().sqrt()) / rms if rms else 0.0


def export_tensor(gguf: Any, name: str, source: str, value: Union[Format, torch.Tensor], allow_requantize: bool) -> tuple[Blocks, ExportedTensor]:
    if isinstance(value, torch.Tensor):
        one_dimensional = value.dim() <= 1 or name.endswith("_norm.weight")  # llama.cpp reads these as F32
        blocks = dense_blocks(value.float() if one_dimensional else value)
        return blocks, ExportedTensor(name, source, blocks.type_name, tuple(value.shape), EXACT)
    try:
        blocks = format_blocks(value)
    except NoCounterpart as e:
        if not allow_requantize:
            raise MatpressError(
                f"layer {source.removesuffix('.weight')}: {e}; compress it with a format GGUF holds (int 4/5-bit symmetric or asymmetric, "
                "int 8-bit symmetric, groups of 32*k; a K-quant grid: rtn or gptq with kquant; IQ4_NL: a 4-bit codebook on the iq4nl table in groups "
                "of 32*k, codebook or gptq_codebook with table iq4nl), or pass --allow-requantize (allow_requantize=True) to "
                "decode and re-quantize it, with the added error reported"
            ) from None
        blocks, worst, relative = requantize(gguf, value)
        return blocks, ExportedTensor(name, source, blocks.type_name, value.shape, REQUANTIZED, worst, relative)
    worst, relative = fp16_minimum_change(value, blocks)
    return blocks, ExportedTensor(name, source, blocks.type_name, value.shape, FP16_MINIMUM if worst else EXACT, worst, relative)


def fallback_notes(report: ExportReport) -> list[str]:
    """In a file with K-quants, which matrices hold a legacy type because their rows are not a multiple
    of 256 long (llama.cpp's fallback, which the integer methods with ``kquant`` follow)."""
    if not any(t.type_name in K_TYPES for t in report.tensors):
        return []
    return [
        f"{t.name}: rows of {t.shape[1]} weights are not a multiple of {SUPER}, so no K-quant holds them; it is {t.type_name}, "
        "the legacy type llama.cpp falls back to"
        for t in report.tensors
        if len(t.shape) == 2 and t.shape[1] % SUPER and t.type_name in LEGACY_FALLBACKS
    ]


# -- hyperparameters and tokenizer ----------------------------------------------------------------


def rope_theta(config: Any, where: str) -> float:
    """RoPE's base frequency; RoPE scaling is refused (llama.cpp needs it written in its own terms)."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default"):
        raise MatpressError(f"{where}: RoPE scaling {quote(kind if kind != 'default' else scaling)} is not exported to GGUF yet; only plain RoPE is")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def add_hyperparameters(gguf: Any, writer: Any, config: Any, arch: str, name: str, where: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config, where))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)


def byte_level_bpe(tokenizer: Any) -> Optional[dict[str, Any]]:
    """The ``tokenizer.json`` of a byte-level BPE tokenizer (GGUF's ``gpt2`` model), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data = json.loads(backend.to_str())
    decoder = data.get("decoder") or {}
    if data.get("model", {}).get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        return None
    return data


def pre_tokenizer_name(data: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: ``gpt-2`` for plain byte-level splitting, else ``default``."""
    pre = data.get("pre_tokenizer") or {}
    plain = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    return "gpt-2" if plain else "default"


def add_tokenizer(gguf: Any, writer: Any, tokenizer: Any, directory: Path, vocab_size: int, notes: list[str]) -> None:
    if tokenizer is None:
        raise MatpressError(f"{directory} holds no tokenizer, which a GGUF file must carry; compress the model again with its tokenizer")
    data = byte_level_bpe(tokenizer)
    if data is None:
        raise MatpressError(
            f"{directory}: its tokenizer ({type(tokenizer).__name__}) is not a byte-level BPE tokenizer; only those "
            "(GGUF's 'gpt2' tokenizer model: SmolLM2, Llama 3, Qwen) are exported to GGUF yet"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise MatpressError(f"{directory}: the tokenizer has ids up to {max(vocab.values())}, beyond the model's {vocab_size} embeddings")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    pre = pre_tokenizer_name(data)
    if pre == "default":
        notes.append(f"the pre-tokenizer {quote(data.get('pre_tokenizer'), 120)} has no llama.cpp name matpress knows; written as 'default'")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


# -- the file -------------------------------------------------------------------------------------


def check_gguf_output(out: Path, force: bool) -> None:
    if out.is_dir():
        raise MatpressError(f"{out} is a directory; pass the path of the .gguf file to write")
    if out.exists() and not force:
        raise MatpressError(f"{out} exists; choose another path, or pass --force (force=True) to replace it")
    if not out.parent.is_dir():
        raise MatpressError(f"cannot write {out}: {out.parent} is not a directory")


def export_gguf(
    checkpoint: Union[str, Path], out: Union[str, Path], allow_requantize: bool = False, force: bool = False,
    expect_digest: Optional[str] = None,
) -> ExportReport:
    """Write the causal LM of matpress ``checkpoint`` to the GGUF file ``out`` (see the module docstring)."""
    gguf = import_gguf()
    directory, out = Path(checkpoint), Path(os.path.abspath(out))
    check_gguf_output(out, force)
    manifest = read_checkpoint(directory, expect_digest).manifest
    config_dict = manifest["base_model"].get("config") or {}
    model_type = config_dict.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MatpressError(
            f"{directory} holds a {manifest['base_model'].get('class')} (model_type {quote(model_type)}); GGUF export "
            f"covers the Llama family ({', '.join(sorted(ARCHITECTURES))}) so far"
        )
    arch = ARCHITECTURES[model_type]
    model = load(directory)
    config = model.config
    rope_theta(config, str(directory))  # refuse RoPE scaling before any work
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}

    exported: list[tuple[Blocks, ExportedTensor]] = []
    for source, value in model_tensors(model):
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise MatpressError(f"{directory}: tensor {source} has no GGUF name for the {arch} architecture; it cannot be exported")
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        order = qk_row_order(value.shape[0], heads[kind]) if arch in PERMUTED_QK and kind in heads else None
        if order is not None and isinstance(value, torch.Tensor):
            value = value[order]
        blocks, entry = export_tensor(gguf, name, source, value, allow_requantize)
        if order is not None and not isinstance(value, torch.Tensor):
            blocks = blocks.rows(order)  # every row is its own blocks: the same permutation, exactly
        exported.append((blocks, entry))

    report = ExportReport(Path(out), [entry for _, entry in exported])
    report.notes.extend(fallback_notes(report))
    matrices = Counter(e.type_name for b, e in exported if len(e.shape) == 2)
    file_type = gguf.LlamaFileType[FILE_TYPES.get(matrices.most_common(1)[0][0], "GUESSED")]
    temporary = out.with_name(f".{out.name}.matpress-{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(temporary, arch)
        add_hyperparameters(gguf, writer, config, arch, str(config_dict.get("_name_or_path") or model_type), str(directory))
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(gguf, writer, load_tokenizer(directory), directory, config.vocab_size, report.notes)
        for blocks, entry in exported:
            writer.add_tensor(entry.name, blocks.data.numpy(), raw_dtype=gguf.GGMLQuantizationType[blocks.type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return report
