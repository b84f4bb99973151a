"""Non-uniform codebook quantization: ``bits``-bit codes (2 to 4) indexing a table of ``2**bits``
levels, times an fp16 scale per group of input columns (or per output channel).

A uniform grid spends as many levels on the rare tails of a bell-shaped weight distribution as on its
crowded centre; a table of levels placed where the weights are needs fewer bits for the same error
(QLoRA's NF4, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314; llama.cpp's IQ4_NL; SqueezeLLM,
Kim et al. 2023, https://arxiv.org/abs/2306.07629, learns one table per output channel).

``W[o, i] = table[t(o), codes[o, i]] * scales[o, i // group]`` with ``t(o) = 0`` for one table per
layer and ``t(o) = o`` for one table per output channel. Codes are bit-packed as the ``int`` format's
(:mod:`matpress.formats.packing`); the table is stored as fp16 ``(1 or out_features, 2**bits)``.

The levels are integers in ``[-127, 127]`` (:data:`LEVEL_MAX`), as IQ4_NL's are: the kernels then look
each code up into an int8 register and multiply it by int8 activations exactly, and a table of IQ4_NL's
own levels exports to GGUF bit for bit. (A file written before tables were integer still loads and
decodes; the kernels leave it to the dense path.) The scales are accordingly about ``max|w| / 127``; a
group whose largest weight is below ``127 * 2**-14`` (about 0.008) gets a subnormal fp16 scale, a
multiple of ``2**-24``, as IQ4_NL's and Q8_0's do.

Tables (``table`` in the config, which names how the stored levels were made):

- ``nf``: normal quantiles (NF4-style): the levels split a standard normal into ``2**bits`` bins of
  equal probability and sit at their median, ``Phi^-1((k + 1/2) / 2**bits)``, scaled to ``max |l| = 127``
  and rounded.
- ``nl``: the mean-square-optimal levels of a standard normal (Lloyd-Max: each level the centroid of
  its cell, each cell boundary the midpoint of its levels), scaled to ``max |l| = 127`` and rounded: a
  fixed non-linear grid in the spirit of IQ4_NL, tighter in the centre than ``nf``.
- ``iq4nl`` (4 bits only): llama.cpp's IQ4_NL levels (``kvalues_iq4nl`` in ggml), asymmetric, so that a
  codebook of groups of 32 on it is an IQ4_NL tensor (:mod:`matpress.export.gguf`).
- ``layer`` / ``row``: learned (weighted k-means, :mod:`matpress.methods.codebook`), one table per
  layer or per output channel, rounded to integers.

Encoding to a table (round-to-nearest here): each weight takes the level nearest to ``w / scale``; the
scale of each group is chosen by a small search over multiples of ``max|w| / max|level|`` for the least
(optionally importance-weighted) squared error, as stored (fp16).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch

from matpress.errors import FormatError, quote
from matpress.formats.base import Format, check_stored, check_weight, config_values, expect_tensor, is_positive_int
from matpress.formats.integer import FP16_MAX, grouped, resolve_group_size
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows
from matpress.formats.ternary import expand_groups

FIXED_TABLES = ("nf", "nl", "iq4nl")
LEARNED_TABLES = ("layer", "row")
LEVEL_MAX = 127  # levels are integers in [-LEVEL_MAX, LEVEL_MAX]
# llama.cpp's IQ4_NL levels (ggml-common.h, kvalues_iq4nl): a fixed non-uniform 4-bit grid
IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
FP16_MIN_SUBNORMAL = 2.0**-24  # the least positive fp16: a scale never rounds to zero
TABLES = FIXED_TABLES + LEARNED_TABLES
BITS = (2, 3, 4)
# Multiples of max|w| / max|level| the scale search tries: 1 puts the top level on the group's
# extreme, smaller ones clip the extremes to give the crowded centre finer levels, larger ones suit a
# table whose outer levels sit beyond the extremes of a small group (the Gaussian-optimal ``nl``).
SCALE_FACTORS = tuple(0.5 + 0.05 * k for k in range(19))


def check_codebook(bits: Any, table: Any) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise FormatError(f"codebook format: bits must be 2, 3 or 4, got {quote(bits)}")
    if table not in TABLES:
        raise FormatError(f"codebook format: table must be one of {list(TABLES)}, got {quote(table)}")
    if table == "iq4nl" and bits != 4:
        raise FormatError(f"codebook format: the iq4nl table has 16 levels (4 bits), got bits={bits}")


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _normal_pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def normal_quantile_levels(bits: int) -> torch.Tensor:
    """``nf``: medians of ``2**bits`` equal-probability bins of N(0, 1), normalised to ``max |l| = 1`` (fp64)."""
    n = 1 << bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    q = math.sqrt(2) * torch.erfinv(2 * p - 1)
    return q / q.abs().max()


def lloyd_max_levels(bits: int, iterations: int = 500) -> torch.Tensor:
    """``nl``: the Lloyd-Max (mean-square-optimal) quantizer of N(0, 1) with ``2**bits`` levels,
    normalised to ``max |l| = 1`` (fp64). Fixed-point iteration from the quantiles: boundaries at the
    midpoints of the levels, each level the conditional mean of its cell,
    ``(pdf(a) - pdf(b)) / (cdf(b) - cdf(a))``."""
    n = 1 << bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = math.sqrt(2) * torch.erfinv(2 * p - 1)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        a, b = edges[:-1], edges[1:]
        levels = (_normal_pdf(a) - _normal_pdf(b)) / (_normal_cdf(b) - _normal_cdf(a))
    levels = (levels - levels.flip(0)) / 2  # symmetric, as the optimum is (fp64 rounding aside)
    return levels / levels[-1]


@functools.lru_cache(maxsize=None)
def _fixed_table(kind: str, bits: int) -> torch.Tensor:
    if kind == "iq4nl":
        return torch.tensor(IQ4NL_LEVELS, dtype=torch.float16)
    levels = normal_quantile_levels(bits) if kind == "nf" else lloyd_max_levels(bits)
    return (levels * LEVEL_MAX).round().to(torch.float16)


def fixed_table(kind: str, bits: int) -> torch.Tensor:
    """The fixed table ``kind`` (``nf``, ``nl`` or ``iq4nl``) of ``2**bits`` ascending integer levels,
    fp32."""
    check_codebook(bits, kind)
    if kind not in FIXED_TABLES:
        raise FormatError(f"codebook format: table {kind!r} is learned from the weight; fixed tables are {list(FIXED_TABLES)}")
    return _fixed_table(kind, bits).float()


def integer_levels(levels: torch.Tensor) -> torch.Tensor:
    """Learned levels rounded to the integers a table holds (``[-LEVEL_MAX, LEVEL_MAX]``)."""
    return levels.round().clamp(-LEVEL_MAX, LEVEL_MAX)


def has_integer_levels(table: torch.Tensor) -> bool:
    """Whether a stored table holds integer levels in ``[-LEVEL_MAX, LEVEL_MAX]`` (every table written
    since tables became integer; the kernels take only those)."""
    t = table.float()
    return bool(torch.equal(t, integer_levels(t)))


def nearest_codes(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each of ``values`` ``(out, ...)`` in ``table`` ``(1 or out, L)``
    (each row ascending), row ``o`` of the values against table row ``o`` (or the one table): int64."""
    out_f = values.shape[0]
    mids = (table[:, 1:] + table[:, :-1]) / 2
    if table.shape[0] == 1:  # one table: a search in one sorted list (far faster than one per row)
        return torch.bucketize(values.contiguous(), mids[0])
    return torch.searchsorted(mids.expand(out_f, -1).contiguous(), values.reshape(out_f, -1).contiguous()).reshape(values.shape)


