"""Methods producing the low-rank, sparse, structured and ternary formats, on random layers with
random correlated inputs (uneven feature scales, as in real activations)."""

import pytest
import torch

from matpress.errors import FormatError, RecipeError
from matpress.formats import IntFormat, LowRankFormat, MonarchFormat, NMSparseFormat, SparseFormat, SumFormat, TernaryFormat
from matpress.methods import LayerStats, get_method
from matpress.methods.lowrank import factor_nbytes, factor_spec
from matpress.methods.obs import output_error

from format_checks import run_method


def layer(seed: int, out_f: int = 48, in_f: int = 128, n: int = 1024) -> tuple[torch.Tensor, LayerStats]:
    torch.manual_seed(seed)
    x = torch.randn(n, in_f) @ (torch.eye(in_f) + torch.randn(in_f, in_f) / in_f**0.5)
    x = x * torch.randn(in_f).exp()  # feature scales spread over about an order of magnitude
    return torch.randn(out_f, in_f) / in_f**0.5, LayerStats(x.T @ x, n)


def out_err(weight: torch.Tensor, fmt, stats: LayerStats) -> float:
    return output_error(weight, fmt.decode(), stats.hessian)


@pytest.mark.parametrize("rank", [4, 16])
def test_svd_llm_is_optimal_for_the_output_error(rank):
    w, stats = layer(rank)
    plain = run_method("svd", w, stats, rank=rank, factor_bits=16)
    aware = run_method("svd_llm", w, stats, rank=rank, damping=0.0)
    assert isinstance(aware, LowRankFormat) and aware.rank == rank
    # the whitened truncation's output error is the dropped whitened singular energy
    root = torch.linalg.cholesky(stats.hessian)
    dropped = float(torch.linalg.svdvals(w @ root)[rank:].square().sum())
    assert out_err(w, aware, stats) == pytest.approx(dropped, rel=1e-2)  # fp16 factors
    assert out_err(w, aware, stats) < 0.9 * out_err(w, plain, stats)


def test_rank_by_energy_and_by_bits_budget():
    w, stats = layer(1)
    s = torch.linalg.svdvals(w)
    energy = s.square().cumsum(0) / s.square().sum()
    fmt = run_method("svd", w, stats, energy=0.8)
    assert energy[fmt.rank - 2] < 0.8 <= energy[fmt.rank - 1]
    for bits, factor_bits in [(2.0, 16), (3.0, 8)]:
        fmt = run_method("svd", w, stats, rank_bits=bits, factor_bits=factor_bits)
        budget = bits * w.numel() / 8
        assert fmt.nbytes <= budget < factor_nbytes(w.shape, fmt.rank + 1, factor_spec(factor_bits))


def test_eora_compensates_the_int_residual_in_the_activation_eigenspace():
    w, stats = layer(2)
    rtn = run_method("rtn", w, stats, bits=3, group_size=32)
    fmt = run_method("eora", w, stats, bits=3, group_size=32, rank=8, damping=0.0)
    assert isinstance(fmt, SumFormat) and isinstance(fmt.a, IntFormat) and isinstance(fmt.b, LowRankFormat)
    assert torch.equal(fmt.a.decode(), rtn.decode())
    assert fmt.describe() == "sum(int3 g32 asym + lowrank r8 fp16)"
    # optimal rank-8 correction of the residual for the output error: the dropped eigen-whitened energy
    eigvals, eigvecs = torch.linalg.eigh(stats.hessian)
    residual = (w - rtn.decode()) @ (eigvecs * eigvals.sqrt())
    dropped = float(torch.linalg.svdvals(residual)[8:].square().sum())
    assert out_err(w, fmt, stats) == pytest.approx(dropped, rel=1e-2)
    assert out_err(w, fmt, stats) < 0.8 * out_err(w, rtn, stats)


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_wanda_and_sparsegpt_beat_magnitude_on_the_output_error(nm):
    totals = dict.fromkeys(("magnitude", "wanda", "sparsegpt"), 0.0)
    for seed in range(3):
        w, stats = layer(10 + seed)
        errors = {name: out_err(w, run_method(name, w, stats, sparsity=0.5, nm=nm), stats) for name in totals}
        assert errors["wanda"] < 0.5 * errors["magnitude"], errors
        assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors
        totals = {name: totals[name] + errors[name] for name in totals}
    # the OBS updates of SparseGPT help beyond Wanda's diagonal view when inputs are correlated
    assert totals["sparsegpt"] < totals["wanda"], totals


