"""NaN and infinities through the compiled CPU kernels: the same NaN mask and signed infinities as the
formats' own matmul (decode, then torch's fp32 matmul), on every instruction-set path of lowbit.cpp the
CPU can run."""

from __future__ import annotations

import platform

import pytest
import torch

from format_checks import assert_within_kernel_bound, kernel_library, outlier_weight
from matpress import kernels
from matpress.formats import CodebookFormat, Format, IntFormat, TernaryFormat
from matpress.formats.packing import pack_trits
from matpress.kernels import build, lowbit

OUT, IN = 37, 300
# path: (what mp_isa reports, -march to build it with, CPU flags it needs)
ISA_PATHS = {
    "avx512-vnni": (1, "native", {"avx512f", "avx512bw", "avx512_vnni"}),
    "avx2": (2, "x86-64-v3", {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}),
    "portable": (0, "x86-64-v2", {"sse4_2", "ssse3", "popcnt"}),
}
FORMATS = {
    "int2-g64": lambda w: IntFormat.encode(w, bits=2, group_size=64),
    "int4-g32": lambda w: IntFormat.encode(w, bits=4, group_size=32),
    "int3-g100": lambda w: IntFormat.encode(w, bits=3, group_size=100),
    "int4-ch-sym": lambda w: IntFormat.encode(w, bits=4, group_size=None, symmetric=True),
    "int5-g64": lambda w: IntFormat.encode(w, bits=5, group_size=64),
    "int8-ch": lambda w: IntFormat.encode(w, bits=8, group_size=None),
    "ternary-g64": lambda w: TernaryFormat.encode(w, group_size=64),
    "ternary-ch": lambda w: TernaryFormat.encode(w, group_size=None),
    "codebook4-g32-iq4nl": lambda w: CodebookFormat.encode(w, bits=4, group_size=32, table="iq4nl"),
    "codebook3-g100-nf": lambda w: CodebookFormat.encode(w, bits=3, group_size=100, table="nf"),
}
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.fixture(scope="module", params=sorted(ISA_PATHS))
def isa_lib(request):
    """The kernels built for one instruction-set path (skipped where this CPU cannot run it)."""
    if build.compiler() is None:
        pytest.skip("no C++ compiler here: the formats' own matmul runs")
    isa, march, needs = ISA_PATHS[request.param]
    if platform.machine() not in ("x86_64", "AMD64") and march != "native":
        pytest.skip(f"the {request.param} path is built with x86 flags (-march={march})")
    missing = needs - set(build.cpu_flags().split())
    if missing:
        pytest.skip(f"this CPU cannot run the {request.param} path (lacks {', '.join(sorted(missing))})")
    lib = kernel_library(march)
    assert lib.isa() == isa
    return lib


def group_of(fmt: Format) -> int:
    return fmt.group_size if isinstance(fmt, TernaryFormat) else fmt.group


def assert_same_nonfinite(y: torch.Tensor, reference: torch.Tensor) -> None:
    """Same NaN positions, same +inf and -inf positions."""
    for which in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(which(y), which(reference)), which.__name__


def with_nonfinite_activations(value: float, fmt: Format) -> torch.Tensor:
    """Activations with ``value`` in one element (row 1), a whole row (2), one whole kernel block (3),
    at both ends of a row with the opposite sign at one end (4); rows 0 and 5 stay finite."""
    torch.manual_seed(1)
    x = torch.randn(6, IN)
    geo = lowbit.layout_of(fmt).geometry
    x[1, 7] = value
    x[2] = value
    x[3, geo.width : 2 * geo.width] = value  # the second block: part of group 0 or the start of group 1
    x[4, 0], x[4, -1] = value, -value
    return x


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_nonfinite_activations_propagate_as_in_the_reference(name, value, isa_lib):
    fmt = FORMATS[name](outlier_weight(3, OUT, IN))
    x = with_nonfinite_activations(NONFINITE[value], fmt)
    reference = fmt.matmul(x)
    assert torch.isinf(reference).any() if value != "nan" else torch.isnan(reference[1:5]).all()
    y = lowbit.lowbit_matmul(lowbit.layout_of(fmt), x, isa_lib)
    assert_same_nonfinite(y, reference)
    # the rows without a non-finite value are the kernel's usual result
    assert_within_kernel_bound(y[[0, 5]], fmt, x[[0, 5]], group_of(fmt))


