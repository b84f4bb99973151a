"""Packed low-bit matmul on the CPU: matpress kernels against torch dense and torch's low-bit kernels.

For each weight shape (out x in) and batch (activation rows), times ``x @ W.T`` with fp32 activations
for: torch dense fp32 and bf16, ``torch._weight_int8pack_mm`` (int8 per channel),
``torch._weight_int4pack_mm_for_cpu`` (int4, groups of 128), and matpress ``int`` 8/4/3/2-bit (groups
of 128, asymmetric; 64 where the width is not a multiple of 128), ``ternary`` (per channel) and
``codebook`` 4-bit g32 on the ``iq4nl`` table (the lookup kernel) through ``matpress.kernels.matmul``. Honest timing:
all contenders interleaved in one run, medians of repeats, the same threads; every contender rotates
through enough distinct copies of its weights (> 1 GB) that none stays in the last-level cache, so each
call reads its weights from memory as token-by-token decoding does. Effective GB/s = weight bytes read
per call / time, next to the streaming read bandwidth measured in the same run.

End to end: single-token forward latency of SmolLM2-135M-Instruct (``make smollm2``; its block linears
and its tied embedding / LM head RTN 4-bit g64, as a 4-bit GGUF quantizes them; groups of 64 because its
576 input columns are not a multiple of 128) and of the embedded all-MiniLM-L6-v2 (one sentence, every
linear layer RTN 4-bit g128), against fp32, the caches flushed before every call.

Each shape's timings, the bandwidth and each end-to-end model are cached (``harness.ResultCache``): a
rerun measures only what is missing (``--force``: all).

    flock /tmp/matpress-heavy.lock python benchmarks/kernel_speed.py --out benchmarks/results/kernels.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

import matpress
from matpress import kernels
from matpress.evaluation.text import sentences
from matpress.evaluation.timing import command_line, interleaved_medians, machine_description, publish
from matpress.formats import CodebookFormat, Format, IntFormat, TernaryFormat
from matpress.kernels import build, lowbit
from matpress.models import MINILM, SMOLLM2, load_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import EMBEDDING, ResultCache, add_cache_arguments  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336)]  # (out_features, in_features)
BATCHES = [1, 4, 16]
GROUP = 128
PASS_SECONDS = 0.25


def shape_of(text: str) -> tuple[int, int]:
    """An ``OUTxIN`` option value as ``(out, in)``."""
    out_f, in_f = (int(v) for v in text.split("x"))
    return out_f, in_f


def weight_copies(tensors: Iterable[torch.Tensor], pool_bytes: float) -> int:
    """How many copies of ``tensors`` fill ``pool_bytes`` (at least 2, so that calls alternate)."""
    return max(2, math.ceil(pool_bytes / sum(t.numel() * t.element_size() for t in tensors)))


def layout_copy(layout: lowbit.LowbitLayout) -> lowbit.LowbitLayout:
    """The kernel layout with its own copies of its tensors, to be read from memory apart from the others."""
    return dataclasses.replace(
        layout, codes=layout.codes.clone(), scales=layout.scales.clone(), zeros=layout.zeros.clone(),
        levels=None if layout.levels is None else layout.levels.clone(),
    )


class Contender:
    """One way to compute ``x @ W.T``: a pool of weight copies and the call on copy ``i``; ``around``
    (if given) is called with True before and False after each timed pass, outside the timing (a
    thread pool woken for its pass and paused after it)."""

    def __init__(
        self, name: str, nbytes: int, copies: int, call: Callable[[int, torch.Tensor], torch.Tensor],
        around: Optional[Callable[[bool], None]] = None,
    ):
        self.name, self.nbytes, self.copies, self.call, self.around = name, nbytes, copies, call, around


def dense(name: str, w: torch.Tensor, pool_bytes: float) -> Contender:
    pool = [w.clone() for _ in range(weight_copies([w], pool_bytes))]
    return Contender(name, w.numel() * w.element_size(), len(pool),
                     lambda i, x: torch.nn.functional.linear(x.to(w.dtype), pool[i]))


def torch_int8(w: torch.Tensor, pool_bytes: float) -> Contender:
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    pool = [(q.clone(), scale.clone()) for _ in range(weight_copies([q, scale], pool_bytes))]
    return Contender("torch int8 (per channel)", q.numel() + 4 * scale.numel(), len(pool),
                     lambda i, x: torch._weight_int8pack_mm(x, *pool[i]))


def torch_int4(w: torch.Tensor, pool_bytes: float) -> Contender:
    out_f, in_f = w.shape
    g = w.view(out_f, in_f // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale[..., None] + zero[..., None]), 0, 15).to(torch.int32).view(out_f, in_f)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    # torch's int4 convention: w = (q - 8) * scale + offset, stored as (in / group, out, 2)
    scale_offset = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
    pool = [(packed.clone(), scale_offset.clone()) for _ in range(weight_copies([packed, scale_offset], pool_bytes))]
    return Contender("torch int4 g128", packed.numel() + 4 * scale_offset.numel(), len(pool),
                     lambda i, x: torch._weight_int4pack_mm_for_cpu(x, pool[i][0], GROUP, pool[i][1]))


def ours(name: str, fmt: Format, pool_bytes: float) -> Contender:
    layout = lowbit.layout_of(fmt)
    parts = [layout.codes, layout.scales, layout.zeros] + ([] if layout.levels is None else [layout.levels])
    pool = []
    for _ in range(weight_copies(parts, pool_bytes)):
        # the format object is shared state-free; each copy gets its own kernel layout in memory
        f = copy.copy(fmt)
        setattr(f, lowbit.LAYOUT_ATTR, layout_copy(layout))
        pool.append(f)
    return Contender(name, sum(t.numel() * t.element_size() for t in parts), len(pool),
                     lambda i, x: kernels.matmul(pool[i], x))


def streaming_bandwidth(repeats: int) -> float:
    """Read bandwidth in GB/s: torch sum over 1 GiB of fp32 (well above the last-level cache)."""
    big = torch.ones(2**28)
    return big.numel() * 4 / interleaved_medians({"sum": big.sum}, repeats, warmup=1)["sum"] / 1e9


def time_contenders(contenders: list[Contender], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call; each repeat runs every contender in turn over its copies. A contender
    slower than PASS_SECONDS per pass (compute bound: torch's low-bit kernels at batch > 1) uses fewer
    copies, at least 2, which can only favour it."""
    def around(c: Contender, running: bool) -> None:
        if c.around is not None:
            c.around(running)

    used = {}
    for c in contenders:
        around(c, True)
        start = time.perf_counter()
        c.call(0, x)
        used[c.name] = min(c.copies, max(2, math.ceil(PASS_SECONDS / (time.perf_counter() - start))))
        around(c, False)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(repeats + 1):  # the first pass warms up (and is dropped)
        for c in contenders:
            around(c, True)
            start = time.perf_counter()
            for i in range(used[c.name]):
                c.call(i, x)
            if r:
                times[c.name].append((time.perf_counter() - start) / used[c.name])
            around(c, False)
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_rows(shape: tuple[int, int], batches: list[int], repeats: int, pool_bytes: float, torch_lowbit: bool = True) -> list[dict]:
    out_f, in_f = shape
    group = GROUP if in_f % GROUP == 0 else 64  # SmolLM2's 576 columns: groups of 64
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    contenders = [dense("dense fp32", w, pool_bytes), dense("dense bf16", w.bfloat16(), pool_bytes)]
    if torch_lowbit and group == GROUP:
        contenders += [torch_int8(w, pool_bytes), torch_int4(w, pool_bytes)]
    for bits in (8, 4, 3, 2):
        contenders.append(ours(f"matpress int{bits} g{group}", IntFormat.encode(w, bits=bits, group_size=group), pool_bytes))
    contenders.append(ours("matpress ternary", TernaryFormat.encode(w), pool_bytes))
    contenders.append(ours("matpress codebook4 g32 iq4nl", CodebookFormat.encode(w, bits=4, group_size=32, table="iq4nl"), pool_bytes))
    rows = [{"shape": f"{out_f}x{in_f}", "name": c.name, "MB": c.nbytes / 1e6} for c in contenders]
    for batch in batches:
        x = torch.randn(batch, in_f)
        medians = time_contenders(contenders, x, repeats)
        for row, c in zip(rows, contenders):
            row[f"s{batch}"] = medians[c.name]
            row[f"ratio{batch}"] = medians["dense fp32"] / medians[c.name]
    del contenders
    return rows


