"""Honest timing on a shared machine: side-by-side ratios, medians of interleaved repeats."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch


def machine_description() -> str:
    """CPU model (with its family and model numbers where /proc/cpuinfo has them: a virtual machine may
    call every generation of a vendor's CPUs by one name), core count, torch version and threads, for
    benchmark headers."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    if "model name" in fields:
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# Environment variables that choose which instruction set the kernels (matpress's, torch's, MKL's,
# oneDNN's) run: part of how a benchmark was run when set.
ISA_VARIABLES = ("MATPRESS_KERNEL_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """How this benchmark was run, for its header: the instruction-set variables that are set, ``python``,
    the script and its arguments (``argv``, default the command line's), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    settings = [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if os.environ.get(name)]
    return " ".join(shlex.quote(a) for a in [*settings, "python", sys.argv[0], *args])


def publish(text: str, out: Optional[Union[str, Path]]) -> None:
    """Print a benchmark's Markdown result and, when ``out`` is given, write it there (creating the folder)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in turn within each repeat, so that slow
    phases of a shared machine hit every contender alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
