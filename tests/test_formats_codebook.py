"""The codebook format (non-uniform levels times group scales) and its methods: RTN, GPTQ, k-means."""

import math

import pytest
import torch

from format_checks import check_format, run_method
from matpress.errors import FormatError, RecipeError
from matpress.formats import CodebookFormat, IntFormat, TransformedFormat
from matpress.formats.codebook import (
    LEVEL_MAX, SCALE_FACTORS, fixed_table, has_integer_levels, lloyd_max_levels, normal_quantile_levels,
)
from matpress.formats.integer import grouped
from matpress.methods.codebook import CodebookParams, learn_table, rounded_weight, weighted_error
from matpress.methods.obs import output_error
from matpress.recipe import Recipe

from test_gptq_awq_hqq import layer_problem


def test_normal_quantile_levels_split_the_normal_into_equal_mass_bins():
    for bits in (2, 3, 4):
        levels = normal_quantile_levels(bits)
        n = 1 << bits
        assert levels.shape == (n,) and float(levels.abs().max()) == 1.0
        # undo the normalisation: level k is the (k + 1/2)/n quantile of N(0, 1)
        unnormalised = levels * (math.sqrt(2) * torch.erfinv(torch.tensor(1 - 1 / n, dtype=torch.float64)))
        cdf = 0.5 * (1 + torch.erf(unnormalised / math.sqrt(2)))
        assert torch.allclose(cdf, (torch.arange(n, dtype=torch.float64) + 0.5) / n, atol=1e-12)


