"""GPTQ, AWQ, HQQ and the Hadamard-rotated format, each against round-to-nearest on its own objective."""

import pytest
import torch
from conftest import NewTensorBytes

import matpress
from matpress.errors import RecipeError
from matpress.formats import IntFormat, TransformedFormat
from matpress.formats.integer import fake_quantize, grouped, rtn_parameters
from matpress.formats.transformed import fwht, hadamard_block, make_transform
from matpress.methods import LayerStats
from matpress.methods.awq import CLIP_RATIOS, clipped_parameters, clipped_quantize
from matpress.methods.gptq import inverse_hessian_factor
from matpress.methods.obs import output_error
from matpress.methods.hqq import lp_error
from matpress.recipe import Recipe

from conftest import random_data, tiny_llama
from format_checks import exact_matmul, run_method


def layer_problem(seed: int, out: int = 96, n: int = 256, tokens: int = 1024) -> tuple[torch.Tensor, LayerStats]:
    """A weight and the statistics of correlated inputs with a few outlier channels, as in LLMs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen) @ (torch.randn(n, n, generator=gen) / n**0.5)
    x[:, :4] *= 10
    w = torch.randn(out, n, generator=gen) * 0.02
    return w, LayerStats(x.T @ x, tokens, x.abs().sum(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits, group", [(4, 64), (3, None), (2, 64)])
@pytest.mark.parametrize("options", [
    {}, {"act_order": True}, {"act_order": True, "rotate": True}, {"act_order": True, "rotate": True, "clip": True},
    {"scale_inputs": True},
])
def test_gptq_beats_rtn_on_output_error(seed, bits, group, options):
    w, stats = layer_problem(seed)
    rtn = IntFormat.encode(w, bits=bits, group_size=group).decode()
    fmt = run_method("gptq", w, stats, bits=bits, group_size=group, **options)
    err = output_error(w, fmt.decode(), stats.hessian)
    # error compensation through H^-1: far below RTN on correlated inputs, not just below
    assert err < 0.7 * output_error(w, rtn, stats.hessian)


def test_gptq_act_order_keeps_the_plain_int_format():
    w, stats = layer_problem(0)
    fmt = run_method("gptq", w, stats, bits=4, group_size=64, act_order=True)
    assert isinstance(fmt, IntFormat) and fmt.group_size == 64
    # static groups: each group's scale was set before the pass, from its original columns' range
    rtn = IntFormat.encode(w, bits=4, group_size=64)
    assert torch.equal(fmt.scales, rtn.scales) and torch.equal(fmt.zeros, rtn.zeros)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_clip_takes_the_clipped_grids(act_order):
    # with H = I the sweep spreads no error (H^-1 is diagonal), so GPTQ is round-to-nearest on its grids:
    # with clip those are exactly the grids the clipping search picks on the same Hessian
    w, _ = layer_problem(0)
    stats = LayerStats(torch.eye(w.shape[1]), 1, torch.ones(w.shape[1]))
    fmt = run_method("gptq", w, stats, bits=3, group_size=64, act_order=act_order, clip=True)
    clipped = clipped_quantize(w, stats.hessian, 3, 64, False, CLIP_RATIOS)
    assert torch.equal(fmt.scales, clipped.scales) and torch.equal(fmt.zeros, clipped.zeros)
    assert torch.equal(fmt.decode(), clipped.decode())
    assert not torch.equal(fmt.scales, IntFormat.encode(w, bits=3, group_size=64).scales)  # some range was shrunk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipping_never_raises_a_groups_output_error(seed):
    w, stats = layer_problem(seed)
    g = grouped(w, 64)
    blocks = torch.stack([stats.hessian[k : k + 64, k : k + 64] for k in range(0, w.shape[1], 64)])

    def group_errors(scale, zero):
        e = g - fake_quantize(g, scale, zero, 3)
        return torch.einsum("okg,kgh,okh->ok", e, blocks, e)

    minmax = group_errors(*rtn_parameters(g, 3, False))
    clipped = group_errors(*clipped_parameters(g, stats.hessian, 3, False, CLIP_RATIOS))
    # ratio 1 (the min-max grid) is among those tried, so no group does worse (up to fp32 sums)
    assert bool((clipped <= minmax * (1 + 1e-5)).all()) and float(clipped.sum()) < float(minmax.sum())
    same = clipped_parameters(g, stats.hessian, 3, False, torch.ones(1))
    assert all(torch.equal(a, b) for a, b in zip(same, rtn_parameters(g, 3, False)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [4, 3])
def test_awq_beats_rtn_on_output_error(seed, bits):
    w, stats = layer_problem(seed)
    rtn = IntFormat.encode(w, bits=bits, group_size=64).decode()
    fmt = run_method("awq", w, stats, bits=bits, group_size=64)
    assert isinstance(fmt, TransformedFormat) and fmt.transform.scale is not None  # outliers: scaling pays
    assert output_error(w, fmt.decode(), stats.hessian) < output_error(w, rtn, stats.hessian)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("options", [{}, {"optimize_scale": True}, {"optimize_scale": True, "symmetric": True}])
def test_hqq_beats_rtn_on_lp_error(seed, options):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[torch.randint(0, 64, (20,), generator=gen), torch.randint(0, 256, (20,), generator=gen)] *= 8  # outliers
    symmetric = options.get("symmetric", False)
    rtn = IntFormat.encode(w, bits=3, group_size=64, symmetric=symmetric).decode()
    fmt = run_method("hqq", w, None, bits=3, group_size=64, **options)
    assert isinstance(fmt, IntFormat)
    assert lp_error(w, fmt.decode(), 0.7) < lp_error(w, rtn, 0.7)


@pytest.mark.parametrize("method, params", [
    ("gptq", {"percdamp": 0}), ("gptq", {"act_order": "yes"}), ("gptq", {"block_size": 0}),
    ("awq", {"grid": -1}), ("hqq", {"lp_norm": 1.5}), ("hqq", {"symmetric": True}),
])
def test_bad_parameters_are_recipe_errors(method, params):
    with pytest.raises(RecipeError, match=next(iter(params))):
        Recipe.simple(method, **params)


@pytest.mark.parametrize("n", [64, 96, 384, 1536])
def test_hadamard_is_orthonormal(n):
    block = hadamard_block(n)
    assert n % block == 0 and block & (block - 1) == 0
    h = fwht(torch.eye(n), block)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)  # entries are +-1/sqrt(block): exact in fp32 up to rounding
    assert torch.equal(h, h.T)


def test_transform_preserves_products_and_hessian():
    n = 384
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(n, generator=gen) + 0.5
    t = make_transform(n, rotate=True, seed=3, scale=scale)
    x, w = torch.randn(10, n, generator=gen), torch.randn(20, n, generator=gen)
    assert torch.allclose(t.apply(x) @ t.weight(w).T, x @ w.T, atol=1e-4)
    assert torch.allclose(t.unweight(t.weight(w)), w, atol=1e-5)
    h = x.T @ x
    assert torch.allclose(t.hessian(h), t.apply(x).T @ t.apply(x), atol=1e-3)


def test_rotation_spreads_outlier_columns():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:, 7] *= 50  # one outlier column stretches the grid of every group holding it
    rotated = TransformedFormat.encode(w, rotate=True, seed=0, bits=4, group_size=64)
    plain = IntFormat.encode(w, bits=4, group_size=64)
    with exact_matmul():  # the format's own product (the kernel's int8 activations are tested apart)
        assert torch.allclose(rotated.matmul(torch.eye(256)), rotated.decode().T, atol=1e-5)
    assert (rotated.decode() - w).norm() < (plain.decode() - w).norm()


def test_rotated_gptq_model_survives_save_load(tmp_path):
    model = tiny_llama()
    data = random_data(128)
    recipe = {"default": {"method": "gptq", "bits": 3, "group_size": 32, "act_order": True, "rotate": True}}
    report = matpress.compress(model, recipe, calibration=data, progress=False)
    assert all(r.format.startswith("rotated int3 g32") for r in report.layers)
    ids = {"input_ids": torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))}
    with torch.inference_mode():
        before = model(**ids).logits
    matpress.save(model, tmp_path / "ckpt")
    loaded = matpress.load(tmp_path / "ckpt")
    with torch.inference_mode():
        assert torch.equal(loaded(**ids).logits, before)


def test_cli_gptq_with_calibration(tiny_causal_dir, tmp_path, capsys):
    from matpress.cli import main

    out = tmp_path / "gptq"
    argv = ["compress", str(tiny_causal_dir), "--method", "gptq", "--bits", "4", "--group", "32", "--act-order",
            "--rotate", "--calib", "builtin", "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "rotated int4 g32 asym" in capsys.readouterr().out
    assert main(argv[:-3] + ["--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "not an existing file" in capsys.readouterr().err
    assert main(["compress", str(tiny_causal_dir), "--method", "rtn", "--rotate", "--out", str(tmp_path / "y")]) == 2
    assert "unknown parameter(s) ['rotate']" in capsys.readouterr().err


def torch_inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The factor as matpress computed it through torch before LAPACK in place (a second fp64 matrix
    for the Cholesky factor, then for the inverse): the reference the in-place one must agree with."""
    h = hessian.flip(0, 1).double()
    damp = percdamp * float(h.diagonal().mean().clamp(min=1e-12))
    h.diagonal().add_(damp)
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(factor, torch.eye(factor.shape[0], dtype=torch.float64), upper=False)
            return inverse.float().flip(0, 1)
        h.diagonal().add_(damp * 10**attempt)
    raise AssertionError("the reference needs a Hessian that damping makes positive definite")


