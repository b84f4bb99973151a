"""The Triton kernels (matpress.kernels.triton_lowbit) against decode-then-matmul.

On a CUDA machine they run compiled on the GPU; elsewhere on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest.py), which executes the same kernel code with NumPy: that checks the unpacking,
the scales and zero points, the masking of odd shapes and both accumulation variants, not GPU speed.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from format_checks import assert_within_kernel_bound, outlier_weight
from matpress import kernels
from matpress.errors import FormatError
from matpress.formats import IntFormat, TernaryFormat
from matpress.kernels import gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd shapes: 37 outputs is not a multiple of the 16-row tiles, 300 columns not a multiple of the groups.
OUT, IN = 37, 300
# 1 and 5 rows take the fp32 (decode) variant, 20 rows the tl.dot variant.
BATCHES = [1, 5, 20]
# Unit roundoff of the dtype tl.dot rounds its inputs to; fp32 runs as full fp32 (allow_tf32 is off).
ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.fixture(scope="module")
def triton_lowbit():
    """The kernel module: compiled for the GPU, or run by Triton's interpreter (set up in conftest.py)."""
    pytest.importorskip("triton")
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 tl.dot in full fp32, as the bounds assume
    yield importlib.import_module("matpress.kernels.triton_lowbit")
    torch.backends.cuda.matmul.allow_tf32 = before


def weight(seed: int) -> torch.Tensor:
    return outlier_weight(seed, OUT, IN)


def on_device(fmt):
    return fmt.to(DEVICE)


def assert_within_bound(y: torch.Tensor, fmt, x: torch.Tensor, uses_dot: bool) -> None:
    """``|y - x @ W.T|`` within the rounding the kernel may do, derived per output element:

    - the tl.dot variant rounds ``W`` (fp32 values of ``(q - z) * s``) to the activations' dtype,
      a relative ``u`` plus half the smallest fp16 subnormal; the fp32 variant uses ``W`` exactly;
    - fp32 sums of ``IN`` products add at most ``(IN + 2) * 2**-24`` of ``sum |x| |W|``;
    - the result is rounded once to ``x``'s dtype (relative ``u`` of that dtype).

    The tl.dot variant's bf16 weight rounding is checked on GPUs only (see the skip below).
    """
    w = fmt.decode().double()
    xd = x.double().reshape(-1, IN).cpu()
    exact = xd @ w.T
    size = xd.abs() @ w.abs().T
    u_in = ROUNDOFF[x.dtype] if uses_dot else 0.0
    subnormal = 2.0**-25 if uses_dot and x.dtype == torch.float16 else 0.0
    before_output = size * (u_in + (IN + 2) * 2.0**-24) + xd.abs().sum(dim=1, keepdim=True) * subnormal
    # Triton's interpreter truncates fp32 to bf16 (an error up to one unit, 2**-7); GPUs round to nearest
    u_out = 2.0**-7 if x.dtype == torch.bfloat16 and DEVICE == "cpu" else ROUNDOFF[x.dtype]
    bound = before_output + (exact.abs() + before_output) * u_out
    err = (y.double().cpu().reshape(exact.shape) - exact).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [None, 64, 100])
@pytest.mark.parametrize("batch", BATCHES)
def test_int_kernel_matches_decode_then_matmul(bits, group_size, batch, triton_lowbit):
    # group 100 is not a multiple of the codes in a unit (8 for 3/5/6/7 bits): scales per column
    fmt = on_device(IntFormat.encode(weight(bits), bits=bits, group_size=group_size))
    torch.manual_seed(batch)
    x = torch.randn(batch, IN, device=DEVICE)
    y = triton_lowbit.packed_matmul(fmt, x)
    assert y.shape == (batch, OUT) and y.dtype == torch.float32 and y.device == x.device
    assert_within_bound(y, fmt, x, batch >= triton_lowbit.DOT_ROWS)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("batch", [1, 20])
def test_symmetric_int_uses_the_fixed_zero_point(bits, batch, triton_lowbit):
    fmt = on_device(IntFormat.encode(weight(bits + 20), bits=bits, group_size=64, symmetric=True))
    assert fmt.zeros is None
    x = torch.randn(batch, IN, device=DEVICE)
    assert_within_bound(triton_lowbit.packed_matmul(fmt, x), fmt, x, batch >= triton_lowbit.DOT_ROWS)


@pytest.mark.parametrize("group_size", [None, 64, 37])
@pytest.mark.parametrize("batch", BATCHES)
def test_ternary_kernel_matches_decode_then_matmul(group_size, batch, triton_lowbit):
    fmt = on_device(TernaryFormat.encode(weight(0), group_size=group_size))
    x = torch.randn(batch, IN, device=DEVICE)
    assert_within_bound(triton_lowbit.packed_matmul(fmt, x), fmt, x, batch >= triton_lowbit.DOT_ROWS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [3, 20])
