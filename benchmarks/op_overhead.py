"""Per-call overhead of the compiled low-bit kernels: a tiny int4 matrix (8 x 64, one weight block),
where the arithmetic is a few nanoseconds and the rest of a call is the way in and out.

Times, interleaved in rounds (median over rounds of the per-call mean of one round): the kernel call
alone (``lowbit.lowbit_matmul`` on a prepared layout), the whole dispatch a ``CompressedLinear`` makes
(``kernels.matmul``), and torch's own ``F.linear`` on the dense 8 x 64 weight for scale. Prints one
markdown table; run it on two checkouts to compare paths.

    python benchmarks/op_overhead.py [--rounds 41] [--calls 2000] [--out benchmarks/results/op_overhead_avx2.md]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from matpress import kernels
from matpress.formats import IntFormat
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.kernels import build, lowbit


DENSE = "torch F.linear, dense 8x64"  # the contender every call is compared with


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def overhead_table(rounds: int, calls: int) -> list[str]:
    """The Markdown table of per-call times, measured on one thread (the caller's thread count restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    fmt = IntFormat.encode(weight, bits=4, group_size=64)
    x = torch.randn(1, 64)
    layout = lowbit.layout_of(fmt)
    contenders = {
        "kernel call (lowbit_matmul)": lambda: lowbit.lowbit_matmul(layout, x),
        "dispatch (kernels.matmul)": lambda: kernels.matmul(fmt, x),
        DENSE: lambda: torch.nn.functional.linear(x, weight),
    }
    with torch.no_grad():
        for fn in contenders.values():
            per_call_us(fn, calls)  # warm up
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                times[name].append(per_call_us(fn, calls))
    torch.set_num_threads(threads)
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians[DENSE]
    return ["| call | median us per call | x F.linear |", "|---|---:|---:|"] + [
        f"| {name} | {us:.2f} | {us / reference:.2f} |" for name, us in medians.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", help="also write the Markdown result here")
    args = parser.parse_args()
    table = overhead_table(args.rounds, args.calls)
    lines = [
        "# Per-call cost of the compiled kernels",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_description()}; {build.kernel_path()}  ",
        f"One thread; median over {args.rounds} interleaved rounds of the mean over {args.calls} calls.",
        "",
        *table,
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
