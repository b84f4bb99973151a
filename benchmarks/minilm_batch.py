"""Compressed all-MiniLM-L6-v2 against the fp32 model, embedding a batch of sentences (issue 14).

One forward of ``--batch`` sentences of the evaluation split (padded to the longest), the fp32 model and
its compressed copies (RTN 4-bit groups of 128, the demo's GPTQ format, and 8-bit per channel; the
embeddings stay fp32) timed interleaved, medians of ``--repeats``. Each instruction-set setting runs
in its own process:

- ``native``: the kernels built for this CPU, torch's BLAS as it comes;
- ``avx2``: an AVX2-only CPU as far as one can be played on this one: matpress's AVX2 kernels
  (``MATPRESS_KERNEL_ISA=avx2``, which also rules out the bf16 path) and torch's MKL / oneDNN capped at
  AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``). Memory, caches and clock are
  still this CPU's, so it is not a measurement of another CPU.

    python benchmarks/minilm_batch.py --out benchmarks/results/minilm_batch.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

import matpress
from matpress.evaluation.text import sentences
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.kernels.build import kernel_path
from matpress.models import MINILM, load_pretrained

RECIPES = {
    "int4 g128": {"default": {"method": "rtn", "bits": 4, "group_size": 128}, "exclude": ["*embed*"]},
    "int8 per channel": {"default": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}, "exclude": ["*embed*"]},
}
SETTINGS = {
    "native": {},
    "avx2": {"MATPRESS_KERNEL_ISA": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def measure(batch: int, repeats: int, threads: int) -> dict:
    """ms per forward of the fp32 model and of each compressed copy, medians of interleaved repeats."""
    torch.set_num_threads(threads)
    loaded = load_pretrained(MINILM)
    models = {"fp32": loaded.model.eval()}
    for name, recipe in RECIPES.items():
        models[name] = copy.deepcopy(models["fp32"])
        matpress.compress(models[name], recipe, progress=False)
    inputs = loaded.tokenizer(sentences(batch), return_tensors="pt", padding=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first round warms up (kernel layouts, BLAS buffers)
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                if r:
                    times[name].append(time.perf_counter() - start)
    return {
        "tokens": int(inputs["attention_mask"].shape[1]),
        "path": kernel_path(),
        "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one setting, JSON to stdout
    parser.add_argument("--out", help="write the markdown here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.batch, args.repeats, args.threads)))
        return
    torch.set_num_threads(args.threads)  # as the workers run, for the machine line
    results = {}
    for setting in args.settings:
        command = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, env={**os.environ, **SETTINGS[setting]}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {setting} run failed:\n{done.stderr[-3000:]}")
        results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    names = ["fp32", *RECIPES]
    lines = [
        f"# all-MiniLM-L6-v2: a batch of {args.batch} sentences, compressed against fp32",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"One forward of {args.batch} sentences of the evaluation split, padded to "
        f"{next(iter(results.values()))['tokens']} tokens; ms, medians of {args.repeats} interleaved repeats; "
        "speed-up: fp32 ms / compressed ms (above 1: the compressed model is faster). Embeddings fp32. The avx2 "
        "setting plays an AVX2-only CPU on this one (matpress's AVX2 kernels, torch's MKL and oneDNN capped at AVX2).",
        "",
        "| setting | kernel path | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} speed-up" for n in RECIPES) + " |",
        "|---|---|" + "---:|" * (len(names) + len(RECIPES)),
    ]
    for setting, r in results.items():
        ms = r["ms"]
        lines.append(f"| {setting} | {r['path']} | " + " | ".join(f"{ms[n]:.1f}" for n in names) + " | "
                     + " | ".join(f"{ms['fp32'] / ms[n]:.2f}x" for n in RECIPES) + " |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