def level_values(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[t(o), codes[o, ...]]`` for codes ``(out, ...)`` and a table ``(1 or out, L)``."""
    out_f = codes.shape[0]
    flat = codes.reshape(out_f, -1).long()
    if table.shape[0] == 1:
        return table[0][flat].reshape(codes.shape)
    return table.gather(1, flat).reshape(codes.shape)


def group_weights(importance: Optional[torch.Tensor], n: int, group: int) -> torch.Tensor:
    """Per-column importance ``(n,)`` (None: all ones) as ``(n_groups, group)``, zero on the padding of a
    short last group, so padded columns never count in a group's error."""
    imp = torch.ones(n) if importance is None else importance.float()
    pad = (-n) % group
    return torch.nn.functional.pad(imp, (0, pad)).view(-1, group)


def search_scales(groups: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-group fp16 scales ``(out, k)`` for ``groups`` ``(out, k, group)`` on ``table`` ``(1 or out, L)``:
    of the :data:`SCALE_FACTORS` multiples ``f`` of ``base = max|w| / max|level|``, the one with the
    least ``sum weights * (w - f base level)**2``, ``weights`` ``(k, group)``; then rounded to fp16 (a
    relative change of at most 2**-11, as stored; subnormal scales to a multiple of 2**-24). Returned as
    fp32 holding fp16 values.

    The error of ``f`` is ``base**2 sum weights (v - f level)**2`` with ``v = w / base``, and the level
    nearest to ``v / f`` is the one whose cell, scaled by ``f``, holds ``v``: the values are divided once
    and each factor only scales the table's ``L - 1`` cell edges."""
    out_f = groups.shape[0]
    reach = table.abs().amax(dim=1).expand(out_f).view(out_f, 1)
    base = (groups.abs().amax(dim=-1) / reach).clamp(min=FP16_MIN_SUBNORMAL)
    if float(base.max()) * SCALE_FACTORS[-1] > FP16_MAX:
        raise FormatError(
            f"a codebook scale of {float(base.max()):.3g} overflows fp16; the weight's range is too large for "
            "fp16 scales (check the layer for exploding weights)"
        )
    v = groups / base.unsqueeze(-1)
    best_err = best_factor = None
    for factor in SCALE_FACTORS:
        levels = table * factor
        err = (weights * (v - level_values(nearest_codes(v, levels), levels)) ** 2).sum(dim=-1)
        if best_err is None:
            best_err, best_factor = err, torch.full_like(err, factor)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_factor = torch.where(better, factor, best_factor)
    return (base * best_factor).clamp(min=FP16_MIN_SUBNORMAL).half().float()


class CodebookFormat(Format):
    """Bit-packed codes into a table of levels (one per layer or per output channel), fp16 group scales."""

    name = "codebook"

    def __init__(
        self,
        shape: tuple[int, int],
        bits: int,
        group_size: int | None,
        table_kind: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        table: torch.Tensor,
    ):
        super().__init__(shape)
        check_codebook(bits, table_kind)
        self.bits = bits
        self.group_size = group_size
        self.group = resolve_group_size(group_size, self.in_features)
        self.table_kind = table_kind
        self.n_groups = math.ceil(self.in_features / self.group)
        row_bytes = packed_row_bytes(self.in_features, bits)
        self.packed = expect_tensor({"packed": packed}, "packed", (self.out_features, row_bytes), torch.uint8, self.name)
        self.scales = expect_tensor({"scales": scales}, "scales", (self.out_features, self.n_groups), torch.float16, self.name)
        n_tables = self.out_features if table_kind == "row" else 1
        self.table = expect_tensor({"table": table}, "table", (n_tables, 1 << bits), torch.float16, self.name)
        if not bool(torch.isfinite(self.table).all()):
            raise FormatError("codebook format: the stored table holds NaN or infinite levels: the data is corrupt")

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int, group_size: int | None, table_kind: str
    ) -> "CodebookFormat":
        """Build from unpacked codes ``(out, in)``, per-group scales ``(out, n_groups)`` and the table
        ``(1 or out, 2**bits)`` (both fp16-exact)."""
        packed = pack_rows(codes.to(torch.int64), bits)
        return cls(tuple(codes.shape), bits, group_size, table_kind, packed, scales.to(torch.float16), table.to(torch.float16))

    @classmethod
    def encode(cls, weight: torch.Tensor, bits: int = 4, group_size: int | None = 32, table: str = "nl") -> "CodebookFormat":
        """Round-to-nearest onto a fixed table, each group's scale by a small error search. Learned
        tables are fitted by the ``codebook`` method (:mod:`matpress.methods.codebook`)."""
        check_weight(weight)
        levels = fixed_table(table, bits).unsqueeze(0)
        w = weight.detach().float()
        group = resolve_group_size(group_size, w.shape[1])
        scales = search_scales(grouped(w, group), levels, group_weights(None, w.shape[1], group))
        return cls.from_scales(w, scales, levels, bits, group_size, table)

    @classmethod
    def from_scales(
        cls, weight: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int, group_size: int | None, table_kind: str
    ) -> "CodebookFormat":
        """Each weight of ``weight`` ``(out, in)`` rounded to its nearest level given the scales."""
        group = resolve_group_size(group_size, weight.shape[1])
        codes = nearest_codes(weight / expand_groups(scales, group, weight.shape[1]), table)
        return cls.from_codes(codes, scales, table, bits, group_size, table_kind)

    # -- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``(out, in)`` uint8."""
        return unpack_rows(self.packed, self.bits, self.in_features)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        levels = level_values(self.codes(), self.table.float())
        return (levels * expand_groups(self.scales.float(), self.group, self.in_features)).to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unpack only the rows looked up (each row's codes, scales and table row are its own)."""
        index = index.to(self.packed.device)
        if index.numel() == 0:
            return torch.empty(0, self.in_features, dtype=dtype, device=self.packed.device)
        table = self.table[index] if self.table_kind == "row" else self.table
        rows = CodebookFormat(
            (index.numel(), self.in_features), self.bits, self.group_size, self.table_kind,
            self.packed[index], self.scales[index], table,
        )
        return rows.decode(dtype)

    # -- storage --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "table": self.table_kind}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales, "table": self.table}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "CodebookFormat":
        bits, group_size, table = config_values("codebook", config, "bits", "group_size", "table")
        if group_size is not None and not is_positive_int(group_size):
            raise FormatError(f"codebook format: group_size must be a positive integer or null, got {quote(group_size)}")
        check_stored("codebook", tensors, {"packed", "scales", "table"})
        return cls(shape, bits, group_size, table, tensors.get("packed"), tensors.get("scales"), tensors.get("table"))

    def describe(self) -> str:
        g = "ch" if self.group == self.in_features and self.group_size is None else f"g{self.group_size}"
        return f"codebook{self.bits} {g} {self.table_kind}"
