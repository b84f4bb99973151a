"""The Optimal Brain Surgeon column sweep shared by Hessian-aware methods.

Minimising the layer-output error ``||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T)`` (``H = X^T X``) one
input column at a time: after column ``j`` is rounded (pruned, quantized, made ternary), the error it
leaves is spread over the columns not yet rounded through the inverse Hessian (OBS, Hassibi & Stork
1993), processed in lazy blocks so most of the update is one matrix product (GPTQ, Frantar et al. 2023;
SparseGPT, Frantar & Alistarh 2023). The rows of the upper Cholesky factor of ``H^-1`` give each
step's update directly, without re-inverting ``H`` (:func:`matpress.methods.gptq.inverse_hessian_factor`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch

from matpress.errors import CalibrationError
from matpress.methods.base import LayerStats


def live_inputs(stats: LayerStats, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input second moment ``H = E[x x^T]`` and the weight, checked, with dead inputs dropped
    (:func:`drop_dead_inputs`). Returns ``(H, W)``."""
    if stats is None:
        raise CalibrationError("this method needs calibration statistics of the layer's inputs")
    h = stats.hessian.to(device=weight.device, dtype=torch.float32)
    if h.shape != (weight.shape[1], weight.shape[1]):
        raise CalibrationError(
            f"calibration statistics are for {h.shape[0]} inputs but the weight has {weight.shape[1]}"
        )
    if not torch.isfinite(h).all():
        raise CalibrationError("calibration statistics contain NaN/Inf; check the calibration data and model")
    return drop_dead_inputs(h, weight)


def drop_dead_inputs(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``h`` and ``weight`` (fp32) in which inputs never non-zero in calibration get
    ``H_ii = 1`` and zero weight columns: they cannot affect the output, and this keeps H invertible."""
    h = h.float().clone()
    w = weight.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return h, w


def damped(h: torch.Tensor, damping: float) -> torch.Tensor:
    """``h`` plus ``damping`` times its mean diagonal on the diagonal (positive definite for damping > 0)."""
    return h + damping * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], device=h.device)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, restoring the thread count after. The column steps
    of the sweep are thousands of small operations: splitting each over threads costs more than it
    saves, and on a loaded machine every step waits for the slowest thread to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def obs_sweep(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    round_column: Callable[[int, torch.Tensor], torch.Tensor],
    start_block: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
    blocksize: int = 128,
    start_column: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Round ``weight`` column by column with OBS error feedback; returns the rounded matrix.

    ``round_column(j, w)`` gives the rounded value of column ``j`` (current, error-updated values ``w``).
    ``start_block(i1, i2, W1, Hinv1)`` runs before each lazy block of columns ``[i1, i2)`` (e.g. to pick
    that block's pruning mask or quantization grid from the updated weights ``W1``). ``start_column(j, W)``
    runs before column ``j`` with the whole current matrix (columns of the current block updated, later
    ones as of the block's start), e.g. to pick a quantization group's grid where the group begins.

    The sweep holds ``W`` transposed, so each column is a contiguous row and each step's update one
    rank-1 ``addr_``; the callbacks see the usual ``(out, in)`` views. The steps within a block run on
    one thread (:func:`single_thread`), the update of the later columns per block on all of them.
    """
    wt = weight.float().t().contiguous()  # (in, out): column j of W is row j
    rounded = torch.zeros_like(wt)
    cols = wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2]  # a view: updates land in wt
        hinv1 = hinv[i1:i2, i1:i2]
        if start_block is not None:
            start_block(i1, i2, w1.t(), hinv1)
        err1 = torch.empty_like(w1)
        with single_thread():
            for j in range(i2 - i1):
                if start_column is not None:
                    start_column(i1 + j, wt.t())
                col = w1[j]
                q = round_column(i1 + j, col)
                rounded[i1 + j] = q
                err = torch.sub(col, q).div_(hinv1[j, j])
                w1[j + 1 :].addr_(hinv1[j, j + 1 :], err, alpha=-1)
                err1[j] = err
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    return rounded.t().contiguous()


