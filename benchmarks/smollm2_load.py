"""How long loading the embedded SmolLM2 takes: the first load (the GGUF converted into a fresh, private
cache), a later load from that cache, and transformers' GGUF loader alone; and whether the cached model's
logits equal the GGUF load's.

    python benchmarks/smollm2_load.py --out benchmarks/results/smollm2_load.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Optional

import torch
import transformers

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import SMOLLM2, from_pretrained, load_pretrained, smollm2_gguf


def timed_load() -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    model = load_pretrained(SMOLLM2).model
    return model, time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MATPRESS_CACHE"] = cache  # a fresh cache: the first load converts
        _, first = timed_load()
        cached, later = timed_load()
    gguf = smollm2_gguf()
    start = time.perf_counter()
    direct = from_pretrained(transformers.AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype="float32").eval()
    gguf_seconds = time.perf_counter() - start
    ids = torch.arange(1, 65).view(1, 64)
    with torch.inference_mode():
        equal = torch.equal(cached(ids).logits, direct(ids).logits)
    publish(
        "\n".join([
            "# Loading SmolLM2-135M-Instruct",
            "",
            f"Command: `{command_line(argv)}`  ",
            f"Machine: {machine_description()}",
            "",
            "| load | seconds |",
            "|---|---:|",
            f"| first (GGUF converted into a fresh cache) | {first:.2f} |",
            f"| later (from the cache) | {later:.2f} |",
            f"| transformers' GGUF loader alone | {gguf_seconds:.2f} |",
            "",
            f"Logits of the cached model equal those of the GGUF load on 64 tokens: {equal}.",
        ]),
        args.out,
    )


if __name__ == "__main__":
    main()
