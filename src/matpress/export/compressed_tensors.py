"""A matpress checkpoint as a compressed-tensors directory (the ``pack-quantized`` format vLLM and
transformers load): ``config.json`` with a ``quantization_config``, ``model.safetensors`` and the tokenizer.

compressed-tensors stores an integer layer as signed codes ``c`` in ``[-2**(b-1), 2**(b-1))`` with a
scale per group (``strategy: group``) or per output channel (``channel``) and, when asymmetric, a signed
integer zero point ``zp``: ``w = (c - zp) * scale``. matpress's ``int`` format stores unsigned codes
``q = c + 2**(b-1)`` and ``w = (q - z) * s``, so a layer maps with ``c = q - 2**(b-1)`` and
``zp = z - 2**(b-1)``; that needs integer zero points in ``[0, 2**b)`` (RTN's and GPTQ's are; HQQ's
fractional ones are refused) and rows that are whole groups (compressed-tensors has no shorter last
group). The packing itself is the same: ``weight_packed`` is a little-endian stream of ``b``-bit
codes in int32 words, which are matpress's packed bytes (shifted by the same ``2**(b-1)``) read four
at a time; the zero points are packed the same way along the output dimension.

Scales are written in the model's dtype (``config.dtype``): compressed-tensors multiplies in the
scale's dtype, so an fp32 model decompresses to exactly matpress's decode and an fp16 / bf16 model
to that decode rounded to its dtype, as the model runs anyway. Layers of 4 or 8 bits are written
(the widths vLLM's kernels take); other widths, and other formats, are refused naming the layer and
its format. Compressed embeddings are written decoded (dense); layers left dense are listed in
``ignore``. The directory is written as one transaction (:mod:`matpress.atomic`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save_file

from matpress.atomic import staged_dir
from matpress.errors import MatpressError
from matpress.export.tensors import DECODED, EXACT, ExportedTensor, ExportReport, model_tensors
from matpress.formats import Format
from matpress.formats.dense import DenseFormat
from matpress.formats.integer import IntFormat
from matpress.formats.packing import pack_rows
from matpress.io import load, load_tokenizer, read_checkpoint
from matpress.nn.layers import CompressedLinear
from matpress.nn.layout import find_linear_layers

BITS = (4, 8)  # the widths written; vLLM's pack-quantized kernels take these
FORMAT = "pack-quantized"


def int32_words(packed: torch.Tensor, n_codes: int, bits: int) -> torch.Tensor:
    """Rows of matpress-packed codes (``pack_rows``) as compressed-tensors' int32 words:
    ``ceil(n_codes * bits / 32)`` words a row, the bit stream unchanged."""
    words = -(-n_codes * bits // 32)
    used = -(-n_codes * bits // 8)
    rows = packed[:, :used]
    rows = torch.nn.functional.pad(rows, (0, 4 * words - used))
    return rows.contiguous().view(torch.int32)


def weight_args(fmt: IntFormat) -> dict[str, Any]:
    """The ``weights`` arguments of a compressed-tensors scheme for ``fmt``."""
    per_channel = fmt.group == fmt.in_features and fmt.group_size in (None, -1)
    return {
        "num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False,
        "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else fmt.group,
    }


def check_layer(name: str, fmt: Format) -> IntFormat:
    """``fmt`` if compressed-tensors holds it exactly, else a MatpressError naming the layer."""
    what = f"layer {name}: {fmt.describe()}"
    if not isinstance(fmt, IntFormat):
        raise MatpressError(f"{what}: the {fmt.name} format has no compressed-tensors counterpart; compress it with the int format (4 or 8 bits)")
    if fmt.bits not in BITS:
        raise MatpressError(f"{what}: compressed-tensors layers are written with {' or '.join(map(str, BITS))} bits, the widths vLLM runs")
    if fmt.in_features % fmt.group:
        raise MatpressError(
            f"{what}: the rows ({fmt.in_features}) are not whole groups of {fmt.group}, and compressed-tensors has no "
            "shorter last group; choose a group size that divides the row length"
        )
    if not fmt.symmetric:
        zero = fmt.zeros.float()
        if not (torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() < 1 << fmt.bits):
            raise MatpressError(
                f"{what}: its zero points are not integers in [0, {1 << fmt.bits}) (HQQ's are fractional), which "
                "compressed-tensors' integer zero points cannot hold; compress it with RTN, GPTQ or AWQ"
            )
    return fmt


def layer_tensors(name: str, fmt: IntFormat, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one pack-quantized layer."""
    scale, zero = fmt.scale_zero()
    tensors = {
        f"{name}.weight_packed": int32_words(fmt.packed, fmt.in_features, fmt.bits),
        f"{name}.weight_scale": scale.to(scale_dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor(fmt.shape, dtype=torch.int64),
    }
    if not fmt.symmetric:  # the same unsigned codes, packed along the output dimension
        codes = zero.t().to(torch.int64)
        tensors[f"{name}.weight_zero_point"] = int32_words(pack_rows(codes, fmt.bits), fmt.out_features, fmt.bits).t().contiguous()
    return tensors


def config_groups(schemes: dict[str, list[str]]) -> dict[str, Any]:
    """One scheme per distinct set of weight arguments, targeting its layers by name."""
    return {
        f"group_{i}": {"targets": sorted(names), "weights": json.loads(args), "input_activations": None, "output_activations": None, "format": FORMAT}
        for i, (args, names) in enumerate(sorted(schemes.items()))
    }


def check_directory_output(out: Path, force: bool) -> None:
    if out.is_file() or out.is_symlink():
        raise MatpressError(f"{out} is a file or a link; pass a directory to write the compressed-tensors model to")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MatpressError(f"{out} is not empty; choose a new or empty directory, or pass --force (force=True) to replace it")


def export_compressed_tensors(
    checkpoint: Union[str, Path], out: Union[str, Path], force: bool = False, expect_digest: Optional[str] = None,
) -> ExportReport:
    """Write matpress ``checkpoint`` as a compressed-tensors directory ``out`` (see the module docstring)."""
    directory, out = Path(checkpoint), Path(os.path.abspath(out))
    check_directory_output(out, force)
    read_checkpoint(directory, expect_digest)
    model = load(directory)
    config = model.config
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, list[str]] = defaultdict(list)
    entries = []
    quantized = {name for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    for source, value in model_tensors(model):
        layer = source.removesuffix(".weight")
        if isinstance(value, torch.Tensor):
            tensors[source] = value.contiguous()
            entries.append(ExportedTensor(source, source, str(value.dtype).removeprefix("torch."), tuple(value.shape), EXACT))
        elif isinstance(value, DenseFormat):  # a layer kept dense: its weight as stored, listed in ``ignore``
            tensors[source] = value.weight.contiguous()
            entries.append(ExportedTensor(source, source, value.describe(), value.shape, EXACT))
        elif layer in quantized:
            fmt = check_layer(layer, value)
            tensors.update(layer_tensors(layer, fmt, scale_dtype))
            schemes[json.dumps(weight_args(fmt), sort_keys=True)].append(layer)
            entries.append(ExportedTensor(f"{layer}.weight_packed", source, f"{fmt.describe()} {FORMAT}", fmt.shape, EXACT))
        else:  # a compressed embedding: compressed-tensors quantizes linear layers; written decoded
            tensors[source] = value.decode(scale_dtype).contiguous()
            entries.append(ExportedTensor(source, source, str(scale_dtype).removeprefix("torch."), value.shape, DECODED))
    schemed = {name for names in schemes.values() for name in names}
    if not schemes:
        raise MatpressError(f"{directory} has no compressed linear layer that compressed-tensors could hold; there is nothing to export")
    ignore = sorted(
        name for name, m in model.named_modules()
        if name in find_linear_layers(model) or isinstance(m, CompressedLinear) and name not in schemed
    )
    quantization_config = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": config_groups(schemes), "ignore": ignore, "kv_cache_scheme": None,
    }
    saved = config.to_dict()
    saved["quantization_config"] = quantization_config
    with staged_dir(out) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(saved, indent=2, default=str))
        tokenizer = load_tokenizer(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return ExportReport(out, entries)

