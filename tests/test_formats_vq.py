"""The vq format (codes indexing a codebook of vectors, fp16 scales) and its methods: vq (k-means, RTN)
and gptq_vq (GPTQ error feedback over blocks of dim columns)."""

import itertools

import pytest
import torch

from format_checks import check_format, run_method
from matpress.errors import FormatError, RecipeError
from matpress.formats import TransformedFormat, VQFormat, format_class
from matpress.formats.vq import learn_codebook, nearest_vectors, scaled_vectors
from matpress.methods import LayerStats
from matpress.methods.gptq import inverse_hessian_factor
from matpress.methods.obs import output_error
from matpress.methods.vq import GPTQVQParams, gptq_vq_quantize

from test_gptq_awq_hqq import layer_problem


@pytest.mark.parametrize("bits, dim, group_size, shape", [(8, 4, None, (12, 64)), (5, 2, 8, (9, 40)), (3, 8, 16, (7, 48))])
def test_decode_is_the_codeword_times_its_scale_and_nbytes_what_is_stored(bits, dim, group_size, shape, tmp_path):
    torch.manual_seed(bits)
    w = torch.randn(shape) * torch.rand(shape[0], 1)
    fmt = VQFormat.encode(w, bits=bits, dim=dim, group_size=group_size, iterations=3)
    group = group_size or shape[1]
    codes = fmt.codes().long()
    assert codes.shape == (shape[0], shape[1] // dim) and int(codes.max()) < 1 << bits
    expected = fmt.codebook.float()[codes].reshape(shape) * fmt.scales.float().repeat_interleave(group, dim=1)
    assert torch.equal(fmt.decode(), expected)
    n_groups = -(-shape[1] // group)
    code_bytes = shape[0] * (shape[1] // dim if bits == 8 else -(-(shape[1] // dim) // 8) * bits)
    assert fmt.nbytes == code_bytes + (1 << bits) * dim * 2 + shape[0] * n_groups * 2
    check_format(fmt, tmp_path)  # nbytes == the checkpoint's bytes, decode_rows, exact save/load
    rebuilt = format_class("vq").from_tensors(fmt.shape, fmt.config(), fmt.to_tensors())
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.to_tensors().values(), fmt.to_tensors().values()))


def test_two_bits_per_weight_plus_the_scales_and_codebook():
    fmt = VQFormat.encode(torch.randn(256, 512), bits=8, dim=4)
    assert fmt.bits_per_weight == pytest.approx(2 + 16 / 512 + 8 * 256 * 4 * 2 / (256 * 512))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_objective_never_worse_than_its_start_and_better_on_clustered_data(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, 4, generator=gen) * 3
    v = centres[torch.randint(0, 16, (2000,), generator=gen)] + 0.3 * torch.randn(2000, 4, generator=gen)
    a = torch.rand(2000, 4, generator=gen) + 0.1
    codebook, history = learn_codebook(v, 4, a, iterations=8, seed=seed)
    assert len(history) == 9 and min(history[1:]) <= history[0]
    assert history[0] > 1.5 * min(history)  # a random start of 16 clusters misses some of them
    # the result is the best iterate: its own error, as stored (fp16)
    assert torch.equal(codebook, codebook.half().float())
    exact = float((a * (v - codebook[nearest_vectors(v, codebook, a)]) ** 2).double().sum())
    assert exact == pytest.approx(min(history), rel=1e-6)


def weighted_distances(v: torch.Tensor, codebook: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Every vector's weighted squared distance to every codeword, fp64 ``(N, K)``."""
    return (a.double().unsqueeze(1) * (v.double().unsqueeze(1) - codebook.double()) ** 2).sum(-1)


def test_assignment_is_optimal_on_a_known_codebook():
    # the 16 corners of the 4-cube and the 8 unit vectors +-e_i (the D4 lattice's shortest vectors
    # come in such families): brute force over all 24 codewords agrees with the search
    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=4)))
    axes = torch.cat([torch.eye(4), -torch.eye(4)]) * 1.5
    codebook = torch.cat([corners, axes])
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(5000, 4, generator=gen) * 1.3
    for a in (None, torch.rand(4, generator=gen) + 0.05, torch.rand(5000, 4, generator=gen)):
        weights = torch.ones(4) if a is None else a
        d = weighted_distances(v, codebook, weights.expand_as(v))
        codes = nearest_vectors(v, codebook, a)
        # the chosen codeword's distance is the least, to fp32 rounding of the search's sums
        chosen = d.gather(1, codes.unsqueeze(1)).squeeze(1)
        assert bool((chosen <= d.min(dim=1).values + 1e-5 * (1 + d.min(dim=1).values)).all())


def test_encoded_vectors_take_their_nearest_codeword_under_the_importance():
    torch.manual_seed(4)
    w = torch.randn(10, 32)
    importance = torch.rand(32) + 0.01
    fmt = VQFormat.encode(w, bits=4, dim=4, group_size=16, iterations=4, importance=importance)
    vectors, weights = scaled_vectors(w, fmt.scales.float(), 16, importance, 4)
    d = weighted_distances(vectors, fmt.codebook.float(), weights)
    chosen = d.gather(1, fmt.codes().long().reshape(-1, 1)).squeeze(1)
    assert bool((chosen <= d.min(dim=1).values * (1 + 1e-5) + 1e-12).all())


