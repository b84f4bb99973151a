"""GGUF export: does the exported file compute what matpress computes?

Exports of SmolLM2-135M-Instruct (its linear layers of the 30 blocks compressed; embedding / tied head and
norms fp32 as matpress leaves them): GPTQ 4-bit groups of 64 symmetric -> Q4_0, RTN 4-bit g64
asymmetric -> Q4_1, RTN 8-bit g64 symmetric -> Q8_0, GPTQ on the Q4_K grid (its 1536-wide down
projections Q4_K, the 576-wide layers llama.cpp's fallback Q5_0), and a budget mix (the knapsack
choosing per layer among Q4_0, Q5_0, Q8_0, Q4_K and Q6_K grids under 5 bits per weight), and 4-bit
codebooks on llama.cpp's IQ4_NL levels in groups of 32 -> IQ4_NL, by GPTQ (with act-order; not rotated,
as a rotation has no GGUF counterpart) and by round-to-nearest. And a
random-init Llama whose widths are multiples of 256 (hidden 512, MLP 1536, 4 blocks, SmolLM2's
tokenizer), every linear layer and the tied embedding on one K-quant grid, Q2_K to Q6_K in turn.

Each export: compress with ``matpress.compress``, save, ``matpress.export(..., to="gguf")``, then load the
file through transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) and, when the
``llama_cpp`` package is importable (run this script with ``.venv-peers/bin/python``), through llama.cpp
itself. Each runtime's next-token distributions on ``--windows`` held-out windows of ``--seq-len`` tokens
(the evaluation split of ``pydoc_data.topics``) are compared with matpress's own, from the loaded
checkpoint: top-1 agreement and the mean per-token KL(matpress || runtime), once with matpress's CPU
kernels (which round activations to int8 per block, as llama.cpp does; the ``kquant`` and ``codebook`` formats
have none yet and multiply by their decoded weight either way) and once with its reference matmul (the decoded fp32
weights, what transformers multiplies by).

Each export's rows are cached as ``benchmarks/results/cache/export_gguf/<model>/<name>.json`` (committed);
a run computes the missing ones and stops starting new ones after ``--minutes``:

    flock /tmp/matpress-heavy.lock env PYTHONPATH=$PWD/src /work/main/.venv-peers/bin/python benchmarks/export_gguf.py \
        --out benchmarks/results/export_gguf.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import matpress
from matpress.evaluation import token_windows
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.formats.kquant import KQUANTS
from matpress.kernels import build
from matpress.models import SMOLLM2, from_pretrained, load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ResultCache, add_cache_arguments  # noqa: E402

RANDOM_LLAMA = "random-llama"
# the budget mix's candidates: grids GGUF holds exactly (Q4_0, Q5_0, Q8_0 in groups of 32; Q4_K, Q6_K)
GGUF_CANDIDATES = [
    {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True},
    {"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True},
    {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True},
    {"method": "rtn", "kquant": "q4_k"},
    {"method": "rtn", "kquant": "q6_k"},
]
EXPORTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (model, recipe)
    "gptq-4b-g64-sym": (SMOLLM2, {"default": {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True}}),
    "rtn-4b-g64-asym": (SMOLLM2, {"default": {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}}),
    "rtn-8b-g64-sym": (SMOLLM2, {"default": {"method": "rtn", "bits": 8, "group_size": 64, "symmetric": True}}),
    "gptq-q4_k": (SMOLLM2, {"default": {"method": "gptq", "kquant": "q4_k"}}),
    "budget-5bpw-gguf-grids": (SMOLLM2, {"budget": "5bpw", "candidates": GGUF_CANDIDATES}),
    "gptq-codebook-iq4nl-g32-act-order": (
        SMOLLM2, {"default": {"method": "gptq_codebook", "bits": 4, "group_size": 32, "table": "iq4nl", "act_order": True}}
    ),
    "codebook-iq4nl-g32": (SMOLLM2, {"default": {"method": "codebook", "bits": 4, "group_size": 32, "table": "iq4nl"}}),
    # each runtime's own disagreement, with no quantized block at all
    "dense-f32-smollm2": (SMOLLM2, {"default": {"method": "dense", "dtype": "fp32"}}),
    "dense-f32": (RANDOM_LLAMA, {"default": {"method": "dense", "dtype": "fp32"}}),
    **{
        f"rtn-{k}": (RANDOM_LLAMA, {"default": {"method": "rtn", "kquant": k}, "rules": [{"pattern": "*embed_tokens", "method": "rtn", "kquant": k}]})
        for k in sorted(KQUANTS)
    },
}


def random_llama(folder: Path, tokenizer: Any) -> Path:
    """A random-init Llama with every width a multiple of 256 and SmolLM2's tokenizer, saved under ``folder``.
    Its weights' std (0.2) makes its next-token distributions peaked (mean top probability about 0.3) rather
    than near uniform, so the KL compares distributions that say something."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.config.architectures = [type(model).__name__]
    source = folder / RANDOM_LLAMA
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    return source