def flush_caches(buffer: torch.Tensor) -> None:
    buffer.add_(1)  # read and write 1 GiB: evicts the weights from every cache level


# (model, recipe, label): SmolLM2's tied embedding is its LM head, so the rule on it makes the head 4-bit too
END_TO_END = [
    (SMOLLM2, {"default": {"method": "rtn", "bits": 4, "group_size": 64}, "rules": [{"pattern": EMBEDDING, "method": "rtn", "bits": 4, "group_size": 64}]},
     "int4 g64 (tied embedding / LM head too)"),
    (MINILM, {"default": {"method": "rtn", "bits": 4, "group_size": GROUP}, "exclude": ["*embed*"]}, f"int4 g{GROUP}"),
]


def end_to_end(name: str, recipe: dict, label: str, repeats: int) -> dict:
    """fp32 and 4-bit ms of one forward (one token for SmolLM2, one sentence for MiniLM), the speed-up
    and the compressed layers' MB."""
    buffer = torch.zeros(2**28)
    loaded = load_pretrained(name)
    if name == SMOLLM2:
        inputs, what = {"input_ids": torch.tensor([[17]])}, "SmolLM2-135M-Instruct, 1 token"
    else:
        inputs = loaded.tokenizer(sentences(1), return_tensors="pt")
        what = f"all-MiniLM-L6-v2, 1 sentence ({inputs['input_ids'].shape[1]} tokens)"
    model = loaded.model.eval()
    quantized = copy.deepcopy(model)
    report = matpress.compress(quantized, recipe, progress=False)
    times: dict[str, list[float]] = {"fp32": [], "int4": []}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for key, m in (("fp32", model), ("int4", quantized)):
                flush_caches(buffer)
                start = time.perf_counter()
                m(**inputs)
                if r:
                    times[key].append(time.perf_counter() - start)
    fp32, int4 = (statistics.median(times[k]) for k in ("fp32", "int4"))
    return {"model": what, "config": label, "fp32_ms": fp32 * 1e3, "int4_ms": int4 * 1e3, "speedup": fp32 / int4,
            "MB": report.nbytes / 1e6}