def blockwise_reference(w: torch.Tensor, hessian: torch.Tensor, fmt: VQFormat, percdamp: float) -> torch.Tensor:
    """The block form of GPTQ-VQ written out in fp64 on ``fmt``'s codebook and scales: for each block
    ``S`` of dim columns, codes by brute force minimising ``||(w_S - q_S) U_SS^-1||^2``, then
    ``W_R -= (W_S - Q_S) U_SS^-1 U_SR``. Returns the codes."""
    u = inverse_hessian_factor(hessian, percdamp).double()
    w = w.double().clone()
    codebook, s = fmt.codebook.double(), fmt.scales.double().repeat_interleave(fmt.group, dim=1)
    dim, n = fmt.dim, w.shape[1]
    codes = torch.empty(w.shape[0], n // dim, dtype=torch.long)
    for j in range(0, n, dim):
        S, R = slice(j, j + dim), slice(j + dim, n)
        t = torch.linalg.inv(u[S, S])
        scale = s[:, j : j + 1]
        errors = ((((w[:, S] / scale) @ t).unsqueeze(1) - codebook @ t) ** 2).sum(-1)
        codes[:, j // dim] = errors.argmin(dim=1)
        q = codebook[codes[:, j // dim]] * scale
        w[:, R] -= (w[:, S] - q) @ t @ u[S, R]
    return codes


def test_gptq_vq_sweep_is_the_block_update():
    w, stats = layer_problem(2, out=24, n=64, tokens=256)
    params = GPTQVQParams(bits=5, dim=4, group_size=32, block_size=16, iterations=3)
    fmt = gptq_vq_quantize(w, stats.hessian, params)
    codes = blockwise_reference(w, stats.hessian, fmt, params.percdamp)
    # fp32 against fp64: a code may differ only where two codewords tie to rounding, then the rows diverge
    agree = (fmt.codes().long() == codes).float().mean()
    assert float(agree) >= 0.98


@pytest.mark.parametrize("options", [{}, {"rotate": True}, {"group_size": 64}])
def test_gptq_vq_beats_round_to_nearest_vq_on_correlated_inputs(options):
    w, stats = layer_problem(0)
    rtn = run_method("vq", w, stats, bits=8, dim=4, **options)
    fmt = run_method("gptq_vq", w, stats, bits=8, dim=4, **options)
    assert isinstance(fmt, TransformedFormat) == bool(options.get("rotate"))
    # same codebook and scales: the error feedback alone makes the difference
    assert output_error(w, fmt.decode(), stats.hessian) < 0.7 * output_error(w, rtn.decode(), stats.hessian)


def test_gptq_vq_at_two_bits_beats_uniform_gptq_at_two_and_a_half():
    w, stats = layer_problem(1, out=256, n=512)
    uniform = run_method("gptq", w, stats, bits=2, group_size=64, act_order=True, rotate=True)
    fmt = run_method("gptq_vq", w, stats, bits=8, dim=4, rotate=True)
    assert fmt.nbytes < uniform.nbytes
    assert output_error(w, fmt.decode(), stats.hessian) < output_error(w, uniform.decode(), stats.hessian)


def test_bad_vq_input_fails_clearly():
    with pytest.raises(FormatError, match="in_features 30 is not a multiple of dim=4"):
        VQFormat.encode(torch.randn(4, 30), dim=4)
    with pytest.raises(FormatError, match="bits .per code. must be an integer from 2 to 8"):
        VQFormat.encode(torch.randn(4, 32), bits=9)
    with pytest.raises(FormatError, match="group_size must be null .* or a positive multiple of dim=4"):
        VQFormat.encode(torch.randn(4, 32), group_size=6)
    nan = torch.randn(4, 32)
    nan[1, 3] = float("nan")
    with pytest.raises(FormatError, match="1 NaN/Inf values"):
        VQFormat.encode(nan)
    x = torch.randn(64, 32)
    stats = LayerStats(x.T @ x, 64)
    with pytest.raises(FormatError, match="NaN/Inf"):
        run_method("gptq_vq", nan, stats, bits=2, dim=4)
    with pytest.raises(FormatError, match="not a multiple of dim=8"):
        run_method("gptq_vq", torch.randn(4, 36), LayerStats(torch.eye(36), 1), bits=2, dim=8)
    with pytest.raises(RecipeError, match="bits .per code. must be an integer from 2 to 8"):
        run_method("vq", torch.randn(4, 32), stats, bits=1)
    with pytest.raises(RecipeError, match="block_size must be a multiple of dim=8"):
        run_method("gptq_vq", torch.randn(4, 32), stats, dim=8, block_size=12)
    with pytest.raises(FormatError, match="codebook.*has shape"):
        VQFormat.from_tensors((4, 32), {"bits": 2, "dim": 4, "group_size": None},
                              {"packed": torch.zeros(4, 2, dtype=torch.uint8), "scales": torch.ones(4, 1).half(), "codebook": torch.zeros(3, 4).half()})


def test_refitting_the_codebook_to_the_codes_lowers_the_output_error():
    w, stats = layer_problem(3)
    plain = run_method("gptq_vq", w, stats, bits=6, dim=4)
    refit = run_method("gptq_vq", w, stats, bits=6, dim=4, refit_steps=20)
    assert torch.equal(plain.codes(), refit.codes()) and torch.equal(plain.scales, refit.scales)
    # least squares over the codebook for the same codes: the error can only go down (by 3 % here)
    assert output_error(w, refit.decode(), stats.hessian) < 0.99 * output_error(w, plain.decode(), stats.hessian)
