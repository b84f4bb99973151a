"""The compiled low-bit CPU kernels (matpress.kernels.lowbit) against decode-then-matmul."""

from __future__ import annotations

import dataclasses
import platform

import pytest
import torch
from torch import nn

import matpress
from format_checks import assert_within_kernel_bound, kernel_error_bound, kernel_library, outlier_weight
from matpress import kernels
from matpress.errors import MatpressError
from format_checks import run_method
from matpress.formats import CodebookFormat, IntFormat, TernaryFormat
from matpress.kernels import build, lowbit
from matpress.nn.layers import CompressedLinear

# Odd shapes: 37 rows is not a multiple of the 4-row tile, 300 columns not a multiple of the groups.
OUT, IN = 37, 300
# 15 activation rows run through the 4-, 2- and 1-row variants of the tile kernel; 37 through the kernel
# on rearranged groups of tiles (16 rows and more: AVX-512 in runs of 8 and 1, AVX2 in runs of 4 and 1).
BATCHES = [1, 15, 37]

@pytest.fixture(scope="module")
def native():
    """The kernels built for this machine (compiled once, then cached)."""
    if build.compiler() is None:
        pytest.skip("no C++ compiler here: the formats' own matmul runs (tested by the format tests)")
    return build.load_library()


def weight(seed: int) -> torch.Tensor:
    return outlier_weight(seed, OUT, IN)


def test_native_build_uses_the_widest_path_the_cpu_has(native):
    flags = set(build.cpu_flags().split())
    expected = 1 if {"avx512f", "avx512bw", "avx512_vnni"} <= flags else 2 if {"avx2", "fma", "f16c"} <= flags else 0
    assert native.isa() == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 64, 128, 100, 32, 16])
@pytest.mark.parametrize("batch", BATCHES)
def test_int_kernel_matches_decode_then_matmul(bits, symmetric, group_size, batch, native):
    fmt = IntFormat.encode(weight(bits), bits=bits, group_size=group_size, symmetric=symmetric)
    torch.manual_seed(batch)
    x = torch.randn(batch, IN)
    x[:, 7] = 6.0  # one large activation: its block gets a coarse int8 step
    y = kernels.matmul(fmt, x)
    assert isinstance(fmt.__dict__.get(lowbit.LAYOUT_ATTR), lowbit.LowbitLayout)  # the fast path ran
    assert y.shape == (batch, OUT) and y.dtype == torch.float32
    assert_within_kernel_bound(y, fmt, x, fmt.group)


@pytest.mark.parametrize("bits", [1, 5, 7])
def test_other_widths_run_in_the_next_wider_layout(bits, native):
    fmt = IntFormat.encode(weight(bits), bits=bits, group_size=64)
    x = torch.randn(3, IN)
    assert_within_kernel_bound(kernels.matmul(fmt, x), fmt, x, 64)
    assert lowbit.layout_of(fmt).bits == {1: 2, 5: 8, 7: 8}[bits]


@pytest.mark.parametrize("group_size", [None, 64, 100, 32])
@pytest.mark.parametrize("batch", BATCHES)
def test_ternary_kernel_matches_decode_then_matmul(group_size, batch, native):
    fmt = TernaryFormat.encode(weight(0), group_size=group_size)
    x = torch.randn(batch, IN)
    y = kernels.matmul(fmt, x)
    assert lowbit.layout_of(fmt).bits == 2
    assert_within_kernel_bound(y, fmt, x, fmt.group_size)


def codebooks(seed: int) -> list[CodebookFormat]:
    """Codebooks of every width and table kind: fixed tables, a learned one per layer and one per row."""
    w = weight(seed)
    return [
        CodebookFormat.encode(w, bits=4, group_size=32, table="iq4nl"),
        CodebookFormat.encode(w, bits=4, group_size=64, table="nl"),
        CodebookFormat.encode(w, bits=3, group_size=100, table="nf"),
        CodebookFormat.encode(w, bits=2, group_size=None, table="nl"),
        CodebookFormat.encode(w, bits=3, group_size=16, table="nl"),
        run_method("codebook", w, None, bits=3, group_size=32, table="layer", iterations=2),
        run_method("codebook", w, None, bits=4, group_size=64, table="row", iterations=2),
    ]


CODEBOOK_IDS = ["4b-g32-iq4nl", "4b-g64-nl", "3b-g100-nf", "2b-ch-nl", "3b-g16-nl", "3b-g32-layer", "4b-g64-row"]


