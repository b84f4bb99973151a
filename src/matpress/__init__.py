"""matpress: compress the weight matrices of neural networks.

Public API: :func:`compress`, :func:`save`, :func:`load`, :func:`evaluate`, :func:`export`, :class:`Recipe`,
:class:`CalibrationData`.
"""

__version__ = "0.1.0"

from matpress.errors import CalibrationError, CheckpointError, FormatError, MatpressError, RecipeError  # noqa: E402
from matpress.evaluation import evaluate  # noqa: E402
from matpress.export import export  # noqa: E402
import functools  # noqa: E402
from typing import Any  # noqa: E402

from torch.nn import Module  # noqa: E402

from matpress import hf, passes  # noqa: E402,F401 (hf: registers matpress checkpoints with transformers' from_pretrained)
from matpress.io import keep_save_pretrained_true, load, save  # noqa: E402
from matpress.nn import CompressedEmbedding, CompressedLinear  # noqa: E402
from matpress.passes import CompressionReport  # noqa: E402
from matpress.recipe import Recipe, Rule  # noqa: E402
from matpress.walk import CalibrationData  # noqa: E402

@functools.wraps(passes.compress)
def compress(model: Module, recipe: Any = None, *args: Any, **kwargs: Any) -> CompressionReport:
    report = passes.compress(model, recipe, *args, **kwargs)
    keep_save_pretrained_true(model)  # transformers' own would write a directory that reloads with random weights
    return report


__all__ = [
    "CalibrationData",
    "CalibrationError",
    "CheckpointError",
    "CompressedEmbedding",
    "CompressedLinear",
    "CompressionReport",
    "FormatError",
    "MatpressError",
    "Recipe",
    "RecipeError",
    "Rule",
    "compress",
    "evaluate",
    "export",
    "load",
    "save",
]
