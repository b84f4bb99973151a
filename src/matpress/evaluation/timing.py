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
    """CPU model, core count, torch version and threads, for benchmark headers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """How this benchmark was run, for its header: ``python``, the script and its arguments (``argv``,
    default the command line's), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", sys.argv[0], *args])


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
