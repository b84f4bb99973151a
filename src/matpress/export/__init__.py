"""Exporting a matpress checkpoint to files other runtimes load: ``export(checkpoint, out, to="gguf")``
(llama.cpp, ollama, transformers' GGUF loader; :mod:`matpress.export.gguf`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from matpress.errors import MatpressError, quote
from matpress.export.gguf import ExportReport, export_gguf

TARGETS = {"gguf": export_gguf}


def export(checkpoint: Union[str, Path], out: Union[str, Path], to: str = "gguf", **options: Any) -> ExportReport:
    """Write the model of matpress ``checkpoint`` to ``out`` in the format ``to`` (``"gguf"``); ``options``
    go to that target (GGUF: ``allow_requantize``, ``force``, ``expect_digest``). Returns what was written,
    tensor by tensor."""
    if to not in TARGETS:
        raise MatpressError(f"export target {quote(to)} is unknown; choose one of {sorted(TARGETS)}")
    return TARGETS[to](checkpoint, out, **options)


__all__ = ["ExportReport", "TARGETS", "export"]
