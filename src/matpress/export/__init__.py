"""Exporting a matpress checkpoint to files other runtimes load: ``export(checkpoint, out, to=...)`` with
``to="gguf"`` (one file for llama.cpp, ollama, transformers' GGUF loader; :mod:`matpress.export.gguf`) or
``to="compressed-tensors"`` (a directory for vLLM and transformers; :mod:`matpress.export.compressed_tensors`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Union

from matpress.errors import MatpressError, quote
from matpress.export.compressed_tensors import export_compressed_tensors
from matpress.export.gguf import export_gguf
from matpress.export.tensors import ExportReport

TARGETS = {"gguf": export_gguf, "compressed-tensors": export_compressed_tensors}


def export(checkpoint: Union[str, Path], out: Union[str, Path], to: str = "gguf", **options: Any) -> ExportReport:
    """Write the model of matpress ``checkpoint`` to ``out`` in the format ``to`` (``"gguf"`` or
    ``"compressed-tensors"``); ``options`` go to that target (both: ``force``, ``expect_digest``; GGUF also
    ``allow_requantize``). Returns what was written, tensor by tensor."""
    if to not in TARGETS:
        raise MatpressError(f"export target {quote(to)} is unknown; choose one of {sorted(TARGETS)}")
    target = TARGETS[to]
    taken = set(inspect.signature(target).parameters) - {"checkpoint", "out"}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise MatpressError(f"export to {to} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(taken))}")
    return target(checkpoint, out, **options)


__all__ = ["ExportReport", "TARGETS", "export"]