def with_nonfinite_scales(fmt: Format, value: float) -> Format:
    """``fmt`` with scale ``value`` at (row 3, group 1), whose codes are all made equal and off the zero
    point (so that an infinite scale gives infinite weights of one sign, not 0 * inf), and at (row 8,
    group 0), codes as they are."""
    group = group_of(fmt)
    cols = slice(group, 2 * group) if fmt.in_features > group else slice(0, group)
    g = 1 if fmt.in_features > group else 0
    if isinstance(fmt, TernaryFormat):
        trits = fmt.trits()
        trits[3, cols] = 1
        scales = fmt.scales.clone()
        scales[3, g], scales[8, 0] = value, value
        return TernaryFormat(fmt.shape, fmt.group_size, pack_trits(trits), scales)
    if isinstance(fmt, CodebookFormat):  # the top level: a positive weight (these tables have no zero level)
        codes = fmt.codes()
        codes[3, cols] = 2**fmt.bits - 1
        scales = fmt.scales.clone()
        scales[3, g], scales[8, 0] = value, value
        return CodebookFormat.from_codes(codes, scales.float(), fmt.table, fmt.bits, fmt.group_size, fmt.table_kind)
    codes = fmt.codes()
    scale, zero = fmt.scale_zero()
    z = int(zero[3, g])
    codes[3, cols] = z - 1 if z + 1 >= 2**fmt.bits else z + 1
    scale[3, g], scale[8, 0] = value, value
    return IntFormat.from_codes(codes, scale, zero, fmt.bits, fmt.group_size, fmt.symmetric)


def activations_for_scales(fmt: Format) -> torch.Tensor:
    """Row 0 positive everywhere (infinite weights of one sign give an infinity), row 1 zero everywhere
    (inf * 0 is NaN), rows 2 and 3 random."""
    torch.manual_seed(2)
    x = torch.randn(4, IN)
    x[0] = x[0].abs() + 0.1
    x[1] = 0.0
    return x


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_nonfinite_scales_propagate_as_in_the_reference(name, value, isa_lib):
    fmt = with_nonfinite_scales(FORMATS[name](outlier_weight(4, OUT, IN)), NONFINITE[value])
    layout = lowbit.layout_of(fmt)
    assert not layout.scales_finite
    x = activations_for_scales(fmt)
    reference = fmt.matmul(x)
    if value != "nan":
        assert torch.isinf(reference[0, 3]) and torch.isnan(reference[1, 3])
    assert_same_nonfinite(lowbit.lowbit_matmul(layout, x, isa_lib), reference)
    # activations with non-finite values too: both reasons to recompute an output at once
    x2 = with_nonfinite_activations(-NONFINITE[value], fmt)
    assert_same_nonfinite(lowbit.lowbit_matmul(layout, x2, isa_lib), fmt.matmul(x2))
    # the bf16 decode (large batches) keeps them too: the same NaNs, every other value bit for bit
    # (NaN payloads differ between torch's own conversions)
    decoded, expected = lowbit.decode_bf16(layout, isa_lib), fmt.decode().bfloat16()
    assert torch.equal(decoded.isnan(), expected.isnan())
    assert torch.equal(decoded.nan_to_num(0.0).view(torch.int16), expected.nan_to_num(0.0).view(torch.int16))


@pytest.mark.parametrize("value", sorted(NONFINITE))
@pytest.mark.parametrize("name", ["int4-g32", "int3-g100", "int8-ch", "ternary-g64", "codebook4-g32-iq4nl"])
def test_nonfinite_values_propagate_with_many_activation_rows(name, value, isa_lib):
    """40 rows: the AVX2 path's kernel on rearranged pairs of tiles (16 rows and more)."""
    fmt = with_nonfinite_scales(FORMATS[name](outlier_weight(4, OUT, IN)), NONFINITE[value])
    torch.manual_seed(3)
    x = torch.randn(40, IN)
    x[:4] = activations_for_scales(fmt)
    x[4:10] = with_nonfinite_activations(-NONFINITE[value], fmt)
    assert_same_nonfinite(lowbit.lowbit_matmul(lowbit.layout_of(fmt), x, isa_lib), fmt.matmul(x))


@pytest.mark.parametrize("value", sorted(NONFINITE))
def test_nonfinite_zero_points_take_the_formats_own_matmul(value):
    fmt = IntFormat.encode(outlier_weight(5, OUT, IN), bits=4, group_size=64)
    zeros = fmt.zeros.clone()
    zeros[3, 1] = NONFINITE[value]
    fmt = IntFormat(fmt.shape, 4, 64, False, fmt.packed, fmt.scales, zeros)
    x = activations_for_scales(fmt)
    assert lowbit.layout_of(fmt) is None  # an int16 zero point cannot hold it
    y = kernels.matmul(fmt, x)
    assert not torch.isfinite(y[:, 3]).any()
    assert_same_nonfinite(y, fmt.matmul(x))


@pytest.mark.parametrize("value", sorted(NONFINITE))
def test_large_batches_on_the_bf16_matmul_propagate_too(value, monkeypatch):
    if build.compiler() is None:
        pytest.skip("no C++ compiler here: the formats' own matmul runs")
    monkeypatch.setattr(lowbit, "bf16_matmul_is_fast", lambda: True)
    fmt = with_nonfinite_scales(IntFormat.encode(outlier_weight(6, OUT, IN), bits=4, group_size=64), NONFINITE[value])
    x = torch.randn(lowbit.LARGE_BATCH, IN)
    x[:4] = activations_for_scales(fmt)
    x[4:10] = with_nonfinite_activations(NONFINITE[value], fmt)
    assert_same_nonfinite(kernels.matmul(fmt, x), fmt.matmul(x))
