"""Quality against bits per weight for every quantization method, on MiniLM and on a small causal LM.

Methods: rtn (baseline), hqq (calibration-free), awq, gptq, and gptq with act-order and randomized
Hadamard rotation; bits 8, 4, 3, 2 with groups of 128 input columns, and per output channel at 4 and 3
bits (8 bits only for rtn and gptq, 2 bits only for rtn, awq and the best gptq). Calibrated methods see
the calibration split of pydoc_data.topics (128 sentences for MiniLM, 128 windows of 128 tokens for the
causal LM); quality is measured on the held-out evaluation split:

- all-MiniLM-L6-v2: mean cosine between compressed and original sentence embeddings, and top-10
  retrieval agreement, on 600 evaluation sentences;
- the causal LM of ``benchmarks/causal_lm.py`` (a briefly trained 4-layer Llama): perplexity and mean
  next-token KL to the original on 32 evaluation windows of 128 tokens.

Bits per weight are the real stored bytes (codes, fp16 scales and zeros, input scales and rotation
signs) over the linear layers' weights. Compression time includes the calibration pass.

    flock /tmp/matpress-heavy.lock python benchmarks/quality.py --out benchmarks/results/quality.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import matpress
from matpress.recipe.calibration import SENTENCE, WINDOW
from matpress.walk import CalibrationData
from matpress.evaluation import embedding_fidelity, language_model_quality, sentence_embeddings, token_windows
from matpress.evaluation.text import EVALUATION, corpus, sentences
from matpress.evaluation.timing import command_line, machine_description
from matpress.models import load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal_lm import DESCRIPTION, load_or_train  # noqa: E402

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


def sweep(
    original: torch.nn.Module, data: CalibrationData, score: Callable[[torch.nn.Module], dict[str, float]], name: str
) -> list[dict[str, Any]]:
    rows = []
    for bits, group, methods in SWEEP:
        for label in methods:
            model = copy.deepcopy(original)
            recipe = {"default": {**METHODS[label], "bits": bits, "group_size": group}}
            start = time.perf_counter()
            report = matpress.compress(model, recipe, calibration=data, progress=False)
            seconds = time.perf_counter() - start
            row = {"method": label, "bits": bits, "group": group, "bpw": report.bits_per_weight, "seconds": seconds, **score(model)}
            print(f"{name}: {row}", flush=True)
            rows.append(row)
    return rows


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

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (title, rows, key, ylabel) in zip(axes, panels):
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
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here (and the plot beside it, .png)")
    parser.add_argument("--sentences", type=int, default=600)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    minilm = load_pretrained("minilm")
    texts = sentences(args.sentences, EVALUATION)
    reference = sentence_embeddings(minilm.model, minilm.tokenizer, texts)

    def embed_score(model: torch.nn.Module) -> dict[str, float]:
        return embedding_fidelity(reference, sentence_embeddings(model, minilm.tokenizer, texts))

    minilm_data = CalibrationData.from_text(minilm.tokenizer, "builtin", args.samples, 128, 16, unit=SENTENCE)
    minilm_rows = sweep(minilm.model, minilm_data, embed_score, "minilm")

    lm, tokenizer = load_or_train()
    windows = token_windows(tokenizer, corpus(EVALUATION), 128, 32)

    def lm_score(model: torch.nn.Module) -> dict[str, float]:
        return language_model_quality(model, windows, reference=lm)

    lm_data = CalibrationData.from_text(tokenizer, "builtin", args.samples, 128, 8, unit=WINDOW)
    lm_rows = sweep(lm, lm_data, lm_score, "causal-lm")

    text = "\n".join([
        "# Quality against bits per weight: rtn, hqq, awq, gptq",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
        f"Calibration: {minilm_data.source} (MiniLM); {lm_data.source} (causal LM). Evaluation: held-out split.",
        "",
        f"## all-MiniLM-L6-v2 ({len(texts)} evaluation sentences)",
        "",
        table(minilm_rows, [("cosine_mean", "cosine mean", ".4f"), ("cosine_min", "cosine min", ".4f"), ("top10_agreement", "top-10 agreement", ".3f")]),
        "",
        f"## Causal LM: {DESCRIPTION}",
        "",
        f"A briefly trained model, not a real LM. Original fp32 perplexity {lm_rows[0]['reference_perplexity']:.2f} on "
        f"{lm_rows[0]['n_tokens']} evaluation tokens.",
        "",
        table(lm_rows, [("perplexity", "perplexity", ".2f"), ("kl_mean", "KL to original", ".4f")]),
        "",
        f"![quality against bits per weight]({args.out.with_suffix('.png').name if args.out else 'quality.png'})",
        "",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        plot(
            [("all-MiniLM-L6-v2: embedding fidelity", minilm_rows, "cosine_mean", "mean cosine to original"),
             ("causal LM (briefly trained): held-out KL to original", lm_rows, "kl_mean", "mean next-token KL (nats)")],
            args.out.with_suffix(".png"),
        )


if __name__ == "__main__":
    main()