# The positive levels of the mean-square-optimal quantizer of N(0, 1) as tabulated by Max (1960,
# "Quantizing for minimum distortion"), four significant digits.
MAX_1960 = {
    2: (0.4528, 1.510),
    3: (0.2451, 0.7560, 1.344, 2.152),
    4: (0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733),
}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_levels_match_the_tabulated_optimum(bits):
    levels = lloyd_max_levels(bits)
    assert torch.allclose(levels, -levels.flip(0), atol=1e-12) and float(levels[-1]) == 1.0
    expected = torch.tensor(MAX_1960[bits], dtype=torch.float64)
    # normalised by the top level: each ratio off by at most the table's rounding (half a unit in the
    # fourth digit of both numbers)
    assert torch.allclose(levels[len(levels) // 2 :], expected / expected[-1], atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fixed_tables_are_ascending_integers_of_their_normalised_levels(bits):
    for kind, levels in (("nf", normal_quantile_levels(bits)), ("nl", lloyd_max_levels(bits))):
        t = fixed_table(kind, bits)
        assert bool((t[1:] > t[:-1]).all()) and has_integer_levels(t) and float(t.abs().max()) == LEVEL_MAX
        # each level the nearest integer to 127 times the normalised one: within half a unit
        assert float((t.double() - LEVEL_MAX * levels).abs().max()) <= 0.5
    with pytest.raises(FormatError, match="learned"):
        fixed_table("layer", bits)


def test_the_iq4nl_table_is_llama_cpps_and_four_bit_only():
    t = fixed_table("iq4nl", 4)
    assert t.tolist() == [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    with pytest.raises(FormatError, match="iq4nl table has 16 levels"):
        fixed_table("iq4nl", 3)
    with pytest.raises(ValueError, match="needs bits=4"):
        CodebookParams(bits=3, table="iq4nl")


SHAPES = [(4, 32, (16, 96)), (3, 24, (9, 70)), (2, None, (5, 33))]


@pytest.mark.parametrize(
    "table, bits, group_size, shape", [(t, *case) for t in ("nf", "nl") for case in SHAPES] + [("iq4nl", *SHAPES[0])]
)
def test_rtn_takes_the_nearest_level_and_the_best_searched_scale(table, bits, group_size, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * torch.rand(shape[0], 1)
    fmt = CodebookFormat.encode(w, bits=bits, group_size=group_size, table=table)
    levels = fixed_table(table, bits)
    group = fmt.group
    scales = fmt.scales.float()
    s = scales.repeat_interleave(group, dim=1)[:, : shape[1]]
    decoded = fmt.decode()
    assert torch.equal(decoded, levels[fmt.codes().long()] * s)
    # nearest level: no other level is closer to w / s (fp32 rounding of the product aside)
    best = (w.unsqueeze(-1) - levels * s.unsqueeze(-1)).abs().amin(dim=-1)
    assert bool(((w - decoded).abs() <= best + 4 * torch.finfo(torch.float32).eps * w.abs()).all())
    # the searched scale is no worse than any factor tried, in particular the min-max one (factor 1)
    g = grouped(w, group)[..., : min(group, shape[1])] if shape[1] % group == 0 else None
    if g is not None:
        err = ((grouped(w, group) - grouped(decoded, group)) ** 2).sum(-1)
        absmax = g.abs().amax(-1)
        for factor in (1.0, SCALE_FACTORS[0]):
            sc = (absmax * factor / float(levels.abs().max())).half().float().unsqueeze(-1)
            idx = (g.unsqueeze(-1) / sc.unsqueeze(-1) - levels).abs().argmin(-1)
            other = ((g - levels[idx] * sc) ** 2).sum(-1)
            assert bool((err <= other * (1 + 1e-5) + 1e-12).all())


def test_nbytes_are_codes_scales_and_table():
    fmt = CodebookFormat.encode(torch.randn(64, 640), bits=4, group_size=32)
    assert fmt.nbytes == 64 * 320 + 64 * 20 * 2 + 16 * 2
    assert fmt.bits_per_weight == pytest.approx(4 + 16 / 32 + 256 / (64 * 640))
    fmt3 = CodebookFormat.encode(torch.randn(8, 100), bits=3, group_size=None)
    assert fmt3.nbytes == 8 * (13 * 3) + 8 * 2 + 8 * 2


@pytest.mark.parametrize("table", ["nl", "row"])
@pytest.mark.parametrize("group_size", [None, 24])
def test_codebook_format_checks(table, group_size, tmp_path):
    torch.manual_seed(3)
    fmt = run_method("codebook", torch.randn(12, 50), None, bits=3, group_size=group_size, table=table, iterations=2)
    assert fmt.table.shape == ((12 if table == "row" else 1), 8)
    check_format(fmt, tmp_path)


def test_codebook_beats_uniform_on_gaussian_weights_at_the_same_bits():
    # 4-bit codes + an fp16 scale per 32 = int4 + an fp16 scale and zero per 64: 4.5 bits each
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    uniform = ((IntFormat.encode(w, bits=4, group_size=64).decode() - w) ** 2).mean()
    for table in ("nf", "nl"):
        fmt = CodebookFormat.encode(w, bits=4, group_size=32, table=table)
        assert fmt.nbytes <= IntFormat.encode(w, bits=4, group_size=64).nbytes + 32
        assert ((fmt.decode() - w) ** 2).mean() < uniform


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_objective_never_worse_than_its_start_and_better_on_heavy_tails(per_row, seed):
    gen = torch.Generator().manual_seed(seed)
    # Laplace-distributed weights (heavier tails than the normal the start table was made for)
    w = torch.distributions.Laplace(0.0, 1.0).sample((24, 128)) * (1 + torch.rand(24, 1, generator=gen))
    importance = torch.rand(128, generator=gen) + 0.1
    table, scales, history = learn_table(w, 3, 32, per_row, importance, iterations=8)
    assert min(history[1:]) <= history[0] and len(history) == 9
    assert weighted_error(w, rounded_weight(w, table, scales, 32), importance) == pytest.approx(min(history), rel=1e-6)
    assert min(history) < 0.97 * history[0]
    assert table.shape == ((24 if per_row else 1), 8) and bool((table[:, 1:] >= table[:, :-1]).all())
    assert has_integer_levels(table)


@pytest.mark.parametrize("table", ["nl", "layer"])
@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"act_order": True, "rotate": True}])
def test_gptq_codebook_beats_rtn_codebook_on_output_error(table, options):
    w, stats = layer_problem(0)
    rtn = run_method("codebook", w, None, bits=3, group_size=32, table=table)
    fmt = run_method("gptq_codebook", w, stats, bits=3, group_size=32, table=table, **options)
    inner = fmt.child if options.get("rotate") else fmt
    assert isinstance(fmt, TransformedFormat) == bool(options.get("rotate")) and isinstance(inner, CodebookFormat)
    assert output_error(w, fmt.decode(), stats.hessian) < 0.7 * output_error(w, rtn.decode(), stats.hessian)


def test_gptq_codebook_no_worse_than_uniform_gptq_at_the_same_bits():
    w, stats = layer_problem(1)
    uniform = run_method("gptq", w, stats, bits=3, group_size=64, act_order=True)
    fmt = run_method("gptq_codebook", w, stats, bits=3, group_size=32, table="layer", act_order=True)
    assert abs(fmt.nbytes - uniform.nbytes) <= 16
    assert output_error(w, fmt.decode(), stats.hessian) < output_error(w, uniform.decode(), stats.hessian)


def test_bad_codebook_input_fails_clearly():
    with pytest.raises(FormatError, match="bits must be 2, 3 or 4"):
        CodebookFormat.encode(torch.randn(4, 8), bits=5)
    with pytest.raises(FormatError, match="table must be one of"):
        CodebookFormat.encode(torch.randn(4, 8), table="uniform")
    fmt = CodebookFormat.encode(torch.randn(4, 10), bits=4)
    with pytest.raises(FormatError, match="packed"):
        CodebookFormat.from_tensors((4, 20), fmt.config(), fmt.to_tensors())
    tensors = dict(fmt.to_tensors(), table=torch.full((1, 16), float("nan"), dtype=torch.float16))
    with pytest.raises(FormatError, match="NaN"):
        CodebookFormat.from_tensors((4, 10), fmt.config(), tensors)
    with pytest.raises(RecipeError, match="table must be one of"):
        Recipe.from_dict({"default": {"method": "codebook", "table": "e8"}})
    with pytest.raises(RecipeError, match="percdamp"):
        Recipe.from_dict({"default": {"method": "gptq_codebook", "percdamp": 2}})


def test_small_weights_keep_their_precision_through_subnormal_scales():
    # groups whose largest weight is below 127 * 2**-14 need fp16 scales under the least normal fp16;
    # at 1e-3 the subnormal scales (~2e-5, steps of 2**-24) are 0.3 % coarse, so the error relative to
    # the weights' size stays that of unit weights within a few per cent (a clamp at 2**-14 would not)
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    unit = ((CodebookFormat.encode(w).decode() - w) ** 2).mean()
    small = ((CodebookFormat.encode(w * 1e-3).decode() - w * 1e-3) ** 2).mean() / 1e-6
    assert float(small) == pytest.approx(float(unit), rel=0.05)