@pytest.mark.parametrize("index", range(len(CODEBOOK_IDS)), ids=CODEBOOK_IDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_codebook_kernel_looks_codes_up_within_the_int_kernels_bound(index, batch, native):
    fmt = codebooks(index)[index]
    torch.manual_seed(batch)
    x = torch.randn(batch, IN)
    x[:, 7] = 6.0
    y = kernels.matmul(fmt, x)
    layout = fmt.__dict__.get(lowbit.LAYOUT_ATTR)
    assert isinstance(layout, lowbit.LowbitLayout) and layout.levels is not None  # the lookup path ran
    assert layout.levels.shape[0] == (layout.codes.shape[0] if fmt.table_kind == "row" else 1)
    # the levels are integers, so the lookup is exact: the int kernel's bound (activation rounding only)
    assert_within_kernel_bound(y, fmt, x, fmt.group)
    assert torch.equal(lowbit.decode_bf16(layout), fmt.decode().bfloat16())


def test_a_codebook_with_fractional_levels_takes_its_own_matmul(native):
    # files from before tables held integer levels: no lookup layout, the dense path instead
    fmt = CodebookFormat.encode(weight(13), bits=4, group_size=32)
    old = CodebookFormat(fmt.shape, 4, 32, "nl", fmt.packed, fmt.scales, fmt.table / 127)
    x = torch.randn(3, IN)
    assert lowbit.layout_of(old) is None
    assert torch.equal(kernels.matmul(old, x), old.matmul(x))


def test_codebooks_stack_with_each_other_and_with_int_layouts(native):
    w = weight(14)
    nl = [CodebookFormat.encode(w[:8], bits=4, group_size=64, table="nl"), CodebookFormat.encode(w[8:37], bits=4, group_size=64, table="nl")]
    shared = lowbit.stacked_layout(nl)
    assert shared.levels.shape[0] == 1  # one table for both
    row = run_method("codebook", w[:12], None, bits=4, group_size=64, table="row", iterations=1)
    uniform = IntFormat.encode(w[12:24], bits=4, group_size=64)
    mixed = lowbit.stacked_layout([row, uniform, nl[1]])
    assert mixed.levels.shape[0] == mixed.codes.shape[0]  # per tile: row tables, identity, the nl table
    x = torch.randn(5, IN)
    assert torch.equal(lowbit.layout_matmul(shared, x), torch.cat([kernels.matmul(f, x) for f in nl], dim=-1))
    assert torch.equal(
        lowbit.layout_matmul(mixed, x), torch.cat([kernels.matmul(f, x) for f in (row, uniform, nl[1])], dim=-1)
    )


def test_per_channel_rows_longer_than_a_block(native):
    # 700 columns in one group: the kernel splits the row into blocks of at most 256 columns.
    torch.manual_seed(0)
    fmt = IntFormat.encode(torch.randn(9, 700), bits=4, group_size=None)
    x = torch.randn(2, 700)
    assert lowbit.layout_of(fmt).geometry.sub == 3
    assert_within_kernel_bound(kernels.matmul(fmt, x), fmt, x, 700)


def test_bf16_and_batched_3d_activations(native):
    fmt = IntFormat.encode(weight(1), bits=4, group_size=128)
    x = torch.randn(2, 3, IN).bfloat16()
    y = kernels.matmul(fmt, x)
    assert y.shape == (2, 3, OUT) and y.dtype == torch.bfloat16
    exact = kernels.matmul(fmt, x.float())
    # the bf16 result is the fp32 one rounded to 8 significant bits
    assert bool(((y.float() - exact).abs() <= exact.abs() * 2.0**-8).all())
    assert_within_kernel_bound(exact, fmt, x.float(), 128)


@pytest.mark.parametrize("fmt", [
    IntFormat.encode(weight(8), bits=3, group_size=100),
    IntFormat.encode(weight(9), bits=8, group_size=None),
    TernaryFormat.encode(weight(10), group_size=64),
], ids=["int3-g100", "int8-ch", "ternary-g64"])
def test_bf16_decode_is_exact(fmt, native):
    assert torch.equal(lowbit.decode_bf16(lowbit.layout_of(fmt)), fmt.decode().bfloat16())


def test_the_bf16_path_is_taken_from_its_row_count_on(monkeypatch, native):
    """AMX: from LARGE_BATCH rows on; AVX-512 BF16 alone: from BF16_DOT_BATCH rows on; neither: never."""
    layout = lowbit.layout_of(IntFormat.encode(weight(12), bits=4, group_size=64))
    counts = (lowbit.LARGE_BATCH - 1, lowbit.LARGE_BATCH, lowbit.BF16_DOT_BATCH - 1, lowbit.BF16_DOT_BATCH)
    for amx, avx512_bf16, taken in [
        (True, False, (False, True, True, True)), (False, True, (False, False, False, True)), (False, False, (False,) * 4)
    ]:
        monkeypatch.setattr(lowbit, "bf16_matmul_is_fast", lambda amx=amx: amx)
        monkeypatch.setattr(lowbit, "bf16_dot_is_fast", lambda bf16=avx512_bf16: bf16)
        assert tuple(lowbit.takes_bf16_path(layout, torch.empty(n, IN)) for n in counts) == taken


def test_large_batches_take_the_bf16_matmul(monkeypatch, native):
    fmt = IntFormat.encode(weight(11), bits=4, group_size=128)
    x = torch.randn(lowbit.LARGE_BATCH + 3, IN)
    calls = []
    monkeypatch.setattr(lowbit, "lowbit_matmul", lambda layout, x, lib=None: calls.append(1))
    monkeypatch.setattr(lowbit, "bf16_matmul_is_fast", lambda: True)
    y = kernels.matmul(fmt, x)
    assert not calls and y.dtype == torch.float32
    # bf16 rounding (unit 2^-8) of x, of W and of the result, fp32 sums of IN products
    w = fmt.decode().double()
    size = x.abs().double() @ w.abs().T
    u = 2.0**-8
    bound = size * ((1 + u) ** 3 - 1 + (IN + 8) * torch.finfo(torch.float32).eps)
    assert bool(((y.double() - x.double() @ w.T).abs() <= bound).all())


@pytest.mark.parametrize("batch", BATCHES)
def test_stacked_layouts_give_each_layers_outputs_bit_for_bit(batch, native):
    # three int formats of one input (the last with a partial tile) and a ternary one, as one call
    fmts = [IntFormat.encode(weight(20 + i)[:rows], bits=3, group_size=64) for i, rows in enumerate((8, 12, 37))]
    x = torch.randn(batch, IN)
    stacked = lowbit.stacked_layout(fmts)
    assert stacked.out_features == 8 + 12 + 37 and not any(lowbit.LAYOUT_ATTR in f.__dict__ for f in fmts)
    assert torch.equal(lowbit.layout_matmul(stacked, x), torch.cat([kernels.matmul(f, x) for f in fmts], dim=-1))
    ternary = TernaryFormat.encode(weight(0)[:8], group_size=64)
    assert torch.equal(
        lowbit.layout_matmul(lowbit.stacked_layout([ternary, ternary]), x), kernels.matmul(ternary, x).repeat(1, 2)
    )


def test_layouts_that_do_not_stack(native):
    four = IntFormat.encode(weight(21)[:8], bits=4, group_size=64)
    assert lowbit.stacked_layout([IntFormat.encode(weight(22)[:8], bits=2, group_size=64), four]) is None  # widths
    assert lowbit.stacked_layout([IntFormat.encode(weight(23)[:8], bits=4, group_size=128), four]) is None  # groups
    assert lowbit.stacked_layout([IntFormat.encode(weight(24)[:6], bits=4, group_size=64), four]) is None  # part tile
    fractional = IntFormat(four.shape, 4, 64, False, four.packed, four.scales, four.zeros + 0.5)
    assert lowbit.stacked_layout([four, fractional]) is None  # no layout


def test_fractional_zero_points_take_the_formats_own_matmul(native):
    # HQQ-style zero points that are not integers: the layout's int16 zeros cannot hold them
    fmt = IntFormat.encode(weight(12), bits=4, group_size=64)
    fmt = IntFormat(fmt.shape, 4, 64, False, fmt.packed, fmt.scales, fmt.zeros + 0.5)
    x = torch.randn(3, IN)
    assert lowbit.layout_of(fmt) is None
    assert torch.equal(kernels.matmul(fmt, x), fmt.matmul(x))


def test_fallback_equals_fast_path(native):
    fmt = IntFormat.encode(weight(2), bits=3, group_size=64)
    x = torch.randn(4, IN)
    fast = kernels.matmul(fmt, x)
    with build.switched_off():
        slow = kernels.matmul(fmt, x)
    assert torch.equal(kernels.matmul(fmt, x), fast)  # on again after the block
    assert torch.equal(slow, fmt.matmul(x))
    assert_within_kernel_bound(fast, fmt, x, 64)
    assert_within_kernel_bound(slow, fmt, x, 64)


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setenv("MATPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    fmt = IntFormat.encode(weight(3), bits=4, group_size=128)
    x = torch.randn(2, IN)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        y = kernels.matmul(fmt, x)
    assert torch.equal(y, fmt.matmul(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(kernels.matmul(fmt, x), y)  # no second warning


def test_autograd_inputs_take_the_differentiable_path(native):
    fmt = IntFormat.encode(weight(4), bits=4, group_size=128)
    x = torch.randn(2, IN, requires_grad=True)
    kernels.matmul(fmt, x).sum().backward()
    assert torch.allclose(x.grad, fmt.decode().sum(dim=0).expand(2, IN))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 build flags")
@pytest.mark.parametrize("march, isa", [("x86-64-v2", 0), ("x86-64-v3", 2)], ids=["portable", "avx2"])
def test_other_paths_equal_the_native_one(march, isa, native):
    other = kernel_library(march)
    assert other.isa() == isa
    torch.manual_seed(5)
    for fmt in (
        IntFormat.encode(weight(5), bits=3, group_size=100),
        IntFormat.encode(weight(6), bits=8, group_size=None, symmetric=True),
        IntFormat.encode(weight(7), bits=4, group_size=64),
        TernaryFormat.encode(weight(7), group_size=64),
        # blocks of 32 and 16 columns: two blocks to a chunk, 300 columns an odd number of 16-column blocks
        *(IntFormat.encode(weight(9), bits=b, group_size=g) for b in (2, 3, 4, 8) for g in (32, 16)),
        *codebooks(10),  # the lookup path: every width, shared and per-row tables
    ):
        layout = lowbit.layout_of(fmt)
        group = fmt.group_size if isinstance(fmt, TernaryFormat) else fmt.group
        for batch in (1, 7, 37):
            x = torch.randn(batch, IN)
            a, b = lowbit.lowbit_matmul(layout, x, other), lowbit.lowbit_matmul(layout, x, native)
            assert_within_kernel_bound(a, fmt, x, group)
            # Same int8 activations and integer block sums; the paths differ only in fp32 roundings: at
            # most n_blocks + 3 of each, relative to sum |W| max|x_group| (the bound times 254 / (1 + ...)).
            fp32 = 2 * (layout.geometry.n_blocks + 3) * torch.finfo(torch.float32).eps
            assert bool(((a - b).abs() <= kernel_error_bound(fmt.decode(), x, group) * 254 * fp32).all())
        assert torch.equal(lowbit.decode_bf16(layout, other), lowbit.decode_bf16(layout, native))


def forget_kernel_settings() -> None:
    """The kernel settings read from the environment anew at the next call."""
    for cached in (build.chosen_isa, build.chosen_flags, build.disabled_by_environment,
                   lowbit.bf16_matmul_is_fast, lowbit.bf16_dot_is_fast):
        cached.cache_clear()


@pytest.fixture
def settings_read_again():
    """The kernel settings read anew for the test, and again after it (monkeypatch, set up first,
    restores the environment after this fixture's teardown)."""
    forget_kernel_settings()
    yield
    forget_kernel_settings()


def test_the_kernels_off_variable_is_read_at_the_first_call(monkeypatch, settings_read_again, native):
    fmt = IntFormat.encode(weight(2), bits=3, group_size=64)
    x = torch.randn(4, IN)
    monkeypatch.setenv("MATPRESS_KERNELS", "0")
    assert torch.equal(kernels.matmul(fmt, x), fmt.matmul(x)) and build.disabled()
    monkeypatch.setenv("MATPRESS_KERNELS", "1")  # read once: the process keeps what it read
    assert build.disabled()
    assert "no compiled kernels" in build.kernel_path()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 build flags")
def test_the_isa_variable_builds_the_kernels_as_another_cpu_runs_them(monkeypatch, settings_read_again, native):
    monkeypatch.setenv(build.ISA_VARIABLE, "avx2")
    assert build.load_library().isa() == 2 and "AVX2" in build.kernel_path()
    # no bf16 path either: an AVX2 CPU has neither AMX nor AVX-512 BF16
    assert not lowbit.bf16_matmul_is_fast() and not lowbit.bf16_dot_is_fast()
    fmt = IntFormat.encode(weight(8), bits=4, group_size=64)
    x = torch.randn(3, IN)
    y = kernels.matmul(fmt, x)
    assert_within_kernel_bound(y, fmt, x, 64)
    forget_kernel_settings()
    monkeypatch.setenv(build.ISA_VARIABLE, "avx9")
    with pytest.raises(MatpressError, match="MATPRESS_KERNEL_ISA is 'avx9'; set it to one of native, avx2, portable"):
        kernels.matmul(fmt, x)


def test_compressed_linear_uses_the_kernel_and_survives_save_load(tmp_path, native, monkeypatch):
    assert lowbit.lowbit_kernel in kernels.KERNELS[IntFormat]
    assert lowbit.lowbit_kernel in kernels.KERNELS[TernaryFormat]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 24))
    x = torch.randn(3, IN)
    model[0] = CompressedLinear(IntFormat.encode(model[0].weight.data, bits=4, group_size=128), model[0].bias.data)
    model[2] = CompressedLinear(TernaryFormat.encode(model[2].weight.data, group_size=None), model[2].bias.data)
    calls = []
    real = lowbit.lowbit_matmul
    monkeypatch.setattr(lowbit, "lowbit_matmul", lambda layout, x, lib=None: calls.append(layout) or real(layout, x, lib))
    with torch.no_grad():
        y = model(x)
    assert len(calls) == 2
    directory = matpress.save(model, tmp_path / "ckpt")
    loaded = matpress.load(directory, model=nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), nn.Linear(OUT, 24)))
    assert lowbit.LAYOUT_ATTR not in loaded[0].fmt.__dict__  # the layout is rebuilt, never stored
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert len(calls) == 4