def markdown(rows: list[dict], batches: list[int], bandwidth: float, e2e, pool_gb: float, command: str) -> str:
    lines = [
        "# Packed low-bit matmul on the CPU",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description()}  ",
        f"Kernel build: {build.ISA_NAMES[lowbit.load_library().isa()]} "
        "(compiled at first use with -O3 -march=native)  ",
        f"Streaming read bandwidth (torch sum over 1 GiB, same threads): **{bandwidth:.1f} GB/s**",
        "",
        "`x @ W.T`, fp32 activations, weights read from memory on every call (each contender rotates "
        f"through >= {pool_gb:g} GB of weight copies); median ms per call, speed-up over dense fp32 in the same run, "
        f"and effective GB/s of weight bytes (codes + scales + zeros as the kernel reads them) at batch {batches[0]}.",
        *([] if len(batches) and max(batches) <= 16 else [
            "",
            "Batches above 16 are the prefill and batched-embedding case (issue 14: every width at least as fast "
            "as fp32 at 16 to 512 rows); torch's own int8 / int4 kernels, per-token kernels hundreds of times "
            "slower there, are left out of such runs.",
        ]),
        "",
        "| shape (out x in) | kernel | weight MB | "
        + " | ".join(f"batch {b} ms | x fp32" for b in batches)
        + f" | GB/s (batch {batches[0]}) |",
        "|---|---|---:|" + "---:|---:|" * len(batches) + "---:|",
    ]
    for row in rows:
        cells = " | ".join(f"{row[f's{b}'] * 1e3:.3f} | {row[f'ratio{b}']:.2f}" for b in batches)
        gbs = row["MB"] * 1e6 / row[f"s{batches[0]}"] / 1e9
        lines.append(f"| {row['shape']} | {row['name']} | {row['MB']:.1f} | {cells} | {gbs:.1f} |")
    if e2e:
        lines += [
            "",
            "## End to end: one forward, caches flushed before each call",
            "",
            "| model | matpress 4-bit | fp32 ms | matpress 4-bit ms | speed-up | 4-bit layers MB |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['model']} | {r['config']} | {r['fp32_ms']:.2f} | {r['int4_ms']:.2f} | {r['speedup']:.2f} | {r['MB']:.1f} |" for r in e2e]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ratios = [next((r[f"ratio{batch}"] for r in rows if r["shape"] == s and r["name"] == name), 0.0) for s in shapes]
        ax.bar([i + j * width for i in range(len(shapes))], ratios, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes)
    ax.set_ylabel(f"speed-up over dense fp32 (batch {batch})")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_ylim(0, 1.3 * max(r[f"ratio{batch}"] for r in rows))
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    ax.set_title(f"x @ W.T, {batch} activation row{'s' if batch > 1 else ''}, weights from memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here (and a PNG next to it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pool-gb", type=float, default=1.0, help="weight copies per contender, GB")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end models")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="activation rows per call")
    parser.add_argument("--no-torch-lowbit", action="store_true", help="leave out torch's int8 / int4 kernels (slow at large batches)")
    add_cache_arguments(parser, "kernels")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [shape_of(s) for s in args.shapes.split(",")]
    cache = ResultCache(args, f"threads{args.threads}", lambda: None)

    bandwidth = cache.get("bandwidth", lambda _: {"GBps": streaming_bandwidth(args.repeats)})
    rows = []
    for o, i in shapes:
        key = f"shape-{o}x{i}" + ("" if args.batches == BATCHES else "-b" + "-".join(map(str, args.batches)))
        key += "-no-torch-lowbit" if args.no_torch_lowbit else ""
        shape = cache.get(key, lambda _, o=o, i=i: {"rows": kernel_rows(
            (o, i), args.batches, args.repeats, args.pool_gb * 1e9, torch_lowbit=not args.no_torch_lowbit)})
        rows += shape["rows"] if shape else []
    e2e = [] if args.no_e2e else cache.rows([
        (f"e2e-{name}", lambda _, name=name, recipe=recipe, label=label: end_to_end(name, recipe, label, args.repeats))
        for name, recipe, label in END_TO_END
    ])
    text = markdown(rows, args.batches, bandwidth["GBps"] if bandwidth else float("nan"), e2e, args.pool_gb, command_line(argv))
    text += "\n".join(["", *cache.not_run()])
    publish(text, args.out)
    if args.out and rows:
        plot(rows, args.out.with_suffix(".png"), args.batches[0])


if __name__ == "__main__":
    main()