def test_half_precision_activations(dtype, batch, triton_lowbit):
    if dtype == torch.bfloat16 and batch >= triton_lowbit.DOT_ROWS and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (NumPy has no bf16); runs on a GPU")
    fmt = on_device(IntFormat.encode(weight(3), bits=4, group_size=128))
    x = torch.randn(2, batch // 2 + 1, IN, device=DEVICE).to(dtype)  # 3-D input, rows = 2 * (batch//2+1)
    y = triton_lowbit.packed_matmul(fmt, x)
    assert y.shape == (*x.shape[:-1], OUT) and y.dtype == dtype
    assert_within_bound(y, fmt, x, x.shape[0] * x.shape[1] >= triton_lowbit.DOT_ROWS)


# The variants the launcher picks, compiled ahead of time for real GPUs (Hopper sm_90, Ampere sm_80)
# with the ptxas that ships in the triton wheel: catches what the interpreter lets through (types, shapes
# of tl.dot, constexpr use) without a GPU. Run in a fresh interpreter: this session's kernels are the
# interpreted ones (conftest.py).
COMPILE_CHECK = textwrap.dedent("""
    import warnings
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from matpress.formats import IntFormat, TernaryFormat
    from matpress.kernels import triton_lowbit as T

    POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    w = torch.randn(37, 300)
    formats = [IntFormat.encode(w, bits=b, group_size=g, symmetric=sym) for b, g, sym in
               [(4, 128, False), (3, 100, False), (2, 64, True), (8, None, False), (6, 64, False)]]
    formats += [TernaryFormat.encode(w, group_size=64), TernaryFormat.encode(w)]
    whole = IntFormat.encode(torch.randn(64, 512), bits=4, group_size=128)  # whole steps: vector loads
    cases = [(f, rows, dtype, False) for f in formats + [whole] for rows, dtype in
             [(1, torch.float16), (5, torch.float32), (64, torch.bfloat16)]]
    cases += [(formats[0], 12, torch.float16, False), (formats[0], 16, torch.float16, False),
              (formats[0], 20, torch.float32, False), (formats[0], 20, torch.float32, True)]
    # sm_80 differs from sm_90 in how tl.dot lowers (mma against wgmma): the tl.dot cases only
    targets = [(90, case) for case in cases] + [(80, case) for case in cases if case[1] >= T.DOT_ROWS]
    for arch, (fmt, rows, dtype, tf32) in targets:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        _, constants = T.launch_plan(fmt, rows, dtype)
        signature = {"x_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "packed_ptr": "*u8",
                     "scales_ptr": "*fp16", "zeros_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32",
                     "row_bytes": "i32", "n_groups": "i32", **{k: "constexpr" for k in constants}}
        kernel = compile(ASTSource(T._packed_matmul, signature, constants),
                         target=GPUTarget("cuda", arch, 32), options=T.COMPILE_OPTIONS)
        assert len(kernel.asm["cubin"]) > 1000, (arch, fmt, rows, dtype)
    print("compiled", len(targets))
""")


def test_every_variant_compiles_for_real_gpus(tmp_path, triton_lowbit):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier cache
    run = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["compiled", "39"]  # 28 cases for sm_90, the 11 tl.dot ones for sm_80


def test_the_plans_cover_every_way_of_reading_scales(triton_lowbit):
    T = triton_lowbit
    plans = {
        "int4 g128, 512 columns": (IntFormat.encode(torch.randn(8, 512), bits=4, group_size=128), T.PER_STEP, True),
        "int4 g100": (IntFormat.encode(weight(1), bits=4, group_size=100), T.PER_UNIT, False),
        "int3 g100": (IntFormat.encode(weight(1), bits=3, group_size=100), T.PER_COLUMN, False),
    }
    for name, (fmt, scales_at, even) in plans.items():
        for rows in (1, 20):
            _, constants = T.launch_plan(fmt, rows, torch.float32)
            assert (constants["SCALES_AT"], constants["EVEN_UNITS"]) == (scales_at, even), (name, rows)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [128, None])