@torch.inference_mode()
def log_probs(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``(windows, seq_len, vocab)`` of one runtime, window by window."""
    return torch.stack([F.log_softmax(logits_of(w).float(), dim=-1) for w in windows])


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean per-token KL(reference || candidate) of two sets of log-probabilities."""
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean()
    kl = (reference.exp() * (reference - candidate)).sum(-1).mean()
    return {"top1": float(top1), "kl": float(kl)}


def torch_logits(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda window: model(window.unsqueeze(0)).logits[0]


def llama_cpp_logits(path: Path, seq_len: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(str(path), n_ctx=seq_len, logits_all=True, n_threads=torch.get_num_threads(), verbose=False)

    def logits(window: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(window.tolist())
        return torch.tensor(llm.scores[: len(window)])

    return logits


def rounded_activations(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``x`` rounded to 8 bits per run of ``block`` values along its last dimension (step max|x| / 127),
    as llama.cpp rounds the activations it multiplies K-quant blocks by (its Q8_K)."""
    runs = x.reshape(-1, block)
    step = runs.abs().amax(dim=-1, keepdim=True) / 127
    step = torch.where(step == 0, torch.ones_like(step), step)
    return (torch.round(runs / step) * step).reshape(x.shape)


def activation_rounding_control(source: str, windows: torch.Tensor) -> dict[str, Any]:
    """How far the uncompressed fp32 model's own predictions move when the input of every linear layer is
    rounded as llama.cpp rounds it (:func:`rounded_activations`): the part of a runtime's disagreement that
    no export can remove. A chaotic model (the random Llama) magnifies it."""
    model = load_pretrained(source).model.eval()
    reference = log_probs(torch_logits(model), windows)
    hooks = [m.register_forward_pre_hook(lambda m, args: (rounded_activations(args[0]),)) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        rounded = log_probs(torch_logits(model), windows)
    finally:
        for hook in hooks:
            hook.remove()
    return {"rows": [{
        "export": "none (fp32)", "model": "SmolLM2-135M" if source == SMOLLM2 else "random Llama 512/1536", "block types": "F32",
        "size": 0, "runtime": "the same model, every linear input rounded to 8 bits per 256 (control)",
        "matpress matmul": "reference (fp32)", "max_added": 0.0, **agreement(reference, rounded),
    }]}


def with_kernels(enabled: bool, run: Callable[[], Any]) -> Any:
    if enabled:
        return run()
    with build.switched_off():
        return run()


def measure(name: str, source: str, recipe: dict[str, Any], work: Path, windows: torch.Tensor, seq_len: int) -> dict[str, Any]:
    import transformers

    loaded = load_pretrained(source)
    start = time.perf_counter()
    matpress.compress(loaded.model, recipe, tokenizer=loaded.tokenizer)
    compress_seconds = time.perf_counter() - start
    checkpoint = matpress.save(loaded.model, work / name, tokenizer=loaded.tokenizer)
    start = time.perf_counter()
    report = matpress.export(checkpoint, work / f"{name}.gguf")
    export_seconds = time.perf_counter() - start
    types = sorted({t.type_name for t in report.tensors if len(t.shape) == 2 and t.type_name != "F32"})
    model = matpress.load(checkpoint)
    ours = {kernels: with_kernels(kernels, lambda: log_probs(torch_logits(model), windows)) for kernels in (True, False)}
    runtimes = {
        "transformers GGUF loader": from_pretrained(
            transformers.AutoModelForCausalLM, work, gguf_file=f"{name}.gguf", dtype=torch.float32
        ).eval()
    }
    rows = []
    common = {
        "export": name, "model": "SmolLM2-135M" if source == SMOLLM2 else "random Llama 512/1536", "block types": ", ".join(types), "size": (work / f"{name}.gguf").stat().st_size,
        "compress_s": compress_seconds, "export_s": export_seconds,
        "max_added": max(t.max_error for t in report.tensors),
    }
    theirs = {"transformers GGUF loader": log_probs(torch_logits(runtimes["transformers GGUF loader"]), windows)}
    llama = llama_cpp_logits(work / f"{name}.gguf", seq_len)
    if llama is not None:
        theirs["llama.cpp (llama-cpp-python)"] = log_probs(llama, windows)
    for runtime, candidate in theirs.items():
        for kernels, reference in ours.items():
            rows.append({**common, "runtime": runtime, "matpress matmul": KERNELS if kernels else "reference (fp32)", **agreement(reference, candidate)})
    (work / f"{name}.gguf").unlink()
    return {"rows": rows, "fallbacks": sum("falls back" in n for n in report.notes)}


KERNELS = "kernels"  # rows cached before this name say "kernels (int8 activations)", shown as this


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | export | GGUF block types | file MB | runtime | matpress matmul | top-1 agreement | KL(matpress ‖ runtime) | largest added weight error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['export']} | {r['block types']} | {r['size'] / 1e6:.1f} | {r['runtime']} | {KERNELS if r['matpress matmul'].startswith(KERNELS) else r['matpress matmul']} "
            f"| {r['top1']:.4f} | {r['kl']:.2e} | {r['max_added']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Markdown file to write (default: print)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", nargs="*", choices=sorted(EXPORTS), help="run only these exports")
    add_cache_arguments(parser, "export_gguf")
    args = parser.parse_args(argv)
    rows, not_run = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def subject(model: str) -> Callable[[], dict[str, Any]]:
            def load() -> dict[str, Any]:
                tokenizer = load_pretrained(SMOLLM2).tokenizer
                source = SMOLLM2 if model == SMOLLM2 else str(random_llama(work, tokenizer))
                return {"source": source, "windows": token_windows(tokenizer, corpus(EVALUATION), args.seq_len, args.windows)}
            return load

        caches = {model: ResultCache(args, model, subject(model)) for model in (SMOLLM2, RANDOM_LLAMA)}
        for name in args.only or EXPORTS:
            model, recipe = EXPORTS[name]
            result = caches[model].get(name, lambda s, name=name, recipe=recipe: measure(name, s["source"], recipe, work, s["windows"], args.seq_len))
            if result is not None:
                rows += result["rows"]
        control = caches[RANDOM_LLAMA].get("activation-rounding-control", lambda s: activation_rounding_control(s["source"], s["windows"]))
        if control is not None:
            rows += control["rows"]
        for cache in caches.values():
            not_run += cache.not_run()
    llama_note = (
        "llama.cpp rows come from the `llama_cpp` package (llama-cpp-python) in this interpreter."
        if any(r["runtime"].startswith("llama.cpp") for r in rows)
        else "llama.cpp was not run: the `llama_cpp` package is not importable in this interpreter (run the script with `.venv-peers/bin/python`)."
    )
    text = "\n".join([
        "# GGUF export: the exported file against matpress's own logits",
        "",
        f"{args.windows} held-out windows of {args.seq_len} tokens (evaluation split of `pydoc_data.topics`). SmolLM2-135M: "
        "the linear layers of the 30 blocks compressed, the tied embedding / LM head and the norms fp32 (F32 in the file); "
        "the budget mix chooses per layer among the Q4_0, Q5_0, Q8_0 (groups of 32), Q4_K and Q6_K grids (RTN) under 5 bits "
        "per weight of the block linears; the iq4nl rows put them on 4-bit codebooks of llama.cpp's IQ4_NL levels, an fp16 "
        "scale per 32 columns (GPTQ with act-order, or round-to-nearest), exported as IQ4_NL. Random Llama: hidden 512, MLP 1536, 4 blocks, 8 heads (4 KV), SmolLM2's "
        "tokenizer, random init (std 0.2), every linear layer and the tied embedding on one K-quant grid. "
        "KL is the mean per-token KL(matpress ‖ runtime) of the next-token distributions; the largest added weight "
        "error is what the export itself changed (0 for Q4_0 / Q5_0 / Q8_0, IQ4_NL and the K-quants: bit-exact; the fp16 "
        "rounding of the block minimum for Q4_1). Against matpress's reference matmul the transformers rows multiply by "
        "the same fp32 weights; against its compiled kernels they differ by the kernels' rounding only: at these 128-token "
        "windows on a CPU with AVX-512 BF16 or AMX the kernels decode the weights to bf16 and multiply bf16 activations, "
        "elsewhere they round activations to int8 per block (the K-quant layers have no kernel yet and multiply by the "
        "decoded weight; the codebook layers run the lookup kernel). "
        "llama.cpp multiplies quantized blocks by activations it rounds to 8 bits itself; the control row measures what "
        "that rounding alone does to the uncompressed random Llama, whose random weights make it chaotic (small input "
        "changes grow through its blocks), so its llama.cpp rows can agree no better than that. " + llama_note,
        "",
        table(rows),
        "",
        *not_run,
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
