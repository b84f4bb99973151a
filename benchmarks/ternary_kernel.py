"""Ternary GEMV on the CPU: matpress's ternary kernel against ggml's TQ2_0 (issue 14: at least level).

For each weight shape (out x in; rows a multiple of 256 columns long, as TQ2_0's super-blocks need) and
batch, times ``x @ W.T`` with fp32 activations for matpress ``ternary`` (absmean rounding, one scale
per output channel, 2-bit codes in the kernel layout with one shared zero point: 2 bits and a little a
weight), ggml's ``mul_mat`` on TQ2_0 tensors quantized by ggml from the same (ternary) weights (2.06 bits a
weight; ggml's own CPU kernels as a plain graph runs them, through ``benchmarks/native/ggml_gemv.cpp``
against the peers' llama.cpp build, ``make peers-env``), and dense fp32. Contenders interleaved in one
run, medians of repeats, the same threads, each rotating through ``--pool-mb`` of weight copies.

    flock /tmp/matpress-heavy.lock .venv-peers/bin/python benchmarks/ternary_kernel.py --out benchmarks/results/ternary_kernel.md
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.formats import TernaryFormat
from matpress.kernels import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codebook_kernel import GgmlContender, ggml_gemv_arguments, load_ggml  # noqa: E402
from kernels import dense, ours, time_contenders  # noqa: E402

SHAPES = [(2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008)]
BATCHES = [1, 4, 16]


def shape_rows(shape: tuple[int, int], batches: list[int], repeats: int, pool_bytes: float, ggml) -> list[dict]:
    out_f, in_f = shape
    torch.manual_seed(0)
    # weights already ternary (a BitNet-style model's): ggml's TQ2_0 quantizer scales each 256 block by
    # its largest value, which keeps them exact, where on Gaussian weights it rounds most to zero
    fmt = TernaryFormat.encode(torch.randn(out_f, in_f) * 0.02)
    w = fmt.decode()
    mine = [dense("dense fp32", w, pool_bytes), ours("matpress ternary", fmt, pool_bytes)]
    rows: dict[str, dict] = {}
    for batch in batches:
        x = torch.randn(batch, in_f)
        peer = GgmlContender(ggml, "TQ2_0", w, x, pool_bytes)
        contenders = mine + [peer]
        medians = time_contenders(contenders, x, repeats)
        for c in contenders:
            row = rows.setdefault(c.name, {"shape": f"{out_f}x{in_f}", "name": c.name, "MB": c.nbytes / 1e6})
            row[f"us{batch}"] = medians[c.name] * 1e6
            row[f"vs_tq2{batch}"] = medians["ggml TQ2_0"] / medians[c.name]
        peer.close()
    return list(rows.values())


def markdown(rows: list[dict], batches: list[int], pool_mb: float, argv: Optional[list[str]]) -> str:
    ours_rows = [r for r in rows if r["name"] == "matpress ternary"]
    summary = [
        f"- batch {b}: matpress ternary / ggml TQ2_0, median over shapes **{statistics.median(r[f'vs_tq2{b}'] for r in ours_rows):.2f}x** "
        f"(min {min(r[f'vs_tq2{b}'] for r in ours_rows):.2f}x)"
        for b in batches
    ]
    head = "| shape | kernel | weight MB | " + " | ".join(f"batch {b} µs | x TQ2_0" for b in batches) + " |"
    lines = [
        "# Ternary GEMV: matpress's ternary kernel against ggml's TQ2_0",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"matpress kernel build: {build.kernel_path()}; ggml: the peers build (make peers-env), its CPU backend as built for this CPU",
        "",
        f"`x @ W.T`, fp32 activations, every contender rotating through {pool_mb:.0f} MB of weight copies (read from "
        "memory on every call); median µs per call over interleaved repeats, and ggml TQ2_0's time over this "
        "one's (above 1: this one is faster).",
        "",
        *summary,
        "",
        head,
        "|---|---|---:|" + "---:|---:|" * len(batches),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'us{b}']:.1f} | {r[f'vs_tq2{b}']:.2f}" for b in batches)
        lines.append(f"| {r['shape']} | {r['name']} | {r['MB']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    args, shapes = ggml_gemv_arguments(__doc__.split("\n\n")[0], SHAPES, BATCHES, "out/ternary_kernel", argv)
    bad = [f"{o}x{i}" for o, i in shapes if i % 256]
    if bad:
        raise SystemExit(f"TQ2_0 needs rows that are a multiple of 256 columns long; {', '.join(bad)} are not")
    ggml = load_ggml(args.llama_bin, args.ggml_headers, args.work)
    if ggml is None:
        raise SystemExit("this benchmark compares against ggml: run make peers-env first")
    rows = []
    for shape in shapes:
        rows += shape_rows(shape, args.batches, args.repeats, args.pool_mb * 1e6, ggml)
        print(f"{shape[0]}x{shape[1]} done", file=sys.stderr)
    publish(markdown(rows, args.batches, args.pool_mb, argv), args.out)


if __name__ == "__main__":
    main()
