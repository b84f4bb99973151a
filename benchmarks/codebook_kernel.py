"""Codebook GEMV on the CPU: matpress's lookup kernel against its uniform int4 kernel and ggml's IQ4_NL.

For each weight shape (out x in; SmolLM2-135M's block matrices and LM head, and two Llama-7B-sized
ones) and batch (activation rows), times ``x @ W.T`` with fp32 activations for:

- matpress ``codebook`` 4-bit, groups of 32, the ``iq4nl`` table (IQ4_NL's grid: 4.5 bits), through the
  lookup kernel, and with groups of 64 (``nl``, 4.25 bits);
- matpress ``int`` 4-bit symmetric g32 (Q4_0's grid, 4.5 bits) and asymmetric g64 (4.5 bits): the
  uniform kernel at the same bits;
- ggml's ``mul_mat`` on IQ4_NL and Q4_0 tensors (quantized by ggml from the same fp32 weights), called
  through ``benchmarks/native/ggml_gemv.cpp`` against the ggml of the peers' llama.cpp build (``make
  peers-env``) with one persistent thread pool: ggml's own CPU kernels as a plain graph runs them (its
  activations rounded to Q8_0; not the repacked layouts llama.cpp's model loader may choose);
- dense fp32 (``torch.nn.functional.linear``).

All contenders interleaved in one run, medians of repeats, the same threads; each rotates through
copies of its weights totalling ``--pool-mb`` (beyond the last-level cache), as token-by-token
decoding reads them (``kernels.time_contenders``).

    flock /tmp/matpress-heavy.lock .venv/bin/python benchmarks/codebook_kernel.py --out benchmarks/results/codebook_kernel.md
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from matpress.evaluation.timing import command_line, machine_description, publish
from matpress.formats import CodebookFormat, IntFormat
from matpress.kernels import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GGML_HEADERS, LLAMA_BIN  # noqa: E402
from kernel_speed import Contender, dense, ours, shape_of, time_contenders, weight_copies  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (4096, 4096), (11008, 4096)]
BATCHES = [1, 4, 16]
GGML_TYPE_IDS = {"Q4_0": 2, "IQ4_NL": 20, "TQ2_0": 35}  # ggml_type values (ggml.h)
GGML_TYPES = ("IQ4_NL", "Q4_0")  # the peers of this benchmark
SHIM = Path(__file__).resolve().parent / "native" / "ggml_gemv.cpp"
UNIFORM = "matpress int4 g32 sym"


def load_ggml(bin_dir: Path, headers: Path, work: Path) -> Optional[ctypes.CDLL]:
    """The shim built against the peers' ggml, or None (with the reason printed) where it is not there."""
    if not (bin_dir / "libggml-cpu.so").is_file() or not (headers / "ggml.h").is_file():
        print(f"no ggml build under {bin_dir} (make peers-env): ggml rows left out", file=sys.stderr)
        return None
    work.mkdir(parents=True, exist_ok=True)
    lib_path = work / "ggml_gemv.so"
    lib_dir = str(bin_dir.resolve())
    subprocess.run(
        ["g++", "-O2", "-shared", "-fPIC", f"-I{headers}", str(SHIM), f"-L{lib_dir}", "-lggml-base", "-lggml-cpu",
         "-lggml", f"-Wl,-rpath,{lib_dir}", "-o", str(lib_path)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.gemv_new.restype = ctypes.c_void_p
    lib.gemv_new.argtypes = [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.gemv_run.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.gemv_pause.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.gemv_output.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.gemv_weight_bytes.restype = ctypes.c_size_t
    lib.gemv_weight_bytes.argtypes = [ctypes.c_int] * 3
    lib.gemv_free.argtypes = [ctypes.c_void_p]
    return lib


class GgmlContender(Contender):
    """ggml's mul_mat on ``type_name`` tensors of ``w``, for the fixed activations ``x`` (ggml's graph
    holds its input); checked against ``x @ w.T`` once (a 4-bit grid's error, not a wrong result).
    ``repack``: the weights in ggml's CPU_REPACK buffer, as llama.cpp's model loader keeps them."""

    def __init__(self, lib: ctypes.CDLL, type_name: str, w: torch.Tensor, x: torch.Tensor, pool_bytes: float,
                 repack: bool = False):
        n, k = w.shape
        self.lib, type_id = lib, GGML_TYPE_IDS[type_name]
        nbytes = lib.gemv_weight_bytes(type_id, n, k)
        copies = weight_copies([torch.empty(nbytes, dtype=torch.uint8)], pool_bytes)
        self.handle = lib.gemv_new(type_id, n, k, x.shape[0], copies, w.data_ptr(), x.contiguous().data_ptr(),
                                   torch.get_num_threads(), int(repack))
        if not self.handle:
            raise RuntimeError(f"ggml could not allocate {copies} copies of a {n}x{k} {type_name} matrix"
                               + (" in its CPU_REPACK buffer (a ggml built without it?)" if repack else ""))
        type_name = f"{type_name} repacked" if repack else type_name
        super().__init__(f"ggml {type_name}", nbytes, copies, lambda i, _x: lib.gemv_run(self.handle, i),
                         lambda running: lib.gemv_pause(self.handle, 0 if running else 1))
        lib.gemv_pause(self.handle, 0)
        lib.gemv_run(self.handle, 0)
        lib.gemv_pause(self.handle, 1)
        y = torch.empty(x.shape[0], n)
        lib.gemv_output(self.handle, 0, y.data_ptr())
        reference = x @ w.T
        relative = float((y - reference).norm() / reference.norm())
        if relative > 0.2:
            raise RuntimeError(f"ggml {type_name} gives {relative:.3f} relative error on {n}x{k}: not a 4-bit grid's")

    def close(self) -> None:
        self.lib.gemv_free(self.handle)


def shape_rows(shape: tuple[int, int], batches: list[int], repeats: int, pool_bytes: float, ggml: Optional[ctypes.CDLL]) -> list[dict]:
    out_f, in_f = shape
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    ours_contenders = [
        dense("dense fp32", w, pool_bytes),
        ours(UNIFORM, IntFormat.encode(w, bits=4, group_size=32, symmetric=True), pool_bytes),
        ours("matpress int4 g64", IntFormat.encode(w, bits=4, group_size=64), pool_bytes),
        ours("matpress codebook4 g32 iq4nl", CodebookFormat.encode(w, bits=4, group_size=32, table="iq4nl"), pool_bytes),
        ours("matpress codebook4 g64 nl", CodebookFormat.encode(w, bits=4, group_size=64, table="nl"), pool_bytes),
    ]
    rows: dict[str, dict] = {}
    for batch in batches:
        x = torch.randn(batch, in_f)
        peers = [GgmlContender(ggml, t, w, x, pool_bytes) for t in GGML_TYPES] if ggml else []
        contenders = ours_contenders + peers
        medians = time_contenders(contenders, x, repeats)
        for c in contenders:
            row = rows.setdefault(c.name, {"shape": f"{out_f}x{in_f}", "name": c.name, "MB": c.nbytes / 1e6})
            row[f"us{batch}"] = medians[c.name] * 1e6
            row[f"vs_uniform{batch}"] = medians[UNIFORM] / medians[c.name]
            row[f"vs_fp32_{batch}"] = medians["dense fp32"] / medians[c.name]
            row[f"vs_iq4nl{batch}"] = medians["ggml IQ4_NL"] / medians[c.name] if ggml else float("nan")
        for p in peers:
            p.close()
    return list(rows.values())


def markdown(rows: list[dict], batches: list[int], pool_mb: float, argv: Optional[list[str]], ggml: bool) -> str:
    head = "| shape | kernel | weight MB | " + " | ".join(f"batch {b} µs | x int4 g32 | x fp32" for b in batches) + " | x ggml IQ4_NL (batch 1) |"
    table = [head, "|---|---|---:|" + "---:|---:|---:|" * len(batches) + "---:|"]
    for r in rows:
        cells = " | ".join(f"{r[f'us{b}']:.1f} | {r[f'vs_uniform{b}']:.2f} | {r[f'vs_fp32_{b}']:.2f}" for b in batches)
        table.append(f"| {r['shape']} | {r['name']} | {r['MB']:.2f} | {cells} | {r['vs_iq4nl1']:.2f} |")
    lookup = [r for r in rows if r["name"] == "matpress codebook4 g32 iq4nl"]
    summary = []
    if lookup:
        for b in batches:
            summary.append(
                f"- batch {b}: codebook4 g32 iq4nl / int4 g32 sym, median over shapes **{statistics.median(r[f'vs_uniform{b}'] for r in lookup):.2f}x** "
                f"(min {min(r[f'vs_uniform{b}'] for r in lookup):.2f}x); against dense fp32 median {statistics.median(r[f'vs_fp32_{b}'] for r in lookup):.2f}x"
                + (f"; against ggml IQ4_NL median {statistics.median(r[f'vs_iq4nl{b}'] for r in lookup):.2f}x (min {min(r[f'vs_iq4nl{b}'] for r in lookup):.2f}x)" if ggml else "")
            )
    header = [
        "# Codebook GEMV: the lookup kernel against the uniform int4 kernel and ggml's IQ4_NL",
        "",
        f"Command: `{command_line(argv)}`  ",
        f"Machine: {machine_description()}  ",
        f"matpress: {build.kernel_path()}; ggml: {'the peers build (make peers-env), its CPU backend as built for this CPU' if ggml else 'not built (make peers-env)'}",
        "",
        f"`x @ W.T`, fp32 activations, every contender rotating through {pool_mb:.0f} MB of weight copies (read from memory on every call); "
        "median µs per call over interleaved repeats, and the ratio of the other kernel's time to this one's (above 1: this one is faster). "
        "x ggml IQ4_NL: ggml's mul_mat on the same weights quantized by ggml to IQ4_NL, at batch 1.",
        "",
    ]
    return "\n".join(header + summary + [""] + table) + "\n"


def ggml_gemv_parser(description: str, batches: list[int], work: str) -> argparse.ArgumentParser:
    """The options of the GEMV benchmarks against ggml (this one and ggml_gemv.py); ``--shapes`` defaults
    to None, for ``shape_pairs`` to fill with the benchmark's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the markdown here")
    parser.add_argument("--pool-mb", type=float, default=256.0, help="weight bytes each contender rotates through")
    parser.add_argument("--shapes", nargs="+", help="OUTxIN shapes (default: the benchmark's own)")
    parser.add_argument("--batches", nargs="+", type=int, default=batches)
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="folder with libggml*.so (make peers-env)")
    parser.add_argument("--ggml-headers", type=Path, default=GGML_HEADERS)
    parser.add_argument("--work", type=Path, default=Path(work))
    return parser


def shape_pairs(values: Optional[list[str]], default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``--shapes`` as (out, in) pairs, or ``default`` where none were given."""
    return [shape_of(s) for s in values] if values else default


def main(argv: Optional[list[str]] = None) -> None:
    args = ggml_gemv_parser(__doc__.split("\n\n")[0], BATCHES, "out/codebook_kernel").parse_args(argv)
    shapes = shape_pairs(args.shapes, SHAPES)
    ggml = load_ggml(args.llama_bin, args.ggml_headers, args.work)
    rows = []
    for shape in shapes:
        rows += shape_rows(shape, args.batches, args.repeats, args.pool_mb * 1e6, ggml)
        print(f"{shape[0]}x{shape[1]} done", file=sys.stderr)
    publish(markdown(rows, args.batches, args.pool_mb, argv, ggml is not None), args.out)


if __name__ == "__main__":
    main()
