"""Codebooks against uniform integer grids on SmolLM2-135M-Instruct, in the harness of ``peers.py``.

Same fp32 reference, the same 210 block linears compressed, the same calibration (128 windows of 128
tokens of the calibration split) and evaluation (``--windows`` windows of ``--seq-len`` tokens of the
evaluation split), scored by ``peers.measure``. Each pair compares at equal stored bits:

- ~4.5 bits: uniform int4 with an fp16 scale and zero per 64 columns, against 4-bit codes with one
  fp16 scale per 32 columns;
- ~3.5 bits: uniform int3 g64 against 3-bit codes g32;
- ~2 bits: vector quantization (``gptq_vq`` and round-to-nearest ``vq``: 8-bit codes of 4 weights, one
  fp16 scale per row, 2.0x bits) against every result under 3 bits cached by ``peers.py`` (uniform
  GPTQ int2 g64 with act-order and rotation, RTN, hqq, torchao, llama.cpp Q2_K; 2.5 bits and more).

The uniform rows are configurations of the race (``peers.py``), copied from its cache when there;
each codebook row is compared with the better of uniform GPTQ with and without the clipping search.

Both calibrated sides are GPTQ with act-order and the same randomized Hadamard rotation (seed 0);
the codebook side rounds each column to its nearest level (``gptq_codebook``) on a fixed Lloyd-Max
Gaussian table (``nl``) or on a table learned per layer by k-means weighted by the Hessian diagonal
(``layer``). The round-to-nearest rows (no calibration) show the grids alone.

Results are cached as ``benchmarks/results/cache/codebook/smollm2/<name>.json`` (committed; a rerun
computes what is missing, ``--only`` picks contenders, ``--minutes`` bounds a run), so the sweep runs in
pieces, one heavy-lock hold each:

    flock /tmp/matpress-heavy.lock .venv/bin/python benchmarks/codebook.py --only gptq-codebook-3b-g32-nl
    .venv/bin/python benchmarks/codebook.py --cached --out benchmarks/results/codebook.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from matpress import CalibrationData
from matpress.evaluation import token_windows
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.models import SMOLLM2, load_pretrained, smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CACHE_ROOT, CALIBRATION_LEN, CALIBRATION_WINDOWS, add_cache_arguments  # noqa: E402
from peers import ASYMMETRIC, Contender, cached_contenders, matpress_outcome  # noqa: E402

CALIBRATED = {"act_order": True, "rotate": True}


def contender(name: str, label: str, rule: dict[str, Any]) -> Contender:
    return Contender(name, rule["method"], label, rule["method"] != "rtn", lambda ctx: matpress_outcome(ctx, {"default": rule}))


CONTENDERS: list[Contender] = [
    *(contender(f"gptq-{b}b-g64", f"uniform GPTQ, int{b} g64", {"method": "gptq", "bits": b, "group_size": 64, **CALIBRATED}) for b in (4, 3)),
    *(
        contender(f"gptq-clip-{b}b-g64", f"uniform GPTQ + clip, int{b} g64", {"method": "gptq", "bits": b, "group_size": 64, "clip": True, **CALIBRATED})
        for b in (4, 3)
    ),
    *(
        contender(f"gptq-codebook-{b}b-g32-{t}", f"GPTQ onto codebook {t}, {b}b g32", {"method": "gptq_codebook", "bits": b, "group_size": 32, "table": t, **CALIBRATED})
        for b in (4, 3) for t in ("nl", "layer")
    ),
    # the asymmetric target (GPTAQ) on the best codebook grid: each layer also undoes its inputs' error
    *(
        contender(
            f"gptq-codebook-{b}b-g32-nl-asym", f"GPTQ onto codebook nl + asymmetric {ASYMMETRIC}, {b}b g32",
            {"method": "gptq_codebook", "bits": b, "group_size": 32, "table": "nl", "asymmetric": ASYMMETRIC, **CALIBRATED},
        )
        for b in (4, 3)
    ),
    *(
        contender(
            f"gptq-codebook-{b}b-g32-nl-asymauto", f"GPTQ onto codebook nl + asymmetric auto, {b}b g32",
            {"method": "gptq_codebook", "bits": b, "group_size": 32, "table": "nl", "asymmetric": "auto", **CALIBRATED},
        )
        for b in (4, 3)
    ),
    # llama.cpp's IQ4_NL grid (its levels, one scale per 32): the codebook that exports to GGUF as IQ4_NL
    contender("gptq-codebook-4b-g32-iq4nl", "GPTQ onto codebook iq4nl, 4b g32", {"method": "gptq_codebook", "bits": 4, "group_size": 32, "table": "iq4nl", **CALIBRATED}),
    # ~2 bits: 8-bit codes of 4 weights, one fp16 scale per row (2.0x bits), GPTQ over blocks of 4 columns
    contender("gptq-vq-8x4-rot", "GPTQ onto vq, 8-bit codes of 4 weights, rotation", {"method": "gptq_vq", "bits": 8, "dim": 4, "rotate": True}),
    contender("gptq-vq-8x4-rot-refit", "GPTQ onto vq, 8-bit codes of 4 weights, rotation, codebook refit", {"method": "gptq_vq", "bits": 8, "dim": 4, "rotate": True, "refit_steps": 10}),
    contender("vq-8x4-rot", "RTN onto vq, 8-bit codes of 4 weights, rotation", {"method": "vq", "bits": 8, "dim": 4, "rotate": True}),
    *(contender(f"rtn-{b}b-g64", f"RTN int{b} g64", {"method": "rtn", "bits": b, "group_size": 64}) for b in (4, 3)),
    *(contender(f"rtn-codebook-{b}b-g32-nl", f"RTN onto codebook nl, {b}b g32", {"method": "codebook", "bits": b, "group_size": 32, "table": "nl"}) for b in (4, 3)),
]


RACE_NAMES = {  # contenders that are configurations of the race too: this name -> peers.py's
    **{f"{kind}-{b}b-g64": f"matpress-{kind}-{b}b-g64" for kind in ("gptq", "gptq-clip", "rtn") for b in (4, 3)},
}


def borrow_race_rows(cache: Path) -> None:
    """The uniform rows are configurations of the race (``peers.py``: same harness, rule and seed, a
    deterministic computation): copy the race's cached results instead of computing them again, where
    this cache lacks them."""
    race = CACHE_ROOT / "peers" / "smollm2"
    by_name = {c.name: c for c in CONTENDERS}
    for name, race_name in RACE_NAMES.items():
        mine, theirs = cache / "smollm2" / f"{name}.json", race / f"{race_name}.json"
        if theirs.is_file() and not mine.is_file():
            c = by_name[name]
            mine.parent.mkdir(parents=True, exist_ok=True)
            mine.write_text(json.dumps({**json.loads(theirs.read_text()), "name": c.name, "family": c.family, "label": c.label}, indent=1))


def comparison(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per codebook row: its KL against the best uniform GPTQ row (with or without the
    clipping search) at that width."""
    lines = ["| bits | best uniform GPTQ | its KL | codebook | codebook KL | change |", "|---|---|---:|---|---:|---:|"]
    for b in (4, 3):
        uniform = [r for r in (rows.get(f"gptq-{b}b-g64"), rows.get(f"gptq-clip-{b}b-g64")) if r]
        for t in ("nl", "layer", "iq4nl", "nl-asym", "nl-asymauto"):
            cb = rows.get(f"gptq-codebook-{b}b-g32-{t}")
            if uniform and cb:
                best = min(uniform, key=lambda r: r["kl_mean"])
                change = cb["kl_mean"] / best["kl_mean"] - 1
                lines.append(
                    f"| {cb['block_bpw']:.2f} | {best['label']} | {best['kl_mean']:.4f} | {t} | {cb['kl_mean']:.4f} | {100 * change:+.1f} % |"
                )
    return lines


