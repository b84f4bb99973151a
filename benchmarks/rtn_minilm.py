"""Round-to-nearest on the embedded all-MiniLM-L6-v2: size, embedding fidelity and latency.

Compresses all 36 linear layers to 8, 4 and 3 bits (groups of 128 input columns, and per output
channel), then measures on evaluation-split sentences of pydoc_data.topics: bits per weight (scales and
zeros included), linear-layer storage, mean cosine similarity to the original embeddings, top-10
retrieval agreement, and forward latency relative to the original fp32 model on the same batch.

    python benchmarks/rtn_minilm.py --out benchmarks/results/rtn_minilm.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import matpress
from matpress.evaluation import embedding_fidelity, sentence_embeddings
from matpress.evaluation.text import sentences
from matpress.evaluation.timing import command_line, interleaved_medians, machine_description, publish
from matpress.nn.layout import find_linear_layers, linear_weight
from matpress.models import load_pretrained

CONFIGS = [(8, 128), (8, None), (4, 128), (4, None), (3, 128), (3, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here as well")
    parser.add_argument("--sentences", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    loaded = load_pretrained("minilm")
    original, tokenizer = loaded.model, loaded.tokenizer
    texts = sentences(args.sentences)
    reference = sentence_embeddings(original, tokenizer, texts)
    n_weights = sum(linear_weight(m).numel() for m in find_linear_layers(original).values())
    batch = tokenizer(texts[:32], padding=True, truncation=True, return_tensors="pt")
    single = tokenizer(texts[:1], return_tensors="pt")

    rows = []
    for bits, group in CONFIGS:
        model = copy.deepcopy(original)
        start = time.perf_counter()
        report = matpress.compress(model, {"default": {"method": "rtn", "bits": bits, "group_size": group}}, progress=False)
        seconds = time.perf_counter() - start
        fid = embedding_fidelity(reference, sentence_embeddings(model, tokenizer, texts))
        with torch.inference_mode():
            t = interleaved_medians(
                {
                    "orig32": lambda: original(**batch),
                    "ours32": lambda: model(**batch),
                    "orig1": lambda: original(**single),
                    "ours1": lambda: model(**single),
                },
                repeats=args.repeats,
            )
        rows.append(
            f"| int{bits} {'g128' if group else 'per-channel'} | {report.bits_per_weight:.3f} "
            f"| {report.nbytes / 1e6:.2f} ({100 * report.nbytes / (4 * n_weights):.1f}%) "
            f"| {fid['cosine_mean']:.4f} | {fid['cosine_min']:.4f} | {fid['top10_agreement']:.3f} "
            f"| {t['ours1'] / t['orig1']:.2f} | {t['ours32'] / t['orig32']:.2f} | {seconds:.1f} |"
        )
        print(rows[-1], file=sys.stderr)

    lines = [
        "# RTN on all-MiniLM-L6-v2 (all 36 linear layers)",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_description()}  ",
        f"Quality on {len(texts)} evaluation-split sentences of `pydoc_data.topics` (mean-pooled, normalised "
        "embeddings); latency ratio = compressed / original fp32 forward, same input, median of "
        f"{args.repeats} interleaved repeats (batch of 1 and of 32 sentences).",
        "",
        f"Original fp32 linear layers: {4 * n_weights / 1e6:.2f} MB ({n_weights / 1e6:.2f} M weights).",
        "",
        "| format | bits/weight | linear storage MB (% of fp32) | cosine mean | cosine min | top-10 agreement "
        "| latency ratio b=1 | latency ratio b=32 | compress s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