@pytest.mark.parametrize("nm,value_bits", [(None, 16), (None, 4), ("2:4", 16), ("4:8", 3)])
def test_sparsegpt_masks_and_quantized_values(nm, value_bits):
    w, stats = layer(5)
    fmt = run_method("sparsegpt", w, stats, sparsity=0.5, nm=nm, value_bits=value_bits, group_size=64)
    decoded = fmt.decode()
    if nm is None:
        assert isinstance(fmt, SparseFormat)
        # each lazy block keeps half of every row's weights
        assert bool((fmt.mask().view(48, 2, 64).sum(-1) == 32).all())
    else:
        n, m = (int(v) for v in nm.split(":"))
        assert isinstance(fmt, NMSparseFormat)
        assert bool((fmt.mask().view(48, -1, m).sum(-1) == n).all())
    assert bool((decoded[~fmt.mask()] == 0).all())
    if value_bits != 16:
        values = fmt.values
        assert isinstance(values, IntFormat) and values.bits == value_bits and values.group_size == 32
        rtn = run_method("magnitude", w, stats, sparsity=0.5, nm=nm, value_bits=value_bits, group_size=64)
        assert out_err(w, fmt, stats) < 0.9 * out_err(w, rtn, stats)


def test_sparsegpt_joint_quantization_needs_whole_groups():
    w, stats = layer(6, in_f=96)
    with pytest.raises(FormatError, match="multiple of group_size=64"):
        run_method("sparsegpt", w, stats, value_bits=4, group_size=64)


def test_monarch_aw_is_optimal_under_a_block_diagonal_hessian():
    torch.manual_seed(3)
    b, p = 4, 8
    roots = torch.randn(b, p, p) * torch.linspace(0.1, 3, p)
    h = torch.block_diag(*(r @ r.T for r in roots))
    stats = LayerStats(h * 10, 10)
    w = torch.randn(24, b * p)
    plain = run_method("monarch", w, stats, nblocks=b, out_blocks=3)
    aware = run_method("monarch_aw", w, stats, nblocks=b, out_blocks=3, damping=0.0)
    assert isinstance(aware, MonarchFormat)
    # separable objective: per sub-block the best rank-1 fit of W_aj C_j
    chol = torch.linalg.cholesky(h.reshape(b, p, b, p)[torch.arange(b), :, torch.arange(b)])
    sub = w.reshape(3, 8, b, p).permute(0, 2, 1, 3) @ chol
    dropped = float(torch.linalg.svdvals(sub)[..., 1:].square().sum())
    assert out_err(w, aware, stats) == pytest.approx(dropped, rel=1e-2)
    assert out_err(w, aware, stats) < out_err(w, plain, stats)


@pytest.mark.parametrize("group_size", [None, 32])
def test_calibrated_ternary_beats_absmean(group_size):
    w, stats = layer(7)
    absmean = run_method("ternary", w, stats, group_size=group_size)
    calibrated = run_method("ternary_calibrated", w, stats, group_size=group_size)
    assert isinstance(calibrated, TernaryFormat) and calibrated.group_size == (group_size or 128)
    assert set(calibrated.trits().unique().tolist()) <= {-1, 0, 1}
    assert bool((calibrated.group_scales() > 0).all())
    assert out_err(w, calibrated, stats) < 0.7 * out_err(w, absmean, stats)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("svd", {}, "exactly one of rank, energy or rank_bits"),
        ("svd", {"rank": 4, "energy": 0.9}, "exactly one"),
        ("svd", {"rank": 0}, "rank must be a positive integer"),
        ("svd_llm", {"energy": 1.5}, "energy must be a fraction"),
        ("eora", {"rank": 4, "bits": 1}, "bits must be an integer from 2 to 8"),
        ("magnitude", {"nm": "5:4"}, "need 1 <= n <= m"),
        ("wanda", {"nm": "two:four"}, "nm must be null"),
        ("sparsegpt", {"nm": "2:4", "group_size": 30}, "multiple of m=4"),
        ("magnitude", {"value_bits": 12}, "value_bits must be 16"),
        ("monarch", {"nblocks": 0}, "nblocks must be a positive integer"),
        ("ternary", {"group_size": -2}, "group_size must be a positive integer"),
    ],
)
def test_bad_parameters_fail_when_the_recipe_is_read(name, params, match):
    with pytest.raises(RecipeError, match=match):
        get_method(name).make_params(params, "recipe")


def test_bad_shapes_fail_at_the_layer():
    w, stats = layer(8, out_f=20, in_f=30)
    with pytest.raises(FormatError, match="rank must be an integer from 1 to min"):
        run_method("svd", w, stats, rank=21)
    with pytest.raises(FormatError, match="nblocks=4 must be a positive integer dividing 30"):
        run_method("monarch", w, stats, nblocks=4)
    with pytest.raises(FormatError, match="not a multiple of m=4"):
        run_method("wanda", w, stats, nm="2:4")