@pytest.mark.parametrize("n, tokens, percdamp", [(300, 1200, 0.01), (64, 10, 1e-7)])  # the second needs two retries
def test_the_inverse_hessian_factor_matches_torchs_and_inverts_the_damped_hessian(n, tokens, percdamp):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    h = (x.T @ x / tokens).float()
    u, reference = inverse_hessian_factor(h, percdamp), torch_inverse_hessian_factor(h, percdamp)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    # the damping the reference ended with (the same retries): the smallest whose Cholesky succeeds
    damp = percdamp * float(h.diagonal().double().mean())
    for extra in [0.0] + [damp * 10**i for i in range(3)]:
        damp += extra
        damped = h.double() + damp * torch.eye(n, dtype=torch.float64)
        if int(torch.linalg.cholesky_ex(damped).info) == 0:
            break
    condition = float(torch.linalg.cond(damped))
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    # both are fp64 results rounded to fp32: they differ by that rounding (an ulp, <= eps32 |u|) plus
    # the two LAPACKs' fp64 errors, O(n cond eps64) relative to the factor's largest entry
    scale = float(reference.abs().max())
    assert ((u - reference).abs() <= eps32 * reference.abs() + n * condition * eps64 * scale).all()
    # U^T U (H + damp I) = I but for U's fp32 rounding E (|E| <= eps32/2 |U| elementwise, so
    # ||E|| <= eps32/2 sqrt(n) ||U||): ||U^T U H - I|| <= 2 ||E|| ||U|| ||H|| <= eps32 sqrt(n) cond
    residual = u.double().T @ u.double() @ damped - torch.eye(n, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(residual, ord=2)) <= eps32 * n**0.5 * condition * 1.01


def test_the_inverse_hessian_factor_holds_one_fp64_matrix_at_most():
    """A down projection's 8192x8192 Hessian is 0.5 GB in fp64: the factor of its inverse held two such
    matrices at once (1.04 GB above the Hessian on an 8192 one), now one and its fp32 result (0.79 GB)."""
    n = 1024
    x = torch.randn(4 * n, n, dtype=torch.float64)
    h = (x.T @ x / (4 * n)).float()
    with NewTensorBytes() as new:
        u = inverse_hessian_factor(h, 0.01)
    # the fp64 matrix, the fp32 factor, and the reversed band of rows being copied (256 rows, in fp32 or fp64)
    assert new.peak <= 8 * n * n + 4 * n * n + 8 * 256 * n
    damped = h.double() + 0.01 * float(h.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double(), torch.linalg.inv(damped), rtol=0, atol=1e-4 * float(torch.linalg.inv(damped).abs().max()))
