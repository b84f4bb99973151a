"""Quality against bits per weight for every quantization method, on MiniLM and on SmolLM2-135M-Instruct.

Methods: rtn (baseline), hqq (calibration-free), awq, gptq, and gptq with act-order and randomized
Hadamard rotation; bits 8, 4, 3, 2 with groups of 128 input columns, and per output channel at 4 and 3
bits (8 bits only for rtn and gptq, 2 bits only for rtn, awq and the best gptq). Calibrated methods see
the calibration split of pydoc_data.topics; quality is measured on the held-out evaluation split (see
``harness.py``):

- all-MiniLM-L6-v2 (its 36 linear layers): mean cosine between compressed and original sentence
  embeddings, and top-10 retrieval agreement, on 600 evaluation sentences;
- SmolLM2-135M-Instruct (its 210 block linear layers; the tied embedding / LM head stays fp32):
  perplexity and mean next-token KL to the fp32 model on 8 evaluation windows of 512 tokens. Its
  weights lie on a 4-bit g32 grid already, so no configuration here uses groups under 128.

Bits per weight are the real stored bytes (codes, fp16 scales and zeros, input scales and rotation
signs) over the compressed layers' weights, and for SmolLM2 also over the whole model (every other
weight at 32 bits). Compression time includes the calibration pass. Results are cached per model and
configuration (``harness.ResultCache``): rerun the command until it names no configuration as not run.

    flock /tmp/matpress-heavy.lock python benchmarks/quality.py --out benchmarks/results/quality.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import MINILM, SMOLLM2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import SMOLLM2_GRID, ResultCache, add_cache_arguments, bench_loader, compressed_row, setup_line  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"method": "rtn"},
    "hqq": {"method": "hqq"},
    "awq": {"method": "awq"},
    "gptq": {"method": "gptq"},
    "gptq+act-order+rotate": {"method": "gptq", "act_order": True, "rotate": True},
}
SWEEP = [  # (bits, group_size, methods)
    (8, 128, ["rtn", "gptq"]),
    (4, 128, list(METHODS)),
    (4, None, list(METHODS)),
    (3, 128, list(METHODS)),
    (3, None, list(METHODS)),
    (2, 128, ["rtn", "awq", "gptq+act-order+rotate"]),
]
MODELS = {MINILM: "all-MiniLM-L6-v2", SMOLLM2: "SmolLM2-135M-Instruct"}


def sweep(cache: ResultCache) -> list[dict[str, Any]]:
    """Every configuration of SWEEP on the cache's model, cached ones read back."""
    todo = []
    for bits, group, methods in SWEEP:
        for label in methods:
            rule = {**METHODS[label], "bits": bits, "group_size": group}
            meta = {"method": label, "bits": bits, "group": group}
            todo.append((f"{label}-{bits}b-g{group or 'channel'}",
                         lambda bench, rule=rule, meta=meta: {**meta, **compressed_row(bench, {"default": rule})}))
    return cache.rows(todo)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| method | bits | group | bits/weight | " + " | ".join(c[1] for c in columns) + " | compress s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        group = "channel" if r["group"] is None else str(r["group"])
        values = " | ".join(format(r[key], fmt) for key, _, fmt in columns)
        lines.append(f"| {r['method']} | {r['bits']} | {group} | {r['bpw']:.3f} | {values} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(panels: list[tuple[str, list[dict[str, Any]], str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, rows, key, ylabel) in zip(axes[0], panels):
        for i, label in enumerate(METHODS):
            color = f"C{i}"
            for group, style, suffix in ((128, "o-", " (g128)"), (None, "s--", " (per channel)")):
                pts = sorted((r["bpw"], r[key]) for r in rows if r["method"] == label and r["group"] == group)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=label + suffix, alpha=1.0 if group else 0.6)
        ax.set_title(title)
        ax.set_xlabel("bits per weight (stored bytes, scales included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "kl_mean":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section(name: str, rows: list[dict[str, Any]], n_sentences: int) -> list[str]:
    if name == MINILM:
        columns = [("cosine_mean", "cosine mean", ".4f"), ("cosine_min", "cosine min", ".4f"), ("top10_agreement", "top-10 agreement", ".3f")]
        about = f"All 36 linear layers; {setup_line(name, n_sentences)}."
    else:
        columns = [("model_bpw", "bits/weight, whole model", ".2f"), ("perplexity", "perplexity", ".2f"), ("kl_mean", "KL to fp32", ".4f")]
        reference = f" fp32 perplexity {rows[0]['reference_perplexity']:.2f} on {rows[0]['n_tokens']} predicted tokens." if rows else ""
        about = (f"The 210 block linear layers (tied embedding / LM head and norms fp32); {setup_line(name, n_sentences)}."
                 f"{reference} {SMOLLM2_GRID}")
    return [f"## {MODELS[name]}", "", about, "", *([table(rows, columns), ""] if rows else [])]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here (and the plot beside it, .png)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sentences", type=int, default=600)
    add_cache_arguments(parser, "quality")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results, lines = {}, []
    for name in args.models:
        cache = ResultCache(args, name, bench_loader(name, args.sentences))
        results[name] = sweep(cache)
        lines += [*section(name, results[name], args.sentences), *cache.not_run()]
    text = "\n".join([
        "# Quality against bits per weight: rtn, hqq, awq, gptq",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
        "Bits per weight: the stored bytes of the compressed layers (codes, fp16 scales and zeros, input scales, "
        "rotation signs) over their weights. Compression time includes the calibration pass.",
        "",
        *lines,
        *([f"![quality against bits per weight]({args.out.with_suffix('.png').name})", ""] if args.out else []),
    ])
    publish(text, args.out)
    if args.out and any(results.values()):
        labels = {MINILM: ("all-MiniLM-L6-v2: embedding fidelity", "cosine_mean", "mean cosine to original"),
                  SMOLLM2: ("SmolLM2-135M-Instruct: held-out KL to fp32", "kl_mean", "mean next-token KL (nats)")}
        plot([(labels[n][0], rows, *labels[n][1:]) for n, rows in results.items() if rows], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
