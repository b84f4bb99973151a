"""GEMV on the CPU against ggml's own kernels: ternary against TQ2_0, int4 against Q4_0 (issue 14).

For each weight shape (out x in) and batch, times ``x @ W.T`` with fp32 activations for matpress's
kernels and ggml's ``mul_mat`` on tensors quantized by ggml from the same weights (through
``benchmarks/native/ggml_gemv.cpp`` against the peers' llama.cpp build, ``make peers-env``), and dense
fp32. Contenders interleaved in one run, medians of repeats, the same threads, each rotating through
``--pool-mb`` of weight copies (read from memory on every call, as token-by-token decoding reads them).

- ``--pair ternary`` (rows a multiple of 256 columns, as TQ2_0's super-blocks need): matpress
  ``ternary`` (absmean rounding, one scale per output channel, 2-bit codes with one shared zero point)
  against TQ2_0 (2.06 bits a weight; ggml has no repacked layout for it), on weights already ternary.
- ``--pair int4``: matpress ``int`` 4-bit g32 symmetric (Q4_0's grid, 4.5 bits), g64 (the default) and
  g128 against Q4_0 as a plain graph runs it and Q4_0 in ggml's CPU_REPACK buffer (8-row interleaved
  blocks on AVX2, what llama.cpp's model loader picks by default), on Gaussian weights.

    flock /tmp/matpress-heavy.lock .venv-peers/bin/python benchmarks/ggml_gemv.py --pair ternary --out benchmarks/results/ternary_kernel.md
    flock /tmp/matpress-heavy.lock .venv-peers/bin/python benchmarks/ggml_gemv.py --pair int4 --out benchmarks/results/int4_gemv.md
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.formats import IntFormat, TernaryFormat
from matpress.kernels import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codebook_kernel import GgmlContender, ggml_gemv_parser, load_ggml, shape_pairs  # noqa: E402
from kernel_speed import Contender, dense, ours, time_contenders  # noqa: E402


@dataclass(frozen=True)
class Pair:
    """matpress's contenders for one weight matrix, and the ggml types they race."""

    title: str
    weights: Callable[[torch.Tensor], torch.Tensor]  # Gaussian weights -> the weights both sides get
    ours: Callable[[torch.Tensor, float], list[Contender]]  # (weights, pool bytes) -> matpress contenders
    ggml: tuple[tuple[str, bool], ...]  # (ggml type, repacked)
    reference: str  # the ggml contender every ratio is taken against
    columns_multiple: int  # rows must be a multiple of this many columns long (ggml's block)


def ternary_weights(w: torch.Tensor) -> torch.Tensor:
    # weights already ternary (a BitNet-style model's): ggml's TQ2_0 quantizer scales each 256 block by
    # its largest value, which keeps them exact, where on Gaussian weights it rounds most to zero
    return TernaryFormat.encode(w).decode()


def int4_contenders(w: torch.Tensor, pool_bytes: float) -> list[Contender]:
    return [
        ours("matpress int4 g32 sym", IntFormat.encode(w, bits=4, group_size=32, symmetric=True), pool_bytes),
        ours("matpress int4 g64", IntFormat.encode(w, bits=4, group_size=64), pool_bytes),
        ours("matpress int4 g128", IntFormat.encode(w, bits=4, group_size=128), pool_bytes),
    ]


PAIRS = {
    "ternary": Pair("ternary kernel against ggml's TQ2_0", ternary_weights,
                    lambda w, pool: [ours("matpress ternary", TernaryFormat.encode(w), pool)],
                    (("TQ2_0", False),), "ggml TQ2_0", 256),
    "int4": Pair("int4 kernel against ggml's Q4_0, plain and repacked", lambda w: w, int4_contenders,
                 (("Q4_0", False), ("Q4_0", True)), "ggml Q4_0 repacked", 32),
}
SHAPES = {"ternary": [(2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008)],
          "int4": [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (4096, 4096), (11008, 4096), (4096, 11008)]}
BATCHES = [1, 4, 16]


