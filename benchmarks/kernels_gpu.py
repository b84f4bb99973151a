"""Packed low-bit matmul on a CUDA GPU: the Triton kernel against torch's dense fp16 / bf16 (cuBLAS).

For each weight shape (out x in) and batch, times ``x @ W.T`` with fp16 activations for dense fp16 and
bf16 torch and matpress ``int`` 8/4/3/2-bit (groups of 128) and ``ternary`` (groups of 128) through
``matpress.kernels.triton_lowbit.packed_matmul`` (the kernel ``matpress.kernels.matmul`` runs on CUDA). Every contender rotates through enough weight copies
(``--pool-gb``, default 2 GB, far above the L2 cache) that each call reads its weights from HBM, as
token-by-token decoding does; contenders interleaved, medians of repeats, timed with CUDA events.
Each matpress row also checks its result against decode-then-matmul (largest error relative to the
largest output).

Not yet run: no session so far had a GPU (see docs/kernels.md). ``--device cpu`` runs the same code
on tiny shapes under Triton's interpreter (``TRITON_INTERPRET=1``) to check the script, not the speed.

    python benchmarks/kernels_gpu.py --out benchmarks/results/kernels_gpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from matpress.evaluation.timing import command_line
from matpress.formats import Format, IntFormat, TernaryFormat
from matpress.kernels.triton_lowbit import packed_matmul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import GROUP, SHAPES, shape_of, weight_copies  # noqa: E402  (benchmarks/kernel_speed.py: the same shapes and pools)

BATCHES = [1, 4, 16, 64]


def formats(w: torch.Tensor) -> dict[str, Format]:
    out = {f"matpress int{b} g{GROUP}": IntFormat.encode(w, bits=b, group_size=GROUP) for b in (8, 4, 3, 2)}
    out[f"matpress ternary g{GROUP}"] = TernaryFormat.encode(w, group_size=GROUP)
    return out


def pool_of(make: Callable[[], object], tensors: Iterable[torch.Tensor], pool_bytes: float) -> list:
    return [make() for _ in range(weight_copies(tensors, pool_bytes))]


def copy_of(fmt: Format) -> Format:
    """The format with its own copies of the stored tensors (``Format.to`` shares them on the same device)."""
    return type(fmt).from_tensors(fmt.shape, fmt.config(), {k: t.clone() for k, t in fmt.to_tensors().items()})


def timed(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on the GPU, the wall clock elsewhere."""
    if device == "cuda":
        def run(call):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(call):
            start = time.perf_counter()
            call()
            return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pool-gb", type=float, default=2.0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or check the script with --device cpu and TRITON_INTERPRET=1")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernel under its interpreter: set TRITON_INTERPRET=1")
    dev = args.device
    batches = [int(b) for b in args.batches.split(",")]
    run = timed(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter: timings meaningless)"
    lines = [
        "# Packed low-bit matmul on the GPU (Triton)", "",
        f"Command: `{command_line()}`  ",
        f"Device: {name}, torch {torch.__version__}; fp16 activations; weights from HBM (pools of "
        f"{args.pool_gb:g} GB per contender); median of {args.repeats} interleaved passes.", "",
        "| shape (out x in) | kernel | weight MB | " + " | ".join(f"batch {b} ms | x fp16" for b in batches)
        + " | GB/s (batch 1) | max error / max output |",
        "|---|---|---:|" + "---:|---:|" * len(batches) + "---:|---:|",
    ]
    for out_f, in_f in [shape_of(s) for s in args.shapes.split(",")]:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * 0.02
        contenders: dict[str, tuple[int, list, Callable]] = {}
        for dtype, label in ((torch.float16, "dense fp16"), (torch.bfloat16, "dense bf16")):
            dense_w = w.to(dev, dtype)
            nbytes = dense_w.numel() * dense_w.element_size()
            contenders[label] = (nbytes, pool_of(dense_w.clone, [dense_w], args.pool_gb * 1e9),
                                 lambda f, x, dt=dtype: torch.nn.functional.linear(x.to(dt), f))
        errors = {}
        for label, fmt in formats(w).items():
            fmt = fmt.to(dev)
            contenders[label] = (fmt.nbytes, pool_of(lambda f=fmt: copy_of(f), fmt.to_tensors().values(), args.pool_gb * 1e9),
                                 packed_matmul)
            x = torch.randn(4, in_f, device=dev, dtype=torch.float16)
            exact = x.float() @ fmt.decode().to(dev).T
            errors[label] = float((packed_matmul(fmt, x).float() - exact).abs().max() / exact.abs().max())
        cells: dict[str, list[str]] = {label: [] for label in contenders}
        gbs = {}
        for batch in batches:
            x = torch.randn(batch, in_f, device=dev, dtype=torch.float16)
            times: dict[str, list[float]] = {label: [] for label in contenders}
            for r in range(args.repeats + 1):  # the first pass compiles and warms up, dropped
                for label, (_, pool, call) in contenders.items():
                    t = statistics.median(run(lambda f=f: call(f, x)) for f in pool)
                    if r:
                        times[label].append(t)
            base = statistics.median(times["dense fp16"])
            for label, t in times.items():
                med = statistics.median(t)
                cells[label] += [f"{med * 1e3:.4f}", f"{base / med:.2f}"]
                if batch == batches[0]:
                    gbs[label] = contenders[label][0] / med / 1e9
        for label, (nbytes, _, _) in contenders.items():
            err = f"{errors[label]:.1e}" if label in errors else "-"
            lines.append(f"| {out_f}x{in_f} | {label} | {nbytes / 1e6:.1f} | " + " | ".join(cells[label])
                         + f" | {gbs[label]:.0f} | {err} |")
        print("\n".join(lines[-len(contenders):]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
