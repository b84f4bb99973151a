"""Software-prefetch distances of the CPU kernel (lowbit.cpp), swept side by side on cold 4-bit GEMV.

Builds the kernel library once per variant (``-DMP_PREFETCH_NEAR=...`` L1 distance,
``-DMP_PREFETCH_FAR=...`` L2 distance, bytes ahead of the chunk being read; near = far reproduces a
single L1 distance) and times ``x @ W.T`` for one activation row against dense fp32 torch, every
variant and the dense baseline interleaved in one run, each rotating through > 1 GB of weight copies so
that the weights come from memory; medians of repeats.

    flock /tmp/matpress-heavy.lock python benchmarks/prefetch_sweep.py --out benchmarks/results/prefetch_sweep.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from matpress.evaluation.timing import command_line, machine_description
from matpress.formats import IntFormat
from matpress.kernels import build, lowbit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import layout_copy, shape_of, weight_copies  # noqa: E402  (benchmarks/kernel_speed.py: the same pools)

SHAPES = [(4096, 4096), (4096, 14336)]
# (near, far) bytes; the first is the earlier kernel's single 2 KB distance, the second the default
VARIANTS = [(2048, 2048), (1024, 3072), (1024, 1024), (512, 3072), (1024, 6144)]
POOL_BYTES = 1.2e9
PASS_SECONDS = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN shapes")
    parser.add_argument("--variants", nargs="+", default=[f"{n}:{f}" for n, f in VARIANTS],
                        help="NEAR:FAR distances in bytes (0:0 prefetches only the chunk being read: no software prefetch)")
    args = parser.parse_args()
    variants = [tuple(int(v) for v in s.split(":")) for s in args.variants]
    shapes = [shape_of(s) for s in args.shapes]
    torch.set_num_threads(args.threads)
    libs = {
        v: build.load_library(build.DEFAULT_FLAGS + (f"-DMP_PREFETCH_NEAR={v[0]}", f"-DMP_PREFETCH_FAR={v[1]}"))
        for v in variants
    }
    names = {v: "no prefetch" if v == (0, 0) else f"L1 {v[0]} B" if v[0] == v[1] else f"L1 {v[0]} B + L2 {v[1]} B" for v in variants}
    lines = [
        "# Prefetch distances of the CPU kernel, 4-bit g128 GEMV, weights cold",
        "",
        f"Command: `{command_line()}`  ",
        f"Kernel path: {build.kernel_path()}  ",
        f"Machine: {machine_description()}  ",
        f"Median of {args.repeats} interleaved passes; speed-up over dense fp32 torch in the same run.",
        "",
        "| shape (out x in) | dense fp32 ms | " + " | ".join(names[v] for v in variants) + " |",
        "|---|---:|" + "---:|" * len(variants),
    ]
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f)
        layout = lowbit.layout_of(IntFormat.encode(w, bits=4, group_size=128))
        parts = (layout.codes, layout.scales, layout.zeros)
        copies = [layout_copy(layout) for _ in range(weight_copies(parts, POOL_BYTES))]
        dense = [w.clone() for _ in range(weight_copies([w], POOL_BYTES))]
        x = torch.randn(1, in_f)
        calls = {"dense": lambda i: torch.nn.functional.linear(x, dense[i % len(dense)])}
        for v in variants:
            calls[v] = lambda i, lib=libs[v]: lowbit.lowbit_matmul(copies[i % len(copies)], x, lib)
        times: dict = {k: [] for k in calls}
        for _ in range(args.repeats):
            for key, call in calls.items():
                start, i = time.perf_counter(), 0
                while time.perf_counter() - start < PASS_SECONDS:
                    call(i)
                    i += 1
                times[key].append((time.perf_counter() - start) / i)
        base = statistics.median(times["dense"])
        ratios = " | ".join(f"{base / statistics.median(times[v]):.2f}x" for v in variants)
        lines.append(f"| {out_f}x{in_f} | {base * 1e3:.3f} | {ratios} |")
        print(lines[-1], flush=True)
        del copies, dense
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