def shape_rows(pair: Pair, shape: tuple[int, int], batches: list[int], repeats: int, pool_bytes: float, ggml) -> list[dict]:
    out_f, in_f = shape
    torch.manual_seed(0)
    w = pair.weights(torch.randn(out_f, in_f) * 0.02)
    mine = [dense("dense fp32", w, pool_bytes)] + pair.ours(w, pool_bytes)
    rows: dict[str, dict] = {}
    for batch in batches:
        x = torch.randn(batch, in_f)
        peers = [GgmlContender(ggml, t, w, x, pool_bytes, repack) for t, repack in pair.ggml]
        contenders = mine + peers
        medians = time_contenders(contenders, x, repeats)
        for c in contenders:
            row = rows.setdefault(c.name, {"shape": f"{out_f}x{in_f}", "name": c.name, "MB": c.nbytes / 1e6})
            row[f"us{batch}"] = medians[c.name] * 1e6
            row[f"vs_ref{batch}"] = medians[pair.reference] / medians[c.name]
            row[f"vs_fp32_{batch}"] = medians["dense fp32"] / medians[c.name]
        for p in peers:
            p.close()
    return list(rows.values())


def markdown(pair: Pair, rows: list[dict], batches: list[int], pool_mb: float, argv: Optional[list[str]]) -> str:
    ref = pair.reference.removeprefix("ggml ")
    summary = []
    for name in dict.fromkeys(r["name"] for r in rows if r["name"].startswith("matpress")):
        mine = [r for r in rows if r["name"] == name]
        summary += [
            f"- batch {b}: {name.removeprefix('matpress ')} / ggml {ref}, median over shapes **{statistics.median(r[f'vs_ref{b}'] for r in mine):.2f}x** "
            f"(min {min(r[f'vs_ref{b}'] for r in mine):.2f}x); against dense fp32 median {statistics.median(r[f'vs_fp32_{b}'] for r in mine):.2f}x"
            for b in batches
        ]
    head = "| shape | kernel | weight MB | " + " | ".join(f"batch {b} µs | x {ref} | x fp32" for b in batches) + " |"
    lines = [
        f"# GEMV: matpress's {pair.title}",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"matpress kernel build: {build.kernel_path()}; ggml: the peers build (make peers-env), its CPU backend as built for this CPU",
        "",
        f"`x @ W.T`, fp32 activations, every contender rotating through {pool_mb:.0f} MB of weight copies (read from "
        f"memory on every call); median µs per call over interleaved repeats, and ggml {ref}'s (or dense fp32's) time "
        "over this one's (above 1: this one is faster).",
        "",
        *summary,
        "",
        head,
        "|---|---|---:|" + "---:|---:|---:|" * len(batches),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'us{b}']:.1f} | {r[f'vs_ref{b}']:.2f} | {r[f'vs_fp32_{b}']:.2f}" for b in batches)
        lines.append(f"| {r['shape']} | {r['name']} | {r['MB']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = ggml_gemv_parser(__doc__.split("\n\n")[0], BATCHES, "out/ggml_gemv")
    parser.add_argument("--pair", choices=sorted(PAIRS), default="ternary", help="which kernels race")
    args = parser.parse_args(argv)
    pair, shapes = PAIRS[args.pair], shape_pairs(args.shapes, SHAPES[args.pair])
    bad = [f"{o}x{i}" for o, i in shapes if i % pair.columns_multiple]
    if bad:
        raise SystemExit(f"ggml's blocks need rows that are a multiple of {pair.columns_multiple} columns long; {', '.join(bad)} are not")
    ggml = load_ggml(args.llama_bin, args.ggml_headers, args.work)
    if ggml is None:
        raise SystemExit("this benchmark compares against ggml: run make peers-env first")
    rows = []
    for shape in shapes:
        rows += shape_rows(pair, shape, args.batches, args.repeats, args.pool_mb * 1e6, ggml)
        print(f"{shape[0]}x{shape[1]} done", file=sys.stderr)
    publish(markdown(pair, rows, args.batches, args.pool_mb, argv), args.out)


if __name__ == "__main__":
    main()