def output_error(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - A) H (W - A)^T)``: the layer-output error per token under the second moment ``h``."""
    d = (weight - approx).float()
    return float(((d @ h) * d).sum())


# the asymmetric strength chosen per layer on held-out calibration batches (:func:`held_out_strength`)
AUTO = "auto"


def asymmetric_target(weight: torch.Tensor, stats: LayerStats, strength: Union[float, str], percdamp: float) -> torch.Tensor:
    """The weight moved ``strength`` (0 to 1, or ``"auto"``: :func:`held_out_strength`) of the way to
    the asymmetric target of GPTAQ (Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for
    Asymmetric Calibration", https://arxiv.org/abs/2504.02692): the dense ``W'`` minimising
    ``E||W' x - W x_ref||^2``, where ``x`` is the layer's input in the partly compressed model and
    ``x_ref`` its input in the uncompressed one, ``W' = W E[x_ref x^T] (E[x x^T] + damp I)^-1``. Since
    ``E||Q x - W x_ref||^2 = E||(Q - W') x||^2`` + a constant, compressing ``W'`` against ``E[x x^T]``
    makes the layer undo the error earlier layers left in its input, as far as a linear map can. The
    full step over-fits a few thousand calibration tokens (measured on SmolLM2,
    benchmarks/results/peers.md), hence ``strength``. Without the cross term (``stats.cross``: the walk
    did not track the uncompressed model) the weight is returned."""
    if strength == 0 or stats.cross is None:
        return weight
    w = weight.to(torch.float64)
    if strength == AUTO:
        strength = held_out_strength(w, stats, percdamp)
        if strength == 0:
            return weight
    target = dense_target(w, stats.hessian, stats.reference_moment, percdamp)
    return (w + strength * (target - w)).to(weight.dtype)


def dense_target(w: torch.Tensor, h: torch.Tensor, moment: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``W E[x_ref x^T] (H + damp I)^-1`` in fp64 (``damp``: ``percdamp`` of H's mean diagonal)."""
    h = h.to(device=w.device, dtype=torch.float64).clone()
    h.diagonal().add_(percdamp * float(h.diagonal().mean().clamp(min=1e-12)))
    return torch.linalg.solve(h, (w @ moment.to(device=w.device, dtype=torch.float64)).T).T  # H is symmetric


def held_out_strength(w: torch.Tensor, stats: LayerStats, percdamp: float) -> float:
    """The strength in [0, 1] that minimises the error ``E||(W + s D) x - W x_ref||^2`` on calibration
    batches the step ``D = W' - W`` was not fitted on: ``W'`` fitted on one fold of the batches
    (``stats.fold``) and scored on the other, both ways, the two errors summed. Quadratic in ``s``:
    with ``H``, ``C = E[x_ref x^T]`` of the scoring fold, the minimum is at
    ``s = tr(D (C^T - H) W^T) / tr(D H D^T)``. The step's true part grows with the error earlier layers
    left, its sampling noise does not, so the strength falls as the bits rise. 0 without two folds."""
    if stats.fold is None or stats.cross is None:
        return 0.0
    xtx_a, cross_a, n_a = stats.fold
    n_b = stats.n_tokens - n_a
    if n_a == 0 or n_b == 0:
        return 0.0
    folds = [(xtx_a / n_a, cross_a / n_a), ((stats.xtx - xtx_a) / n_b, (stats.cross - cross_a) / n_b)]
    gain = spread = 0.0
    for (h_fit, c_fit), (h_score, c_score) in ((folds[0], folds[1]), (folds[1], folds[0])):
        d = dense_target(w, h_fit, c_fit, percdamp) - w
        h_score = h_score.to(device=w.device, dtype=torch.float64)
        c_score = c_score.to(device=w.device, dtype=torch.float64)
        dh = d @ h_score
        gain += float(((d @ c_score.T) * w).sum() - (dh * w).sum())
        spread += float((dh * d).sum())
    return 0.0 if spread <= 0 else min(max(gain / spread, 0.0), 1.0)
