"""GGUF export of SmolLM2-135M-Instruct: does the exported file compute what matpress computes?

For each export (GPTQ 4-bit groups of 64 symmetric -> Q4_0, RTN 4-bit g64 asymmetric -> Q4_1, RTN 8-bit
g64 symmetric -> Q8_0; the linear layers of the 30 blocks, embedding / tied head and norms fp32 as
matpress leaves them): compress with ``matpress.compress``, save, ``matpress.export(..., to="gguf")``,
then load the file through transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``) and, when
the ``llama_cpp`` package is importable (run this script with ``.venv-peers/bin/python``), through
llama.cpp itself. Each runtime's next-token distributions on ``--windows`` held-out windows of
``--seq-len`` tokens (the evaluation split of ``pydoc_data.topics``) are compared with matpress's own,
from the loaded checkpoint: top-1 agreement and the mean per-token KL(matpress || runtime), once with
matpress's CPU kernels (which round activations to int8 per block, as llama.cpp does) and once with
its reference matmul (the decoded fp32 weights, what transformers multiplies by).

    flock /tmp/matpress-heavy.lock .venv/bin/python benchmarks/export_gguf.py --out benchmarks/results/export_gguf.md
"""

from __future__ import annotations

import argparse
import os
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
from matpress.models import SMOLLM2, from_pretrained, load_pretrained

EXPORTS = {  # name -> (recipe default rule, the GGUF type its layers map onto)
    "gptq-4b-g64-sym": ({"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True}, "Q4_0"),
    "rtn-4b-g64-asym": ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}, "Q4_1"),
    "rtn-8b-g64-sym": ({"method": "rtn", "bits": 8, "group_size": 64, "symmetric": True}, "Q8_0"),
}


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


def with_kernels(enabled: bool, run: Callable[[], Any]) -> Any:
    previous = os.environ.get("MATPRESS_KERNELS")
    os.environ["MATPRESS_KERNELS"] = "1" if enabled else "0"
    try:
        return run()
    finally:
        if previous is None:
            del os.environ["MATPRESS_KERNELS"]
        else:
            os.environ["MATPRESS_KERNELS"] = previous


def measure(name: str, rule: dict[str, Any], work: Path, windows: torch.Tensor, seq_len: int) -> list[dict[str, Any]]:
    import transformers

    loaded = load_pretrained(SMOLLM2)
    start = time.perf_counter()
    matpress.compress(loaded.model, {"default": rule}, tokenizer=loaded.tokenizer)
    compress_seconds = time.perf_counter() - start
    checkpoint = matpress.save(loaded.model, work / name, tokenizer=loaded.tokenizer)
    start = time.perf_counter()
    report = matpress.export(checkpoint, work / f"{name}.gguf")
    export_seconds = time.perf_counter() - start
    types = sorted({t.type_name for t in report.tensors if t.source.startswith("model.layers.") and len(t.shape) == 2})
    model = matpress.load(checkpoint)
    ours = {kernels: with_kernels(kernels, lambda: log_probs(torch_logits(model), windows)) for kernels in (True, False)}
    runtimes = {
        "transformers GGUF loader": from_pretrained(
            transformers.AutoModelForCausalLM, work, gguf_file=f"{name}.gguf", dtype=torch.float32
        ).eval()
    }
    rows = []
    common = {
        "export": name, "block types": ", ".join(types), "size": (work / f"{name}.gguf").stat().st_size,
        "compress_s": compress_seconds, "export_s": export_seconds,
        "max_added": max(t.max_error for t in report.tensors),
    }
    theirs = {"transformers GGUF loader": log_probs(torch_logits(runtimes["transformers GGUF loader"]), windows)}
    llama = llama_cpp_logits(work / f"{name}.gguf", seq_len)
    if llama is not None:
        theirs["llama.cpp (llama-cpp-python)"] = log_probs(llama, windows)
    for runtime, candidate in theirs.items():
        for kernels, reference in ours.items():
            rows.append({**common, "runtime": runtime, "matpress matmul": "kernels (int8 activations)" if kernels else "reference (fp32)", **agreement(reference, candidate)})
    (work / f"{name}.gguf").unlink()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| export | GGUF block types | file MB | runtime | matpress matmul | top-1 agreement | KL(matpress ‖ runtime) | largest added weight error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['export']} | {r['block types']} | {r['size'] / 1e6:.1f} | {r['runtime']} | {r['matpress matmul']} "
            f"| {r['top1']:.4f} | {r['kl']:.2e} | {r['max_added']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Markdown file to write (default: print)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", nargs="*", choices=sorted(EXPORTS), help="run only these exports")
    args = parser.parse_args(argv)
    tokenizer = load_pretrained(SMOLLM2).tokenizer
    windows = token_windows(tokenizer, corpus(EVALUATION), args.seq_len, args.windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or EXPORTS:
            rows += measure(name, EXPORTS[name][0], Path(tmp), windows, args.seq_len)
    llama_note = (
        "llama.cpp rows come from the `llama_cpp` package (llama-cpp-python) in this interpreter."
        if any(r["runtime"].startswith("llama.cpp") for r in rows)
        else "llama.cpp was not run: the `llama_cpp` package is not importable in this interpreter (run the script with `.venv-peers/bin/python`)."
    )
    text = "\n".join([
        "# GGUF export of SmolLM2-135M-Instruct: the exported file against matpress's own logits",
        "",
        f"{len(windows)} held-out windows of {args.seq_len} tokens (evaluation split of `pydoc_data.topics`); the linear "
        "layers of the 30 blocks compressed, the tied embedding / LM head and the norms fp32 (F32 in the file). "
        "KL is the mean per-token KL(matpress ‖ runtime) of the next-token distributions; the largest added weight "
        "error is what the export itself changed (0 for Q4_0 / Q8_0: bit-exact; the fp16 rounding of the block "
        "minimum for Q4_1). Against matpress's reference matmul the transformers rows multiply by the same fp32 "
        "weights; against its kernels (int8 activations) they differ by that activation rounding only. " + llama_note,
        "",
        table(rows),
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
