"""Calibration through the chat template on SmolLM2-135M-Instruct: its effect on GPTQ, RTN alongside.

Every contender quantizes the block linear layers to 4 bits in groups of 64 (embedding and tied head
fp32). GPTQ is calibrated on the calibration split of ``pydoc_data.topics`` (``--samples`` windows of
128 tokens) formatted with the tokenizer's chat template (each passage a user message, the default) or
as plain running text; RTN needs no calibration. Each is scored against the fp32 original (mean
next-token KL and perplexity) on held-out windows of the evaluation split, twice: as plain running
text, and formatted with the chat template the same way, which is closer to how an instruct model is
used.

    flock /tmp/matpress-heavy.lock python benchmarks/chat_calibration.py --out benchmarks/results/chat_calibration.md
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Optional

import torch

import matpress
from matpress.recipe.calibration import CalibrationSettings
from matpress.evaluation import language_model_quality
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import SMOLLM2, load_pretrained
from matpress.walk import calibration_data

RULE = {"bits": 4, "group_size": 64}
CONTENDERS: list[tuple[str, str, Optional[bool]]] = [  # (label, method, calibrate through the chat template)
    ("rtn", "rtn", None),
    ("gptq, plain calibration text", "gptq", False),
    ("gptq, chat-template calibration text (default)", "gptq", True),
]


def evaluation_windows(tokenizer: Any, chat_template: bool, n: int, seq_len: int) -> torch.Tensor:
    """Held-out windows: the evaluation split as running text, through the chat template or plain
    (formatted as calibration text is, so the two differ only in the template)."""
    settings = CalibrationSettings(text=(corpus(EVALUATION),), samples=n, seq_len=seq_len, batch_size=n, chat_template=chat_template)
    return calibration_data(settings, tokenizer).batches[0]["input_ids"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 128 tokens")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_pretrained(SMOLLM2)
    original, tokenizer = loaded.model, loaded.tokenizer
    held_out = {name: evaluation_windows(tokenizer, chat, args.windows, args.seq_len) for name, chat in (("plain", False), ("chat", True))}
    rows = []
    for label, method, chat_template in CONTENDERS:
        model = copy.deepcopy(original)
        recipe: dict[str, Any] = {"default": {"method": method, **RULE}}
        if chat_template is not None:
            recipe["calibration"] = {"samples": args.samples, "chat_template": chat_template}
        start = time.perf_counter()
        matpress.compress(model, recipe, tokenizer=tokenizer, progress=False)
        seconds = time.perf_counter() - start
        scores = {name: language_model_quality(model, windows, reference=original) for name, windows in held_out.items()}
        rows.append((label, scores, seconds))
        print(label, scores, f"{seconds:.0f} s", flush=True)
        del model

    lines = [
        "# SmolLM2-135M-Instruct: calibration text through the chat template",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
        f"Block linear layers 4-bit, groups of 64 (asymmetric); GPTQ calibrated on {args.samples} windows of 128 "
        "tokens of the calibration split. Held-out: "
        f"{args.windows} windows of {args.seq_len} tokens of the evaluation split, as plain text (original "
        f"perplexity {rows[0][1]['plain']['reference_perplexity']:.2f}) and through the chat template (original "
        f"perplexity {rows[0][1]['chat']['reference_perplexity']:.2f}).",
        "",
        "| method | KL, plain held-out | KL, chat held-out | perplexity, plain | perplexity, chat | compress s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, scores, seconds in rows:
        lines.append(
            f"| {label} | {scores['plain']['kl_mean']:.4f} | {scores['chat']['kl_mean']:.4f} "
            f"| {scores['plain']['perplexity']:.2f} | {scores['chat']['perplexity']:.2f} | {seconds:.0f} |"
        )
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