@pytest.mark.parametrize("batch", [1, 12, 20])
def test_whole_steps_read_one_scale_per_step(bits, group_size, batch, triton_lowbit):
    # 512 columns: every loop step is whole (unmasked loads) and lies in one group
    torch.manual_seed(bits)
    fmt = on_device(IntFormat.encode(torch.randn(24, 512), bits=bits, group_size=group_size))
    x = torch.randn(batch, 512, device=DEVICE)
    y = triton_lowbit.packed_matmul(fmt, x)
    w = fmt.decode().double()
    exact = x.double().cpu() @ w.T
    bound = (x.double().abs().cpu() @ w.abs().T) * (514 * 2.0**-24)
    assert bool(((y.double().cpu() - exact).abs() <= bound).all())


def test_empty_batch(triton_lowbit):
    fmt = on_device(IntFormat.encode(weight(4), bits=4, group_size=64))
    assert triton_lowbit.packed_matmul(fmt, torch.zeros(0, IN, device=DEVICE)).shape == (0, OUT)


def test_the_gpu_path_declines_cpu_inputs_and_gradients():
    fmt = IntFormat.encode(weight(5), bits=4, group_size=64)
    assert not gpu.takes(fmt, torch.randn(2, IN))
    assert gpu.triton_kernel(fmt, torch.randn(2, IN)) is None
    if DEVICE == "cuda":
        on_gpu = fmt.to("cuda")
        assert gpu.takes(on_gpu, torch.randn(2, IN, device="cuda"))
        assert not gpu.takes(on_gpu, torch.randn(2, IN, device="cuda", requires_grad=True))
        assert not gpu.takes(fmt, torch.randn(2, IN, device="cuda"))  # weights left on the CPU


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_compressed_layers_on_the_gpu_take_the_triton_kernel(monkeypatch, triton_lowbit):
    fmt = IntFormat.encode(weight(6), bits=4, group_size=64).to("cuda")
    calls = []
    real = triton_lowbit.packed_matmul
    monkeypatch.setattr(triton_lowbit, "packed_matmul", lambda f, x: calls.append(1) or real(f, x))
    x = torch.randn(4, IN, device="cuda")
    y = kernels.matmul(fmt, x)
    assert calls == [1]
    assert_within_bound(y, fmt, x, False)


def test_without_triton_the_gpu_path_warns_once_and_declines(monkeypatch):
    gpu.triton_kernels.cache_clear()
    # as on a machine without triton: the import of the kernel module fails
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "matpress.kernels.triton_lowbit", None)
    monkeypatch.delattr(kernels, "triton_lowbit", raising=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert gpu.triton_kernels() is None
            assert gpu.triton_kernels() is None
        assert len(caught) == 1 and "pip install triton" in str(caught[0].message)
    finally:
        gpu.triton_kernels.cache_clear()


def test_wrong_input_width_is_refused_before_any_kernel():
    fmt = IntFormat.encode(weight(7), bits=4, group_size=64)
    # 2 x 150 has as many elements as one 300-wide row: a reshape would silently accept it
    with pytest.raises(FormatError, match="takes 300 features"):
        kernels.matmul(fmt, torch.randn(2, 150))


def test_a_kernel_that_fails_to_compile_or_launch_falls_back_after_one_warning(monkeypatch, triton_lowbit):
    fmt = IntFormat.encode(weight(8), bits=4, group_size=64)
    calls = []

    def broken(f, x):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(gpu, "takes", lambda f, x: True)  # as for a CUDA input
    monkeypatch.setattr(triton_lowbit, "packed_matmul", broken)
    monkeypatch.setattr(gpu, "_failure", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert gpu.triton_kernel(fmt, torch.randn(2, IN)) is None
        assert gpu.triton_kernel(fmt, torch.randn(2, IN)) is None  # off from now on: not tried again
    assert calls == [1]
    assert len(caught) == 1 and "Failed to find C compiler" in str(caught[0].message)
    x = torch.randn(2, IN)  # the CPU path is unaffected
    assert_within_kernel_bound(kernels.matmul(fmt, x), fmt, x, 64)


def test_the_gpu_benchmark_runs_under_the_interpreter(tmp_path, triton_lowbit):
    # benchmarks/kernels_gpu.py has not met a GPU yet: keep it working until one runs it
    script = Path(__file__).parents[1] / "benchmarks" / "kernels_gpu.py"
    out = tmp_path / "kernels_gpu.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--device", "cpu", "--shapes", "40x300",
         "--batches", "1,2", "--repeats", "1", "--pool-gb", "0"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 40x300")]
    assert [r[1].strip() for r in rows] == [
        "dense fp16", "dense bf16", "matpress int8 g128", "matpress int4 g128", "matpress int3 g128",
        "matpress int2 g128", "matpress ternary g128",
    ]
    # fp16 output rounding (2**-11 of the largest output) and fp32 sums: far below 1e-3
    assert all(float(r[-1]) < 1e-3 for r in rows[2:])