VQ_ROWS = ("gptq-vq-8x4-rot", "gptq-vq-8x4-rot-refit", "vq-8x4-rot")


def peers_below_three_bits(cache: Path) -> list[dict[str, Any]]:
    """The cached rows of ``peers.py`` (the same harness) under 3 bits per block weight: every 2-bit
    uniform result (matpress RTN / GPTQ, hqq, torchao, llama.cpp Q2_K), the 2-bit VQ rows' opponents."""
    folder = cache.parent / "peers" / "smollm2"
    # the budget's measurement caches (measure-*.json) are not contenders' rows
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.name.startswith("measure-")] if folder.is_dir() else []
    return sorted((r for r in rows if r["block_bpw"] < 3.0), key=lambda r: r["kl_mean"])


def two_bit_comparison(rows: dict[str, dict[str, Any]], peers: list[dict[str, Any]]) -> list[str]:
    """The VQ rows against every cached 2-bit row of ``peers.py``, best first."""
    vq = [rows[n] for n in VQ_ROWS if n in rows]
    if not vq:
        return []
    lines = ["At ~2 bits: the VQ rows against every result under 3 bits cached by `peers.py` (same harness).", "",
             "| contender | bits/weight, block linears | KL to fp32 |", "|---|---:|---:|"]
    for r in sorted(vq + peers, key=lambda r: r["kl_mean"]):
        lines.append(f"| {r['label']} | {r['block_bpw']:.3f} | {r['kl_mean']:.4f} |")
    return lines + [""]


