"""K-quant targets (the ``kquant`` format, rtn and gptq with ``kquant``): every GGUF K-quant exported and
dequantized by the gguf package equals matpress's decode bit for bit, on odd row counts and widths of 256
and 512; a width no K-quant holds falls back to llama.cpp's legacy type; GPTQ on a K grid beats RTN on
it; bad input is refused clearly."""

from __future__ import annotations

import pytest
import torch

from matpress.errors import FormatError
from matpress.export.blocks import format_blocks
from matpress.formats import IntFormat, KQuantFormat
from matpress.formats.kquant import KQUANTS, SUPER
from matpress.methods.obs import output_error
from matpress.recipe import Recipe

from format_checks import check_format, run_method
from test_gptq_awq_hqq import layer_problem

gguf = pytest.importorskip("gguf")

# GGUF's bytes per super-block of 256 weights (ggml's block_q*_K)
BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def hard_weight(seed: int, rows: int, cols: int) -> torch.Tensor:
    """Rows of very different scales, an offset (so the minimums matter), a few outliers, and an all-zero
    sub-block (a zero step) in row 0."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * torch.logspace(-3, 1, rows).unsqueeze(1) + 0.05
    w[1, 7] = 40.0
    w[0, :32] = 0.0
    return w


def gguf_dequantized(fmt: KQuantFormat) -> torch.Tensor:
    blocks = format_blocks(fmt)
    qtype = gguf.GGMLQuantizationType[blocks.type_name]
    return torch.from_numpy(gguf.quants.dequantize(blocks.data.numpy(), qtype).copy())


@pytest.mark.parametrize("kquant", sorted(KQUANTS))
@pytest.mark.parametrize("rows,cols", [(37, 256), (5, 512)])
def test_kquant_blocks_dequantize_to_matpress_decode(kquant, rows, cols):
    fmt = run_method("rtn", hard_weight(rows, rows, cols), None, kquant=kquant)
    assert isinstance(fmt, KQuantFormat) and format_blocks(fmt).type_name == kquant.upper()
    assert format_blocks(fmt).data.shape == (rows, cols // SUPER * BLOCK_BYTES[kquant])
    assert fmt.nbytes == rows * cols // SUPER * BLOCK_BYTES[kquant]  # exactly GGUF's size
    assert torch.equal(gguf_dequantized(fmt), fmt.decode())


@pytest.mark.parametrize("kquant", sorted(KQUANTS))
def test_kquant_rounds_to_nearest_on_its_grid(kquant):
    # inside its sub-block's grid a weight is within half a step of its value; the grid ends miss the
    # sub-block's range only by the rounding of its integer scale (half a code, one and a half where a
    # signed scale is clamped, each moving the far end by the code range times |d|), of its integer minimum
    # (half a code of dmin), and for the symmetric types by the one level fewer on the positive side
    spec = KQUANTS[kquant]
    w = hard_weight(0, 9, 512)
    fmt = KQuantFormat.encode(w, kquant)
    scale, _ = fmt.sub_scales()
    d = fmt.d.float().repeat_interleave(spec.per_super, dim=1)
    step = (d * scale).abs()
    bound = step / 2 + d.abs() * 1.5 * (1 << spec.bits)
    if spec.minimum:
        bound += fmt.dmin.float().repeat_interleave(spec.per_super, dim=1) / 2
    else:
        bound += step
    err = (fmt.decode() - w).abs()
    assert bool((err <= bound.repeat_interleave(spec.sub, dim=1) * (1 + 1e-6)).all())


@pytest.mark.parametrize("kquant", ["q4_k", "q6_k"])
def test_kquant_format_contract(kquant, tmp_path):
    check_format(KQuantFormat.encode(hard_weight(1, 7, 512), kquant), tmp_path)


def test_kquant_decode_rows_equal_decode():
    fmt = KQuantFormat.encode(hard_weight(2, 11, 256), "q5_k")
    index = torch.tensor([3, 0, 10, 3])
    assert torch.equal(fmt.decode_rows(index), fmt.decode()[index])


@pytest.mark.parametrize("kquant,legacy", [("q2_k", "Q4_0"), ("q3_k", "Q4_0"), ("q4_k", "Q5_0"), ("q5_k", "Q5_1"), ("q6_k", "Q8_0")])
def test_width_not_a_multiple_of_256_falls_back_as_llama_cpp(kquant, legacy):
    # SmolLM2's hidden size: 576 = 2.25 super-blocks; llama.cpp's tensor_type_fallback picks the legacy type
    w = hard_weight(3, 13, 576)
    fmt = run_method("rtn", w, None, kquant=kquant)
    assert isinstance(fmt, IntFormat) and fmt.group == 32
    blocks = format_blocks(fmt)
    assert blocks.type_name == legacy
    if fmt.symmetric:
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(blocks.data.numpy(), gguf.GGMLQuantizationType[legacy]).copy()), fmt.decode())


@pytest.mark.parametrize("kquant", sorted(KQUANTS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_a_kquant_grid_beats_rtn_on_it(kquant, act_order):
    w, stats = layer_problem(0, out=48, n=512)
    rtn = run_method("rtn", w, None, kquant=kquant)
    fmt = run_method("gptq", w, stats, kquant=kquant, act_order=act_order)
    assert isinstance(fmt, KQuantFormat) and fmt.spec.name == kquant
    assert torch.equal(gguf_dequantized(fmt), fmt.decode())
    # error feedback through H^-1 on correlated inputs: well below rounding each weight on the same kind of grid
    assert output_error(w, fmt.decode(), stats.hessian) < 0.8 * output_error(w, rtn.decode(), stats.hessian)


def test_gptq_kquant_falls_back_on_576_wide_layers():
    w, stats = layer_problem(1, out=16, n=576)
    fmt = run_method("gptq", w, stats, kquant="q4_k")
    assert isinstance(fmt, IntFormat) and (fmt.bits, fmt.group, fmt.symmetric) == (5, 32, True)


def test_kquant_refuses_bad_input():
    with pytest.raises(FormatError, match="multiple of 32"):  # neither a K-quant nor its fallback holds 200 columns
        run_method("rtn", torch.randn(4, 200), None, kquant="q4_k")
    with pytest.raises(FormatError, match="Q5_0"):  # the format itself names the fallback
        KQuantFormat.encode(torch.randn(4, 576), "q4_k")
    fmt = KQuantFormat.encode(torch.randn(4, 256), "q4_k")
    tensors = fmt.to_tensors()
    tensors["d"] = tensors["d"].clone()
    tensors["d"][2, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN/Inf"):
        KQuantFormat.from_tensors(fmt.shape, fmt.config(), tensors)
    with pytest.raises(FormatError, match="overflows fp16"):
        KQuantFormat.encode(torch.full((2, 256), 1e9), "q6_k")
    with pytest.raises(FormatError, match="unknown K-quant"):
        KQuantFormat.encode(torch.randn(4, 256), "q7_k")
    for method, extra in (("rtn", {"kquant": "q4_0"}), ("hqq", {"kquant": "q4_k"}), ("awq", {"kquant": "q4_k"}),
                          ("gptq", {"kquant": "q4_k", "clip": True})):
        with pytest.raises(Exception, match="kquant"):
            Recipe.from_dict({"default": {"method": method, **extra}})


def test_budget_candidates_on_kquant_grids_are_labelled_by_their_grid():
    from matpress.recipe.budget import candidate_rules

    labels = list(candidate_rules([{"method": "rtn", "kquant": "q4_k"}, {"method": "gptq", "kquant": "q6_k"}, {"method": "rtn", "bits": 4}]))
    assert labels == ["rtn-q4_k", "gptq-q6_k", "rtn-4b-g128"]