def test_a_shared_zero_point_is_stored_once_and_multiplies_as_per_block_zeros(native):
    """Symmetric grids keep one zero point for every row and block (16 copies, one quad's load); the
    kernels give exactly what the same layout with the zero repeated per block gives."""
    fmt = IntFormat.encode(weight(21), bits=4, group_size=32, symmetric=True)
    layout = lowbit.layout_of(fmt)
    assert layout.zeros.numel() == 16 and bool((layout.zeros == 8).all())
    expanded = dataclasses.replace(layout, zeros=lowbit.block_zeros(layout))
    assert expanded.zeros.shape == layout.scales.shape
    for rows in (1, 5, 37):  # the tile kernel and, from 16 rows on, the rearranged path
        x = torch.randn(rows, IN)
        assert torch.equal(lowbit.lowbit_matmul(layout, x), lowbit.lowbit_matmul(expanded, x))
    assert torch.equal(lowbit.decode_bf16(layout), lowbit.decode_bf16(expanded))
    # stacked with a layout of per-block zeros, the shared one is expanded; with itself it stays shared
    whole = lowbit.layout_of(IntFormat.encode(outlier_weight(22, 40, IN), bits=4, group_size=32, symmetric=True))
    other = lowbit.layout_of(IntFormat.encode(outlier_weight(23, 40, IN), bits=4, group_size=32))
    assert lowbit.stack_layouts([whole, whole]).zeros.numel() == 16
    mixed = lowbit.stack_layouts([whole, other])
    assert mixed.zeros.shape == mixed.scales.shape
    x = torch.randn(3, IN)
    assert torch.equal(lowbit.lowbit_matmul(mixed, x)[:, :40], lowbit.lowbit_matmul(whole, x))


def test_zeros_that_are_neither_per_block_nor_one_shared_value_are_refused(native):
    layout = lowbit.layout_of(IntFormat.encode(weight(23), bits=4, group_size=32, symmetric=True))
    uneven = dataclasses.replace(layout, zeros=torch.arange(16, dtype=torch.int16).view(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="a shared zero point must be 16 copies of one value"):
        lowbit.lowbit_matmul(uneven, torch.randn(2, IN))
    short = dataclasses.replace(layout, zeros=torch.zeros(8, dtype=torch.int16))
    with pytest.raises(RuntimeError, match="16 copies of one shared zero point"):
        lowbit.lowbit_matmul(short, torch.randn(2, IN))
