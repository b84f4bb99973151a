"""Checkpoints: ``save(model, dir)`` / ``load(dir)``.

A checkpoint directory holds ``model.safetensors`` (every tensor of the model; a compressed layer's
stored tensors under ``<layer>.<key>``) and ``matpress.json``, the manifest: format version, the
recipe, each compressed layer's format, shape, config and tensor shapes (a compressed embedding's
entry also has ``kind: embedding``, its padding index and the LM heads tied to it, which store nothing), the
fused MoE experts modules stored unfused (``experts``: name -> class; their expert matrices are linear
layers ``<module>.gate_up_proj.<e>``, see :mod:`matpress.experts`), the base model's class and
config and where it came from, and the size and SHA-256 of the tensor file. Loading checks all of it
and fails with the file and layer named rather than build a silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from matpress import __version__
from matpress.errors import CheckpointError, FormatError
from matpress.experts import unfuse_recorded, unfused_experts
from matpress.formats import Format, format_class
from matpress.layer import CompressedEmbedding, CompressedLinear, FormatModule, TiedLinear
from matpress.model_pass import find_embeddings, find_linear_layers, linear_weight, set_submodule, tied_to
from matpress.models import load_tokenizer_from

FORMAT_VERSION = 1
MANIFEST = "matpress.json"
TENSORS = "model.safetensors"
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool,
)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias another one (tied embeddings); return kept tensors and alias -> kept."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = t.detach().contiguous().cpu()
    return kept, aliases


def save(
    model: nn.Module,
    directory: Union[str, Path],
    tokenizer: Any = None,
    recipe: Any = None,
    source: Optional[str] = None,
) -> Path:
    """Write ``model`` (with its compressed layers) to ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases = _dedupe_shared(model.state_dict())
    layers = {}
    heads = tied_to(model)
    for name, m in model.named_modules():
        if isinstance(m, FormatModule) and not isinstance(m, TiedLinear):
            stored = m.fmt.to_tensors()
            layers[name] = {
                "format": m.format_name,
                "description": m.fmt.describe(),
                "shape": list(m.fmt.shape),
                "config": m.format_config,
                "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in stored.items()},
            }
            if isinstance(m, CompressedEmbedding):
                layers[name].update(embedding_entry(m, heads.get(name, [])))
            else:
                layers[name]["bias"] = m.bias is not None
    save_file(state, str(directory / TENSORS), metadata={"producer": f"matpress {__version__}"})
    config = getattr(model, "config", None)
    manifest = {
        "format_version": FORMAT_VERSION,
        "matpress_version": __version__,
        "base_model": {
            "class": type(model).__name__,
            "source": source or getattr(config, "_name_or_path", None) or None,
            "config": config.to_dict() if config is not None and hasattr(config, "to_dict") else None,
            "init_kwargs": getattr(model, "matpress_init_kwargs", {}),
        },
        "recipe": recipe.to_dict() if hasattr(recipe, "to_dict") else recipe,
        "layers": layers,
        "experts": unfused_experts(model),
        "tied": aliases,
        "files": {TENSORS: {"bytes": (directory / TENSORS).stat().st_size, "sha256": _sha256(directory / TENSORS)}},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def stored_nbytes(entry: dict[str, Any]) -> int:
    """Bytes a manifest layer entry's stored tensors take."""
    total = 0
    for meta in entry["tensors"].values():
        n = 1
        for s in meta["shape"]:
            n *= int(s)
        total += n * torch.empty(0, dtype=DTYPE_NAMES[meta["dtype"]]).element_size()
    return total


def read_manifest(directory: Union[str, Path]) -> dict[str, Any]:
    """Read and check a checkpoint's manifest (version and required fields)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {directory} is not a matpress checkpoint (save one with matpress.save)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the manifest is corrupted") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported by matpress {__version__} "
            f"(it reads version {FORMAT_VERSION}); use the matpress version that wrote it"
        )
    for key in ("base_model", "layers", "files", "tied"):
        if key not in manifest:
            raise CheckpointError(f"{path}: manifest lacks the field {key!r}")
    return manifest


def _read_tensors(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / TENSORS
    expected = manifest["files"].get(TENSORS)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if expected is None:
        raise CheckpointError(f"{directory / MANIFEST}: no entry for {TENSORS} under 'files'")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{path} holds {size} bytes, the manifest says {expected['bytes']}: the file is truncated or was replaced"
        )
    if _sha256(path) != expected["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match the manifest: the file was modified or corrupted")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read as safetensors: {e}") from None


def _build_base_model(manifest: dict[str, Any], path: Path) -> nn.Module:
    import transformers

    base = manifest["base_model"]
    cls = getattr(transformers, str(base.get("class")), None)
    if cls is None or base.get("config") is None:
        raise CheckpointError(
            f"{path}: the base model {base.get('class')!r} is not a transformers model class; "
            "pass the model skeleton: matpress.load(dir, model=YourModel(...))"
        )
    config = cls.config_class.from_dict(base["config"])
    init_kwargs = base.get("init_kwargs") or {}
    model = cls(config, **init_kwargs)
    model.matpress_init_kwargs = init_kwargs
    return model


def embedding_entry(embedding: CompressedEmbedding, heads: list[str]) -> dict[str, Any]:
    """What the manifest records for a compressed embedding beyond its format: its kind, padding
    index, and the LM heads that share its stored matrix (which store nothing of their own)."""
    return {"kind": "embedding", "padding_idx": embedding.padding_idx, "tied_heads": list(heads)}


def install_embedding(
    model: nn.Module, name: str, fmt: Format, entry: dict[str, Any], where: str, linears: dict[str, nn.Module]
) -> None:
    """Put the stored embedding ``name`` and the LM heads tied to it (among the model's ``linears``) in place."""
    heads = entry.get("tied_heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise CheckpointError(f"{where}: 'tied_heads' must be a list of layer names, got {heads!r}")
    padding_idx = entry.get("padding_idx")
    if padding_idx is not None and (not isinstance(padding_idx, int) or not 0 <= padding_idx < fmt.out_features):
        raise CheckpointError(f"{where}: padding_idx {padding_idx!r} is not a row of the {fmt.out_features}-row embedding")
    embedding = CompressedEmbedding(fmt, padding_idx)
    set_submodule(model, name, embedding)
    for head in heads:
        layer = linears.get(head)
        if layer is None or tuple(linear_weight(layer).shape) != fmt.shape or getattr(layer, "bias", None) is not None:
            raise CheckpointError(
                f"{where}: tied head {head} is not a bias-free linear layer of shape {fmt.shape} in the model"
            )
        set_submodule(model, head, TiedLinear(embedding))


def load(directory: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a model saved with :func:`save`.

    For transformers models the architecture is rebuilt from the manifest; for any other module pass
    a freshly constructed ``model`` with the same architecture, which is filled in place.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    mpath = directory / MANIFEST
    tensors = _read_tensors(directory, manifest)
    if model is None:
        model = _build_base_model(manifest, mpath)
    unfuse_recorded(model, manifest.get("experts", {}), str(mpath))
    linears = find_linear_layers(model)
    embeddings = find_embeddings(model)
    consumed: set[str] = set()
    for name, entry in manifest["layers"].items():
        where = f"{mpath}, layer {name}"
        try:
            shape = tuple(int(s) for s in entry["shape"])
            fmt_cls = format_class(entry["format"])
            config = entry["config"]
            kind = entry.get("kind", "linear")
        except (KeyError, TypeError, ValueError, FormatError, AttributeError) as e:
            raise CheckpointError(f"{where}: malformed layer entry ({e})") from None
        if kind not in ("linear", "embedding"):
            raise CheckpointError(f"{where}: unknown layer kind {kind!r}; this matpress reads 'linear' and 'embedding'")
        layer = (linears if kind == "linear" else embeddings).get(name)
        if layer is None:
            raise CheckpointError(f"{where}: the model has no {kind} layer of that name")
        model_shape = tuple((linear_weight(layer) if kind == "linear" else layer.weight).shape)
        if model_shape != shape:
            raise CheckpointError(f"{where}: manifest shape {shape} does not match the model's layer {model_shape}")
        stored = {}
        for key, meta in entry.get("tensors", {}).items():
            full = f"{name}.{key}"
            t = tensors.get(full)
            if t is None:
                raise CheckpointError(f"{where}: tensor {full} is missing from {directory / TENSORS}")
            if list(t.shape) != list(meta["shape"]) or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
                raise CheckpointError(
                    f"{where}: tensor {key} is {tuple(t.shape)} {t.dtype} in the file but {tuple(meta['shape'])} "
                    f"{meta['dtype']} in the manifest"
                )
            stored[key] = t
            consumed.add(full)
        try:
            fmt = fmt_cls.from_tensors(shape, config, stored)
        except FormatError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if kind == "embedding":
            install_embedding(model, name, fmt, entry, where, linears)
            continue
        bias = None
        if entry.get("bias"):
            bias = tensors.get(f"{name}.bias")
            if bias is None or tuple(bias.shape) != (shape[0],):
                raise CheckpointError(f"{where}: bias is missing or has the wrong shape")
            consumed.add(f"{name}.bias")
        set_submodule(model, name, CompressedLinear(fmt, bias))
    rest = {k: v for k, v in tensors.items() if k not in consumed}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if k not in consumed and k not in manifest["tied"]]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory / TENSORS} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for alias in manifest["tied"]:  # tied weights: make sure the tie survived (HF models re-tie on build)
        if alias in result.missing_keys and hasattr(model, "tie_weights"):
            model.tie_weights()
            break
    model.eval()
    return model


def load_tokenizer(directory: Union[str, Path], trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a checkpoint, or None. A tokenizer that ships code is refused unless
    ``trust_remote_code``."""
    return load_tokenizer_from(Path(directory), trust_remote_code)