def report(
    rows: list[dict[str, Any]], not_run: list[str], n_windows: int, seq_len: int, argv: Optional[list[str]],
    peers: list[dict[str, Any]],
) -> str:
    table = ["| contender | bits/weight, block linears | perplexity | KL to fp32 | time s |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (round(r["block_bpw"], 1), r["family"] != "gptq", r["family"], r["kl_mean"])):
        table.append(f"| {r['label']} | {r['block_bpw']:.3f} | {r['perplexity']:.2f} | {r['kl_mean']:.4f} | {r['seconds']:.1f} |")
    reference = rows[0]["reference_perplexity"] if rows else float("nan")
    return "\n".join([
        "# Codebooks against uniform grids: SmolLM2-135M-Instruct",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}, shared with other jobs (times are noisy)",
        "",
        "The harness of `peers.py`: the 210 block linears compressed, embeddings / LM head and norms fp32; "
        f"KL to the fp32 model and perplexity on {n_windows} windows of {seq_len} tokens of the evaluation split "
        f"(reference perplexity {reference:.2f}); calibration {CALIBRATION_WINDOWS} windows of {CALIBRATION_LEN} tokens "
        "of the calibration split. GPTQ rows: act-order and randomized Hadamard rotation (seed 0) on both sides. "
        "Bits: the stored bytes of the formats (codes, fp16 scales, zeros for int, the fp16 table, the rotation's signs).",
        "",
        *comparison({r["name"]: r for r in rows}),
        "",
        *two_bit_comparison({r["name"]: r for r in rows}, peers),
        *table,
        "",
        *([f"Not run yet: {', '.join(not_run)}.", ""] if not_run else []),
    ])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here")
    add_cache_arguments(parser, "codebook")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="contenders to run (default: all missing)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in CONTENDERS}
    unknown = sorted(set(args.only or ()) - set(by_name))
    if unknown:
        parser.error(f"unknown contenders {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.only] if args.only else CONTENDERS
    borrow_race_rows(args.cache)
    rows, not_run = cached_contenders(args, CONTENDERS, chosen, Path("out/codebook"))
    publish(report(rows, not_run, args.windows, args.seq_len, argv, peers_below_three_bits(args.cache)), args.out)


if __name__ == "__main__":
    main()
