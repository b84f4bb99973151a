"""transformers integration: after ``import matpress``, ``AutoModel*.from_pretrained(dir)`` (and so
``pipeline(model=dir)``) on a matpress checkpoint returns the compressed model.

:func:`matpress.save` writes a transformers model's ``config.json`` into the checkpoint with a
``quantization_config`` whose ``quant_method`` is ``matpress``; transformers looks that method up among
the quantizers registered with it, and this module registers one. Before transformers reads the
weights, the quantizer verifies the checkpoint as :func:`matpress.load` does and puts its compressed
layers in place in the model transformers has built from the config, so that every stored tensor,
packed codes and scales included, has a parameter or buffer of its name; transformers then reads them
all by name. Afterwards each compressed layer's format is rebuilt on the tensors transformers read.
The compressed layers' tensors are read twice (by the check and by transformers) and held twice until
then: the peak is up to the checkpoint's size above :func:`matpress.load`'s. The registration waits
until transformers imports its quantizers (see :data:`QUANTIZERS`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from torch import nn

from matpress.errors import CheckpointError
from matpress.io import install_compressed_layers, keep_save_pretrained_true
from matpress.nn.layers import FormatModule

QUANT_METHOD = "matpress"
# where transformers keeps its quantizers; importing it imports every quantizer transformers ships
# (1.5 s here), so matpress registers when something imports it (from_pretrained does), not before
QUANTIZERS = "transformers.quantizers.auto"


def drop_ties_matpress_holds(model: nn.Module) -> None:
    """Forget the weight ties transformers would make (``all_tied_weights_keys``, target -> source) whose
    parameters a compressed layer replaced: an LM head tied to a compressed embedding shares its stored
    format (:class:`matpress.nn.TiedLinear`), and has no weight to tie."""

    def has_parameter(module: nn.Module, name: str) -> bool:
        try:
            module.get_parameter(name)
        except AttributeError:
            return False
        return True

    for module in model.modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for target, source in list(tied.items()):
                if not (has_parameter(module, target) and has_parameter(module, source)):
                    del tied[target]


def register(auto: ModuleType) -> None:
    """Register matpress's quantization config and quantizer in transformers' ``auto`` module."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class MatpressConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a matpress checkpoint's ``config.json``."""

        def __init__(self, format_version: Any = None, **kwargs: Any):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version

    class MatpressQuantizer(HfQuantizer):
        """Loads matpress checkpoints; it compresses nothing itself (``matpress.compress`` does)."""

        requires_calibration = True  # transformers then refuses to quantize a model on the fly with it

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            pass

        def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None, **kwargs: Any) -> None:
            if not checkpoint_files:
                raise CheckpointError("a matpress checkpoint is read from its directory; transformers gave no checkpoint file")
            install_compressed_layers(model, Path(checkpoint_files[0]).parent)
            drop_ties_matpress_holds(model)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            for module in model.modules():
                if isinstance(module, FormatModule):
                    module.refresh_format()
            keep_save_pretrained_true(model)
            return model

        def is_serializable(self) -> bool:
            return False  # save_pretrained writes a matpress checkpoint instead (matpress.io.keep_save_pretrained_true)

        @property
        def is_trainable(self) -> bool:
            return False

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:  # once per process, even if matpress is reloaded
        auto.register_quantization_config(QUANT_METHOD)(MatpressConfig)
        auto.register_quantizer(QUANT_METHOD)(MatpressQuantizer)


class RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds :data:`QUANTIZERS` once, as Python would, and registers matpress in it right after it runs."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_and_register(module: ModuleType) -> None:
            run(module)
            register(module)

        spec.loader.exec_module = run_and_register  # type: ignore[method-assign]
        return spec


def config_class() -> type:
    """matpress's quantization config class, as registered with transformers (importing it if need be)."""
    return importlib.import_module(QUANTIZERS).AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]


if QUANTIZERS in sys.modules:
    register(sys.modules[QUANTIZERS])
elif not any(isinstance(f, RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, RegisterOnImport())
