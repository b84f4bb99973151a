"""Quality against storage for every family of formats: int (RTN, and GPTQ when installed), int +
low-rank compensation (EoRA), low rank (SVD, SVD-LLM), sparse (magnitude, Wanda, SparseGPT; 50% and 2:4;
fp16 or int4 kept values), Monarch, ternary.

Every linear layer of the model is compressed with one recipe at a time; calibrated methods run block by
block (``matpress.compress(model, recipe, calibration=data)``: each block's statistics come from the
outputs of the blocks already compressed) on the calibration split of ``pydoc_data.topics``, and
quality is measured on the evaluation split:

- all-MiniLM-L6-v2 (36 layers): mean cosine similarity of sentence embeddings to the original's and
  top-10 retrieval agreement;
- SmolLM2-135M-Instruct (its 210 block linear layers; the tied embedding / LM head stays fp32):
  perplexity and mean next-token KL to the fp32 model (see ``harness.py``). Its weights lie on a 4-bit
  g32 grid already, so the integer configurations use groups of 64 or more.

Writes a Markdown table per model and a Pareto plot (quality against effective bits per weight, scales,
indices and factors included). Results are cached per model and configuration
(``harness.ResultCache``): rerun the command until it names no configuration as not run.

    flock /tmp/matpress-heavy.lock python benchmarks/formats.py --out benchmarks/results/formats.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.methods import METHODS
from matpress.models import MINILM, SMOLLM2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SMOLLM2_GRID, ResultCache, add_cache_arguments, bench_loader, compressed_row, setup_line  # noqa: E402

Config = tuple[str, str, dict[str, Any]]  # family, label, default rule of the recipe


def configs(monarch_blocks: tuple[int, ...], quick: bool) -> list[Config]:
    """The recipes swept, as (family, label, default rule). GPTQ (slow on CPU) gets fewer points."""
    gptq = "gptq" in METHODS
    out: list[Config] = []
    for method, points in [("rtn", ((2, 128), (3, 128), (4, 128), (4, 64), (5, 128), (8, 128)))] + (
        [("gptq", ((2, 128), (3, 128), (4, 128), (4, 64)))] if gptq else []
    ):
        for bits, group in points[:3] if quick else points:
            out.append((f"int ({method.upper()})", f"{method} int{bits} g{group}", {"method": method, "bits": bits, "group_size": group}))
    # int + low-rank residual at the storage of a plain int point: int4 g128 + 0.25 bpw = int4 g64, ...
    eora = [("rtn", 2, 1.0, 16), ("rtn", 3, 1.0, 8), ("rtn", 4, 0.25, 8), ("rtn", 4, 1.0, 8)]
    if gptq:
        eora += [("gptq", 3, 1.0, 8), ("gptq", 4, 0.25, 8)]
    for quantizer, bits, rank_bits, factor_bits in eora[:2] if quick else eora:
        factors = "fp16" if factor_bits == 16 else f"int{factor_bits}"
        out.append((
            f"int+lowrank (EoRA, {quantizer.upper()})",
            f"eora {quantizer} int{bits} g128 + {rank_bits:g} bpw {factors} factors",
            {"method": "eora", "quantizer": quantizer, "bits": bits, "group_size": 128, "rank_bits": rank_bits,
             "factor_bits": factor_bits},
        ))
    for method, family in (("svd", "lowrank (SVD)"), ("svd_llm", "lowrank (SVD-LLM)")):
        for rank_bits in (2.0, 4.0, 8.0):
            out.append((family, f"{method} {rank_bits:g} bpw fp16", {"method": method, "rank_bits": rank_bits}))
    for method in ("magnitude", "wanda", "sparsegpt"):
        for nm in (None, "2:4"):
            for value_bits in (16,) if quick else (16, 4):
                values = "fp16" if value_bits == 16 else f"int{value_bits} g128"
                out.append((f"sparse ({method})", f"{method} {nm or '50%'} {values}",
                            {"method": method, "sparsity": 0.5, "nm": nm, "value_bits": value_bits, "group_size": 128}))
    for method in ("monarch", "monarch_aw"):
        for b in monarch_blocks:
            out.append((method, f"{method} b{b}", {"method": method, "nblocks": b}))
    for method, family in (("ternary", "ternary (absmean)"), ("ternary_calibrated", "ternary (calibrated)")):
        for group in (None, 64):
            out.append((family, f"{method} {'per-channel' if group is None else f'g{group}'}", {"method": method, "group_size": group}))
    return out


# per model: Monarch block counts dividing every linear dimension (MiniLM 384 and 1536; SmolLM2 576, 192 and 1536)
MONARCH_BLOCKS = {MINILM: (24, 48, 96), SMOLLM2: (16, 32, 64)}
MODELS = {
    MINILM: ("all-MiniLM-L6-v2 (36 linear layers)", "cosine_mean", ["cosine_mean", "top10_agreement"]),
    SMOLLM2: ("SmolLM2-135M-Instruct (210 block linear layers: 30 blocks x q, k, v, o, gate, up, down)", "kl_mean",
              ["perplexity", "kl_mean"]),
}


def sweep(cache: ResultCache, todo: list[Config]) -> list[dict[str, Any]]:
    return cache.rows([
        (label, lambda bench, family=family, label=label, rule=rule: {"family": family, "label": label, **compressed_row(bench, {"default": rule})})
        for family, label, rule in todo
    ])


def pareto(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both storage and quality, by increasing bits per weight."""
    front, best = [], None
    for bpw, q in sorted(points):
        if best is None or (q > best if higher_is_better else q < best):
            front.append((bpw, q))
            best = q
    return front


