"""Vector quantization: each ``bits``-bit code indexes one of ``2**bits`` vectors of ``dim`` consecutive
input columns in a codebook shared by the layer, times an fp16 scale per output row (or per group of
columns).

Below 3 bits a scalar grid has too few levels to follow the weights; a code for a vector of ``dim``
weights spends ``bits / dim`` bits on each and places its ``2**bits`` points where the vectors are in
``dim`` dimensions, which no product of scalar grids can (AQLM, Egiazarian et al. 2024,
https://arxiv.org/abs/2401.06118, learns such codebooks; QuIP#, Tseng et al. 2024,
https://arxiv.org/abs/2402.04396, uses the E8 lattice after incoherence processing). 8-bit codes of
4 weights are 2 bits per weight.

``W[o, dim*v : dim*(v+1)] = codebook[codes[o, v]] * scales[o, (dim*v) // group]``. Codes are bit-packed
as the ``int`` format's (:mod:`matpress.formats.packing`); the codebook is fp16 ``(2**bits, dim)``, the
scales fp16 ``(out, n_groups)``.

The codebook is learned (:func:`learn_codebook`): weighted k-means of the scaled vectors ``w / s``
minimising ``sum_i a_i (w_i - s c[k]_i)**2`` (``a`` per-column importance, e.g. the Hessian diagonal:
:mod:`matpress.methods.vq`), from ``2**bits`` distinct vectors of the weight, alternating the nearest
codeword of each vector and each codeword the weighted mean of its vectors. Each step lowers the
objective; the fp16 rounding of the stored codebook may not, so the best iterate as stored is kept,
never worse than the start. The scale of a group is the root mean square of its weights, so the
codebook sees vectors of unit spread whatever the row's magnitude.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from matpress.errors import FormatError, quote
from matpress.formats.base import Format, check_stored, check_weight, config_values, expect_tensor, fp16_factor, is_positive_int
from matpress.formats.integer import FP16_MIN_NORMAL, grouped, resolve_group_size
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows
from matpress.formats.ternary import expand_groups

BITS = range(2, 9)  # codes of 2 to 8 bits: codebooks of 4 to 256 vectors
DIMS = range(2, 9)
# k-means fits the codebook on at most this many of a layer's vectors (128 per codeword of 256), drawn
# without repeats: a 1536x576 layer has 221184 vectors of 4, and each round costs a pass over them.
KMEANS_SAMPLE = 1 << 15
# Vectors whose distances to the codebook are computed at once (a block of the (vectors, 2**bits) table).
CHUNK_VECTORS = 1 << 14


def check_vq(bits: Any, dim: Any, group_size: Any, in_features: Optional[int] = None) -> None:
    """Refuse parameters the format cannot hold, naming the one at fault; ``in_features`` (when known)
    must be a multiple of ``dim``, and so must ``group_size``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise FormatError(f"vq format: bits (per code) must be an integer from 2 to 8, got {quote(bits)}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim not in DIMS:
        raise FormatError(f"vq format: dim (weights per code) must be an integer from 2 to 8, got {quote(dim)}")
    if group_size is not None and (not is_positive_int(group_size) or group_size % dim):
        raise FormatError(f"vq format: group_size must be null (one scale per row) or a positive multiple of dim={dim}, got {quote(group_size)}")
    if in_features is not None and in_features % dim:
        raise FormatError(
            f"vq format: in_features {in_features} is not a multiple of dim={dim}; choose a dim dividing it "
            "or another format for this layer"
        )


def rms_scales(weight: torch.Tensor, group: int) -> torch.Tensor:
    """Root mean square of each group of ``weight`` ``(out, in)`` as fp16 scales ``(out, n_groups)``
    (fp32 holding fp16 values; an all-zero group gets the smallest normal fp16)."""
    out_f, n = weight.shape
    squares = torch.nn.functional.pad(weight * weight, (0, (-n) % group)).view(out_f, -1, group).sum(-1)
    counts = torch.full((squares.shape[1],), float(group))
    counts[-1] = n - group * (squares.shape[1] - 1)
    rms = (squares / counts).sqrt().clamp(min=FP16_MIN_NORMAL)
    return fp16_factor(rms, "a vq scale").float()


def as_vectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``(out, in)`` -> ``(out * in / dim, dim)``: each row's consecutive runs of ``dim`` columns."""
    return weight.reshape(-1, dim)


def scaled_vectors(
    weight: torch.Tensor, scales: torch.Tensor, group: int, importance: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors ``w / s`` ``(out * in / dim, dim)`` the codebook fits, and the weights of their
    entries, ``a s**2`` for column importance ``a`` ``(in,)``: ``a (w - s c)**2 = a s**2 (w / s - c)**2``."""
    s = expand_groups(scales, group, weight.shape[1])
    return as_vectors(weight / s, dim), as_vectors(importance * s * s, dim)


def nearest_vectors(vectors: torch.Tensor, codebook: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the codeword nearest to each of ``vectors`` ``(N, dim)`` in ``codebook`` ``(K, dim)``
    under ``sum_i a_i (v_i - c_i)**2`` (``weights`` ``a`` ``(N, dim)``, or ``(dim,)`` for all, or None
    for plain squared distance): int64 ``(N,)``. The ``a v**2`` term is the same for every codeword, so
    the search is one product per chunk, ``[a v, a] @ [-2 c, c**2]^T``."""
    if weights is None:
        weights = torch.ones(vectors.shape[1])
    weights = weights.expand_as(vectors)
    book = torch.cat([-2 * codebook, codebook * codebook], dim=1).T  # (2 dim, K)
    codes = torch.empty(vectors.shape[0], dtype=torch.int64)
    for start in range(0, vectors.shape[0], CHUNK_VECTORS):
        part = slice(start, start + CHUNK_VECTORS)
        a = weights[part]
        codes[part] = (torch.cat([a * vectors[part], a], dim=1) @ book).argmin(dim=1)
    return codes


def codebook_error(vectors: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor) -> float:
    """``sum a (v - codebook[codes])**2`` over all vectors (fp64 sum)."""
    return float((weights.expand_as(vectors) * (vectors - codebook[codes]) ** 2).double().sum())


def learn_codebook(
    vectors: torch.Tensor, bits: int, weights: torch.Tensor, iterations: int, seed: int = 0
) -> tuple[torch.Tensor, list[float]]:
    """Weighted k-means (see the module docstring) of ``vectors`` ``(N, dim)`` with per-entry weights
    ``weights`` ``(N, dim)`` (non-negative): the codebook ``(2**bits, dim)`` as fp32 holding fp16
    values, and the objective on the fitted vectors of the start and of each iterate as stored (the
    result is the least). At most :data:`KMEANS_SAMPLE` of the vectors are fitted, and the start is
    ``2**bits`` of them, both drawn without repeats (seeded by ``seed``); with fewer vectors than
    codewords each starts as several, and the copies left empty keep their value."""
    n_codes = 1 << bits
    n, dim = vectors.shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if n > KMEANS_SAMPLE:
        vectors, weights = vectors[order[:KMEANS_SAMPLE]], weights.expand_as(vectors)[order[:KMEANS_SAMPLE]]
        order = torch.arange(KMEANS_SAMPLE)
    codebook = vectors[order[torch.arange(n_codes) % len(order)]].half().float()  # repeats only if too few
    codes = nearest_vectors(vectors, codebook, weights)
    history = [codebook_error(vectors, codebook, codes, weights)]
    best = (history[0], codebook)
    for _ in range(iterations):
        # each codeword: the weighted mean of its vectors, entry by entry (an empty one keeps its value)
        num = torch.zeros(n_codes, dim).index_add_(0, codes, weights * vectors)
        den = torch.zeros(n_codes, dim).index_add_(0, codes, weights)
        codebook = torch.where(den > 0, num / den.clamp(min=1e-30), codebook).half().float()
        codes = nearest_vectors(vectors, codebook, weights)
        history.append(codebook_error(vectors, codebook, codes, weights))
        if history[-1] < best[0]:
            best = (history[-1], codebook)
    return best[1], history


class VQFormat(Format):
    """Bit-packed codes into a per-layer codebook of vectors of ``dim`` weights, fp16 scales per row or group."""

    name = "vq"

    def __init__(
        self,
        shape: tuple[int, int],
        bits: int,
        dim: int,
        group_size: int | None,
        packed: torch.Tensor,
        scales: torch.Tensor,
        codebook: torch.Tensor,
    ):
        super().__init__(shape)
        check_vq(bits, dim, group_size, self.in_features)
        self.bits = bits
        self.dim = dim
        self.group_size = group_size
        self.group = resolve_group_size(group_size, self.in_features)
        self.n_vectors = self.in_features // dim
        self.n_groups = math.ceil(self.in_features / self.group)
        row_bytes = packed_row_bytes(self.n_vectors, bits) if bits < 8 else self.n_vectors
        self.packed = expect_tensor({"packed": packed}, "packed", (self.out_features, row_bytes), torch.uint8, self.name)
        self.scales = expect_tensor({"scales": scales}, "scales", (self.out_features, self.n_groups), torch.float16, self.name)
        self.codebook = expect_tensor({"codebook": codebook}, "codebook", (1 << bits, dim), torch.float16, self.name)
        if not bool(torch.isfinite(self.codebook).all()):
            raise FormatError("vq format: the stored codebook holds NaN or infinite values: the data is corrupt")

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, group_size: int | None
    ) -> "VQFormat":
        """Build from unpacked codes ``(out, in / dim)``, scales ``(out, n_groups)`` and the codebook
        ``(2**bits, dim)`` (both fp16-exact)."""
        n_codes, dim = codebook.shape
        bits = n_codes.bit_length() - 1
        if n_codes != 1 << bits:
            raise FormatError(f"vq format: a codebook has a power of two of vectors, got {n_codes}")
        packed = pack_rows(codes.to(torch.int64), bits)
        shape = (codes.shape[0], codes.shape[1] * dim)
        return cls(shape, bits, dim, group_size, packed, scales.to(torch.float16), codebook.to(torch.float16))

    @classmethod
    def encode(
        cls, weight: torch.Tensor, bits: int = 8, dim: int = 4, group_size: int | None = None,
        iterations: int = 10, importance: Optional[torch.Tensor] = None, seed: int = 0,
    ) -> "VQFormat":
        """Round-to-nearest: RMS scales, a codebook learned by k-means weighted by ``importance`` (per
        input column, ``(in,)``; None: all equal), each vector its nearest codeword under that weighting."""
        check_weight(weight)
        check_vq(bits, dim, group_size, weight.shape[1])
        w = weight.detach().float()
        group = resolve_group_size(group_size, w.shape[1])
        scales = rms_scales(w, group)
        imp = torch.ones(w.shape[1]) if importance is None else importance.float().clamp(min=0)
        vectors, weights = scaled_vectors(w, scales, group, imp, dim)
        codebook, _ = learn_codebook(vectors, bits, weights, iterations, seed)
        codes = nearest_vectors(vectors, codebook, weights).view(w.shape[0], -1)
        return cls.from_codes(codes, scales, codebook, group_size)

    # -- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``(out, in / dim)`` uint8."""
        return unpack_rows(self.packed, self.bits, self.n_vectors)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        vectors = self.codebook.float()[self.codes().long()].reshape(self.out_features, self.in_features)
        return (vectors * expand_groups(self.scales.float(), self.group, self.in_features)).to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unpack only the rows looked up (each row's codes and scales; the codebook is shared)."""
        index = index.to(self.packed.device)
        rows = VQFormat(
            (index.numel(), self.in_features), self.bits, self.dim, self.group_size,
            self.packed[index], self.scales[index], self.codebook,
        )
        return rows.decode(dtype)

    # -- storage --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "dim": self.dim, "group_size": self.group_size}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "codebook": self.codebook}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "VQFormat":
        bits, dim, group_size = config_values("vq", config, "bits", "dim", "group_size")
        check_stored("vq", tensors, {"packed", "scales", "codebook"})
        return cls(shape, bits, dim, group_size, tensors.get("packed"), tensors.get("scales"), tensors.get("codebook"))

    def describe(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"vq{self.bits}x{self.dim} {g}"