def plot(panels: list[tuple[str, list[dict[str, Any]], str, bool, bool]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>phX*Pd"
    for ax, (title, rows, metric, higher, log) in zip(axes[0], panels):
        families = list(dict.fromkeys(r["family"] for r in rows))
        for i, family in enumerate(families):
            pts = [(r["bpw"], r[metric]) for r in rows if r["family"] == family]
            color, marker = colors[(2 * i) % 20 + (2 * i) // 20], markers[i % len(markers)]
            # the family's Pareto front as a line; its dominated points as small markers
            ax.plot(*zip(*pareto(pts, higher)), "-", color=color, marker=marker, label=family)
            ax.scatter(*zip(*pts), color=color, marker=marker, s=14, alpha=0.5)
        ax.set_xlabel("effective bits per weight (linear layers)")
        ax.set_ylabel(metric)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def fmt_metric(value: float) -> str:
    """Four decimals, or three significant digits for small values (KL of near-lossless formats)."""
    return f"{value:.4f}" if abs(value) >= 0.1 else f"{value:.3g}"


def headline(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """The comparisons the issue asks about: int + low rank against plain int at equal storage, and the
    pruning methods against each other at equal sparsity."""
    by_label = {r["label"]: r for r in rows}
    pairs = [
        ("rtn int4 g64", "eora rtn int4 g128 + 0.25 bpw int8 factors"),
        ("gptq int4 g64", "eora gptq int4 g128 + 0.25 bpw int8 factors"),
        ("rtn int4 g128", "eora rtn int3 g128 + 1 bpw int8 factors"),
        ("gptq int4 g128", "eora gptq int3 g128 + 1 bpw int8 factors"),
    ]
    lines = [f"| comparison at (about) equal storage | bits/weight | {metric} |", "|---|---|---|"]
    for plain, compensated in pairs:
        if plain in by_label and compensated in by_label:
            for label in (plain, compensated):
                lines.append(f"| {label} | {by_label[label]['bpw']:.3f} | {fmt_metric(by_label[label][metric])} |")
    for where in ("50%", "2:4"):
        for values in ("fp16", "int4 g128"):
            for method in ("magnitude", "wanda", "sparsegpt"):
                label = f"{method} {where} {values}"
                if label in by_label:
                    lines.append(f"| {label} | {by_label[label]['bpw']:.3f} | {fmt_metric(by_label[label][metric])} |")
    return lines


def table(rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    lines = ["| family | configuration | bits/weight | " + " | ".join(metrics) + " | compress s |",
             "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["bpw"])):
        vals = " | ".join(fmt_metric(r[m]) for m in metrics)
        lines.append(f"| {r['family']} | {r['label']} | {r['bpw']:.3f} | {vals} | {r['seconds']:.1f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/formats.md"), help="the markdown (the plot beside it, .png)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="fewer configurations (a smoke test)")
    add_cache_arguments(parser, "formats")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    panels, sections = [], []
    for name in args.models:
        title, metric, metrics = MODELS[name]
        cache = ResultCache(args, name, bench_loader(name, args.sentences))
        rows = sweep(cache, configs(MONARCH_BLOCKS[name], args.quick))
        about = setup_line(name, args.sentences) + "."
        if name == SMOLLM2:
            ref = f" fp32 perplexity {rows[0]['reference_perplexity']:.2f}." if rows else ""
            about += f"{ref} The tied embedding / LM head and the norms stay fp32. {SMOLLM2_GRID}"
            metrics = ["model_bpw", *metrics]
        sections += ["", f"## {title}", "", about, "", *cache.not_run()]
        if rows:
            panels.append((f"{title.split(' (')[0]}: {metric}", rows, metric, name == MINILM, name == SMOLLM2))
            sections += [*headline(rows, metric), "", *table(rows, metrics)]
    lines = [
        "# Formats: quality against storage",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        "Every linear layer compressed with one recipe; bits/weight = stored bytes of those layers (codes, "
        "scales, zeros, indices, masks, factors) x 8 / weights (model_bpw: over the whole model, every other weight "
        "at 32 bits). Calibrated methods run block by block on the calibration split (statistics of each block "
        "taken after the blocks before it are compressed); quality is measured on the evaluation split.",
        *sections,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if panels:
        plot(panels, args.out.with_suffix(".png"))
        lines += ["", f"![Pareto plot]({args.out.with_suffix('.png').name})"]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
