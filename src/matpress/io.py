"""Checkpoints: ``save(model, dir)``, ``load(dir)`` and ``read_checkpoint(dir)``.

A checkpoint directory holds ``model.safetensors`` (every tensor of the model; a compressed layer's
stored tensors under ``<layer>.<key>``), ``matpress.json`` (the manifest, see
:mod:`matpress.manifest`: format version, recipe, each compressed layer's kind, format, shape, config
and tensor shapes (a compressed embedding's entry also has its padding index and the LM heads tied to
it, which store nothing), the fused MoE experts modules stored unfused (``experts``: name -> class, see
:mod:`matpress.nn.experts`), the base model's class, config and source, and the size and SHA-256 of every
other file), and optionally the tokenizer's files and ``sensitivity.json``.

What reading verifies (:func:`read_checkpoint`, used by ``load``, ``matpress info`` and ``report``):

1. the manifest is a regular file no larger than a checkpoint of this many tensors needs, valid
   UTF-8 JSON without duplicate keys, at most 32 levels deep, and fits the schema;
2. the tensor file is a readable safetensors file whose metadata records the manifest's *body
   digest* (SHA-256 of the canonical manifest without ``files``), and that digest matches: an edit
   of the manifest alone is detected;
3. every file under ``files`` (the tensor file included) has the recorded size and SHA-256: an edit
   of any other file alone is detected. There is no chicken-and-egg: the tensor file records a digest
   of the manifest *without* ``files``, and only ``files`` records digests of the other files;
4. every tensor the manifest lists is in the tensor file with that shape and dtype;
5. with ``expect_digest``, the *checkpoint digest* (SHA-256 of the canonical whole manifest, which
   through ``files`` covers every byte of every file) equals the published one. Editing several files
   consistently (re-signing them) is only detected this way: a digest proves a checkpoint is the one
   that was published, not who made it.

``load`` then builds the base model's skeleton on the meta device (bounded: it stops once the model
registers more modules and tensors than the checkpoint can account for), compares every parameter's
and buffer's shape with the stored tensors before anything is allocated, builds it again with its
parameters on the meta device and its buffers real, and assigns the stored tensors (no random init,
no copy). Formats validate their index tensors in ``from_tensors``.

``save`` is a transaction: everything is written into a fresh directory beside the target, which is
renamed into place only when complete (an earlier checkpoint there is renamed aside first and deleted
after); any failure, KeyboardInterrupt included, removes the new directory and leaves the target as it
was. The target must be absent, empty or an earlier matpress checkpoint (which is replaced whole),
unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import struct
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from tqdm.auto import tqdm

from matpress import __version__
from matpress.atomic import fresh_dir, staged_dir
from matpress.errors import CheckpointError, FormatError, MatpressError, quote
from matpress.formats import Format, format_class
from matpress.inputs import read_file
from matpress.manifest import (
    BODY_DIGEST_KEY, FORMAT_VERSION, INDEX, MANIFEST, MAX_MANIFEST_BYTES, RESAVE, TENSORS, body_digest,
    checkpoint_digest, file_name, max_manifest_bytes, normalize_digest, parse_manifest,
)
from matpress.models import load_tokenizer_from
from matpress.nn.experts import unfuse_recorded, unfused_experts
from matpress.nn.layers import CompressedEmbedding, CompressedLinear, FormatModule, TiedLinear
from matpress.nn.layout import find_embeddings, find_linear_layers, linear_weight, set_submodule, tied_to
from matpress.walk.source import (
    StoredTensor, parameters_on_meta, read_header, source_of, stored_dtype_name, tensor_bytes,
)

HF_CONFIG = "config.json"  # written for transformers models: from_pretrained reads the checkpoint (matpress.hf)
MAX_SHARD_BYTES = 2 << 30  # checkpoints bigger than this are written as shards with an index
MAX_INDEX_BYTES = 64 << 20
COPY_CHUNK = 16 << 20
# Buffers that are not saved (RoPE frequencies, position ids) may take at most this many elements
# beyond all stored ones; anything more is a config inflated to allocate.
UNSAVED_BUFFER_ALLOWANCE = 1 << 20
FREE_SPACE_MARGIN = 1 << 20


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose manifest, digests and tensor list were verified by :func:`read_checkpoint`."""

    directory: Path
    manifest: dict[str, Any]
    digest: str  # the checkpoint digest
    stored: dict[str, StoredTensor]  # tensor name -> where it lies, its shape and dtype, from the file headers

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    @property
    def sharded(self) -> bool:
        return INDEX in self.manifest["files"]

    @property
    def tensor_path(self) -> Path:
        """The tensor file, or a sharded checkpoint's index."""
        return self.directory / (INDEX if self.sharded else TENSORS)


# -- reading --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """What the manifest's ``files`` records for one file: its size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _regular_file(path: Path, what: str) -> os.stat_result:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; {RESAVE}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file; {what} must be one")
    return info


def _read_bounded(path: Path, limit: int, why: str, what: str = "the manifest") -> bytes:
    """The whole regular file ``path``, refused (before reading it) when larger than ``limit``, the
    bytes ``why`` (a checkpoint of so many tensors) needs."""
    return read_file(path, what, limit, CheckpointError, f"bytes {why}", RESAVE)


def _read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors of a checkpoint's safetensors file, from its header, and its metadata."""
    _regular_file(path, "the tensor file")
    return read_header(path, RESAVE, CheckpointError)


def _shape_and_dtype(tensor: StoredTensor) -> tuple[tuple[int, ...], str]:
    """A stored tensor's shape and dtype name as the manifest records them (torch's, without "torch.")."""
    return tensor.shape, str(tensor.dtype).removeprefix("torch.")


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A sharded checkpoint's index: tensor name -> shard file name, and its metadata."""
    data = _read_bounded(path, MAX_INDEX_BYTES, "an index of tensor names needs", "the shard index")
    try:
        index = json.loads(data)
        weight_map, metadata = index["weight_map"], index["metadata"]
        valid = isinstance(weight_map, dict) and isinstance(metadata, dict) and all(
            isinstance(v, str) for v in [*metadata.values(), *weight_map.values()]
        )
        for shard in set(weight_map.values()) if valid else ():
            file_name(shard, "shard")
    except Exception:  # invalid JSON, missing keys, wrong types, a shard name with a path in it
        valid = False
    if not valid or not weight_map:
        raise CheckpointError(f"{path} is not a valid shard index (a 'weight_map' of tensor name -> shard file and a 'metadata' object); {RESAVE}")
    return weight_map, metadata


def _read_shards(directory: Path, weight_map: dict[str, str], listed: dict[str, Any]) -> dict[str, StoredTensor]:
    """Tensor names, shapes and dtypes from every shard's header; each shard must be one of the
    ``listed`` (digested) files and hold exactly the tensors the index says."""
    stored: dict[str, StoredTensor] = {}
    for shard in sorted(set(weight_map.values())):
        if shard not in listed or shard in (INDEX, TENSORS, MANIFEST):
            raise CheckpointError(f"{directory / INDEX} names the shard {quote(shard)}, which the manifest does not list; {RESAVE}")
        found, _ = _read_header(directory / shard)
        if set(found) != {k for k, v in weight_map.items() if v == shard}:
            raise CheckpointError(f"{directory / shard} does not hold the tensors {directory / INDEX} lists for it; {RESAVE}")
        stored.update(found)
    return stored


def _check_listed_tensors(manifest: dict[str, Any], stored: dict[str, StoredTensor], mpath: Path, tpath: Path) -> None:
    """Every tensor the manifest names is in the tensor file, with the listed shape and dtype."""
    for name, entry in manifest["layers"].items():
        where = f"{mpath}, layer {name}"
        for key, meta in entry["tensors"].items():
            tensor = stored.get(f"{name}.{key}")
            if tensor is None:
                raise CheckpointError(f"{where}: tensor {name}.{key} is missing from {tpath}; {RESAVE}")
            found = _shape_and_dtype(tensor)
            if found != (tuple(meta["shape"]), meta["dtype"]):
                raise CheckpointError(
                    f"{where}: tensor {key} is {found[0]} {found[1]} in {tpath} but {tuple(meta['shape'])} "
                    f"{meta['dtype']} in the manifest; {RESAVE}"
                )
        if entry.get("bias"):
            bias = stored.get(f"{name}.bias")
            if bias is None or bias.shape != (entry["shape"][0],) or not bias.dtype.is_floating_point:
                raise CheckpointError(f"{where}: bias is missing or has the wrong shape or dtype in {tpath}; {RESAVE}")
    for alias, kept in manifest["tied"].items():
        if alias in stored or kept not in stored:
            raise CheckpointError(
                f"{mpath}: tied tensor {quote(alias)} must be absent from {tpath} and {quote(kept)} present; {RESAVE}"
            )


def read_checkpoint(directory: Union[str, Path], expect_digest: Optional[str] = None) -> Checkpoint:
    """Read and verify a checkpoint's manifest, digests and tensor list (module docstring, steps 1-5)."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not os.path.lexists(mpath):
        raise CheckpointError(f"{mpath} not found: {directory} is not a matpress checkpoint (save one with matpress.save)")
    expected = None if expect_digest is None else normalize_digest(expect_digest)
    sharded = os.path.lexists(directory / INDEX)
    if sharded:
        weight_map, metadata = _read_index(directory / INDEX)
    else:
        stored, metadata = _read_header(directory / TENSORS)
        weight_map = dict.fromkeys(stored, TENSORS)
    limit = max_manifest_bytes(len(weight_map))
    manifest = parse_manifest(_read_bounded(mpath, limit, f"a checkpoint of {len(weight_map)} tensors needs"), mpath)
    tpath = directory / (INDEX if sharded else TENSORS)
    if sharded != (INDEX in manifest["files"]):
        raise CheckpointError(f"{mpath} and {tpath} do not belong together: the manifest lists {INDEX if not sharded else TENSORS}; {RESAVE}")
    if sharded:
        stored = _read_shards(directory, weight_map, manifest["files"])
    if metadata.get(BODY_DIGEST_KEY) != body_digest(manifest):
        raise CheckpointError(
            f"{mpath} and {tpath} do not belong together: the manifest's SHA-256 differs from the one the tensor "
            f"file records, so one of them was modified or replaced; {RESAVE}"
        )
    for name, entry in manifest["files"].items():
        path = directory / name
        size = _regular_file(path, "every file of a checkpoint").st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path} holds {size} bytes, the manifest says {entry['bytes']}: the file is truncated or was replaced"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 does not match the manifest: the file was modified or corrupted")
    _check_listed_tensors(manifest, stored, mpath, tpath)
    digest = checkpoint_digest(manifest)
    if expected is not None and digest != expected:
        raise CheckpointError(
            f"{directory}: checkpoint digest sha256:{digest} is not the expected sha256:{expected}: this is a "
            "different checkpoint (modified, re-signed or replaced); get the one whose digest was published"
        )
    return Checkpoint(directory, manifest, digest, stored)


def stored_nbytes(entry: dict[str, Any]) -> int:
    """Bytes a (validated) manifest layer entry's stored tensors take."""
    total = 0
    for meta in entry["tensors"].values():
        n = 1
        for s in meta["shape"]:
            n *= s
        total += n * getattr(torch, meta["dtype"]).itemsize
    return total


# -- building the model ---------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@contextlib.contextmanager
def _registration_limit(limit: int, path: Path) -> Iterator[None]:
    """Stop a model's construction once it registers more than ``limit`` modules and tensors."""
    count = 0

    def hook(*args: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise CheckpointError(
                f"{path}: the base model's config builds more than {limit} modules and tensors, far more than the "
                f"checkpoint stores; the config was inflated; {RESAVE}"
            )

    handles = [
        torch_module.register_module_module_registration_hook(hook),
        torch_module.register_module_parameter_registration_hook(hook),
        torch_module.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _base_model_builder(checkpoint: Checkpoint) -> Callable[[], nn.Module]:
    import transformers

    base = checkpoint.manifest["base_model"]
    cls = getattr(transformers, base["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or base["config"] is None:
        raise CheckpointError(
            f"{checkpoint.manifest_path}: the base model {quote(base['class'])} is not a transformers model class; "
            "pass the model skeleton: matpress.load(dir, model=YourModel(...))"
        )

    def build() -> nn.Module:
        try:
            model = cls(cls.config_class.from_dict(base["config"]), **base["init_kwargs"])
        except CheckpointError:
            raise
        except Exception as e:  # a hostile config can make transformers raise anything
            raise CheckpointError(
                f"{checkpoint.manifest_path}: the base model {cls.__name__} cannot be built from the recorded config "
                f"({type(e).__name__}: {quote(str(e))}); {RESAVE}"
            ) from None
        model.matpress_init_kwargs = dict(base["init_kwargs"])
        return model

    return build


def _meta_skeleton(checkpoint: Checkpoint) -> nn.Module:
    """The base model (its experts unfused as stored) built wholly on the meta device, with no more
    registrations than the checkpoint could account for (a hostile config cannot make it build
    millions of modules)."""
    limit = 8 * (len(checkpoint.stored) + len(checkpoint.manifest["layers"])) + 1024
    with _registration_limit(limit, checkpoint.manifest_path), torch.device("meta"):
        return _unfused(_base_model_builder(checkpoint)(), checkpoint)


def _build_base_model(checkpoint: Checkpoint) -> nn.Module:
    """The base model with parameters on the meta device, after its shapes were checked on a meta skeleton."""
    _check_fits(_meta_skeleton(checkpoint), checkpoint)
    with parameters_on_meta():
        return _unfused(_base_model_builder(checkpoint)(), checkpoint)


def _unfused(model: nn.Module, checkpoint: Checkpoint) -> nn.Module:
    """``model`` after unfusing (in place) the experts modules the checkpoint stores unfused."""
    unfuse_recorded(model, checkpoint.manifest["experts"], str(checkpoint.manifest_path))
    return model


def _check_fits(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Every compressed layer replaces a layer of its kind and shape, and every other parameter and
    saved buffer of ``model`` has a stored tensor of its shape (and the same dtype, or both floating
    point), before any stored data is read."""
    manifest, stored = checkpoint.manifest, checkpoint.stored
    mpath, tpath = checkpoint.manifest_path, checkpoint.tensor_path
    found = {kind: layer_module.find(model) for kind, layer_module in LAYER_MODULES.items()}
    replaced: set[str] = set()
    consumed: set[str] = set()
    for name, entry in manifest["layers"].items():
        where = f"{mpath}, layer {name}"
        kind = LAYER_MODULES[entry["kind"]]
        module = found[entry["kind"]].get(name)
        if module is None:
            raise CheckpointError(f"{where}: the model has no {entry['kind']} layer of that name")
        model_shape = kind.shape(module)
        if model_shape != tuple(entry["shape"]):
            raise CheckpointError(f"{where}: manifest shape {tuple(entry['shape'])} does not match the model's layer {model_shape}")
        more_replaced, more_consumed = kind.fits(found, manifest["layers"], module, entry, where)
        replaced.update(f"{name}.{k}" for k in module.state_dict())
        replaced.update(more_replaced)
        consumed.update(f"{name}.{k}" for k in entry["tensors"])
        consumed.update(f"{name}.{k}" for k in more_consumed)
    state = model.state_dict()
    tied = manifest["tied"]
    expected = {k: t for k, t in state.items() if k not in replaced and k not in tied}
    present = set(stored) - consumed
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{tpath} does not fit the model: missing {quote(missing[:5])}, unexpected {quote(unexpected[:5])}; {RESAVE}"
        )
    for key, t in expected.items():
        shape, dtype = _shape_and_dtype(stored[key])
        model_dtype = str(t.dtype).removeprefix("torch.")
        if shape != tuple(t.shape) or (stored[key].dtype != t.dtype and not (stored[key].dtype.is_floating_point and t.is_floating_point())):
            raise CheckpointError(
                f"{tpath}: tensor {key} is {shape} {dtype}, the model's is {tuple(t.shape)} {model_dtype}; {RESAVE}"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, kept in tied.items():
        if (
            alias not in state or alias in replaced or kept not in expected or (alias in params) != (kept in params)
            or tuple(state[alias].shape) != stored[kept].shape
        ):
            raise CheckpointError(f"{mpath}: tied tensor {quote(alias)} cannot share {quote(kept)}; {RESAVE}")
    unsaved = sum(b.numel() for name, b in model.named_buffers() if name not in state)
    allowance = sum(_numel(t.shape) for t in stored.values()) + UNSAVED_BUFFER_ALLOWANCE
    if unsaved > allowance:
        raise CheckpointError(
            f"{mpath}: the base model's config makes {unsaved} elements of unsaved buffers, more than the checkpoint "
            f"could need ({allowance}); the config was inflated; {RESAVE}"
        )


def _load_tensors(checkpoint: Checkpoint, progress: bool) -> dict[str, torch.Tensor]:
    """Every stored tensor, each read from its file into its own buffer (no mapping of the whole file,
    no second copy): the peak is the checkpoint's size."""
    located = checkpoint.stored
    total = sum(t.nbytes for t in located.values())
    tensors = {}
    with tqdm(total=total, desc="loading", unit="B", unit_scale=True, disable=not progress) as bar:
        for key, where in located.items():
            tensors[key] = where.read()
            bar.update(where.nbytes)
    return tensors


def _install_layers(model: nn.Module, checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    for name, entry in checkpoint.manifest["layers"].items():
        stored = {key: tensors[f"{name}.{key}"] for key in entry["tensors"]}
        try:
            fmt = format_class(entry["format"]).from_tensors(tuple(entry["shape"]), entry["config"], stored)
        except FormatError as e:
            raise CheckpointError(f"{checkpoint.manifest_path}, layer {name}: {e}") from None
        LAYER_MODULES[entry["kind"]].install(model, name, fmt, entry, tensors)


def _assign(model: nn.Module, checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    """Put the stored tensors into ``model`` (cast to the dtype of the tensor they replace), tie aliases."""
    state = model.state_dict()
    consumed = {f"{name}.{key}" for name, e in checkpoint.manifest["layers"].items() for key in e["tensors"]}
    values = {}
    for key, t in state.items():
        if key in consumed or key in checkpoint.manifest["tied"]:
            continue
        value = tensors[key]
        # a meta parameter's dtype is only the default the skeleton was built in: keep the stored one
        cast = t.is_floating_point() and not t.is_meta
        values[key] = value.to(device=torch.device("cpu") if t.is_meta else t.device, dtype=t.dtype if cast else value.dtype)
    model.load_state_dict(values, strict=False, assign=True)
    params = dict(model.named_parameters())
    for alias, kept in checkpoint.manifest["tied"].items():
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, params[kept] if kept in params else model.get_buffer(kept))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{checkpoint.tensor_path} left tensors of the model unset: {quote(left[:5])}; {RESAVE}")


def _drop_modules_saved_without(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Set to None the submodules of ``model`` that the saved model was built without (its recorded
    init kwargs, e.g. BERT's ``add_pooling_layer=False``): it stored no weights for them."""
    if not checkpoint.manifest["base_model"]["init_kwargs"]:
        return
    kept = {name for name, _ in _meta_skeleton(checkpoint).named_modules()}
    for name, _ in list(model.named_modules()):
        owner, _, attr = name.rpartition(".")
        if name and name not in kept and owner in kept:  # the topmost module it lacked
            setattr(model.get_submodule(owner), attr, None)


def install_compressed_layers(model: nn.Module, directory: Union[str, Path]) -> None:
    """Put the compressed layers of the checkpoint in ``directory`` (verified first, as :func:`load`
    does) into ``model``, a skeleton of its base model whose other weights a loader reads by name next
    (transformers' ``from_pretrained``, see :mod:`matpress.hf`)."""
    checkpoint = read_checkpoint(directory)
    saved_as = checkpoint.manifest["base_model"]["class"]
    if type(model).__name__ != saved_as:
        raise CheckpointError(
            f"{directory} holds a compressed {saved_as}, and its layers are named as in that class; load it as a "
            f"{saved_as} (e.g. transformers.{saved_as}.from_pretrained, or the matching AutoModel class), not as a "
            f"{type(model).__name__}"
        )
    _drop_modules_saved_without(model, checkpoint)
    _check_fits(_unfused(model, checkpoint), checkpoint)
    layers = checkpoint.manifest["layers"]
    keys = {f"{name}.{key}" for name, entry in layers.items() for key in [*entry["tensors"], *(["bias"] if entry.get("bias") else [])]}
    _install_layers(model, checkpoint, {key: checkpoint.stored[key].read() for key in keys})


def hf_config_file(model: nn.Module) -> Optional[Callable[[Path], None]]:
    """For a transformers model, what writes its ``config.json`` into a checkpoint, with a
    ``quantization_config`` naming matpress: ``from_pretrained`` then loads the checkpoint through
    :mod:`matpress.hf` (after ``import matpress``). None for other modules."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict") or not getattr(config, "model_type", None):
        return None
    data = {**config.to_dict(), "quantization_config": {"quant_method": "matpress", "format_version": FORMAT_VERSION}}
    if not data.get("dtype"):  # else from_pretrained's "auto" takes the first stored tensor's, maybe fp16 scales
        dense = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        data["dtype"] = str(dense).removeprefix("torch.")
    return lambda staging: (staging / HF_CONFIG).write_text(json.dumps(data, indent=2, default=str))


def _save_pretrained(self: nn.Module, save_directory: Union[str, Path], is_main_process: bool = True,
                     safe_serialization: bool = True, **options: Any) -> None:
    """transformers' ``save_pretrained`` on a model with matpress layers: a matpress checkpoint (read it
    back with :func:`load`). transformers' own would write the compressed tensors under names its
    loader does not know, and reloading that directory would silently give the architecture with
    freshly initialised weights in place of every compressed layer."""
    if options or not safe_serialization:
        given = sorted(options) + ([] if safe_serialization else ["safe_serialization=False"])
        raise CheckpointError(
            f"save_pretrained on a model with matpress layers writes a matpress checkpoint (matpress.save) and takes "
            f"none of {given}; call matpress.save(model, directory, ...) and read it back with matpress.load"
        )
    if is_main_process:
        save(self, save_directory)


def keep_save_pretrained_true(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (a transformers model's) write a matpress checkpoint, see
    :func:`_save_pretrained`; bound to this instance, so a copy of the model saves itself."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained, model)


def load(
    directory: Union[str, Path], model: Optional[nn.Module] = None, expect_digest: Optional[str] = None,
    progress: bool = False,
) -> nn.Module:
    """Rebuild a model saved with :func:`save`, after verifying the checkpoint (see the module docstring).

    For transformers models the architecture is rebuilt from the manifest; for any other module pass
    a freshly constructed ``model`` with the same architecture, which is filled in place. With
    ``expect_digest`` (what ``matpress info`` prints for the checkpoint you trust) anything else is
    refused. Floating-point tensors keep their stored dtype where the model's parameter was on the meta
    device (a rebuilt model), and take the model's where it was real. ``progress``: a bar over the bytes read.
    """
    checkpoint = read_checkpoint(directory, expect_digest)
    if model is None:
        model = _build_base_model(checkpoint)
    else:
        _check_fits(_unfused(model, checkpoint), checkpoint)
    tensors = _load_tensors(checkpoint, progress)
    _install_layers(model, checkpoint, tensors)
    _assign(model, checkpoint, tensors)
    keep_save_pretrained_true(model)
    model.eval()
    return model


def load_tokenizer(directory: Union[str, Path], trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a checkpoint, or None. A tokenizer that ships code is refused unless
    ``trust_remote_code``."""
    return load_tokenizer_from(Path(directory), trust_remote_code)


# -- layer kinds: how each kind of manifest layer entry maps onto modules --------------------------


def _linear_fits(found: dict[str, dict[str, nn.Module]], layers: dict[str, Any], module: nn.Module,
                 entry: dict[str, Any], where: str) -> tuple[set[str], set[str]]:
    if entry["bias"] != (getattr(module, "bias", None) is not None):
        raise CheckpointError(f"{where}: the manifest records bias={entry['bias']}, the model's layer disagrees")
    return set(), {"bias"} if entry["bias"] else set()


def _install_linear(model: nn.Module, name: str, fmt: Format, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    set_submodule(model, name, CompressedLinear(fmt, tensors[f"{name}.bias"] if entry["bias"] else None))


def _embedding_fits(found: dict[str, dict[str, nn.Module]], layers: dict[str, Any], module: nn.Module,
                    entry: dict[str, Any], where: str) -> tuple[set[str], set[str]]:
    """The LM heads tied to the embedding are bias-free linear layers of its shape, stored nowhere else."""
    heads, replaced = entry["tied_heads"], set()
    for head in heads:
        layer = found["linear"].get(head)
        if (
            layer is None or tuple(linear_weight(layer).shape) != tuple(entry["shape"])
            or getattr(layer, "bias", None) is not None or head in layers or heads.count(head) > 1
        ):
            raise CheckpointError(
                f"{where}: tied head {head} is not a bias-free linear layer of shape {tuple(entry['shape'])} in the "
                "model that nothing else replaces"
            )
        replaced.update(f"{head}.{k}" for k in layer.state_dict())
    return replaced, set()


def _install_embedding(model: nn.Module, name: str, fmt: Format, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    embedding = CompressedEmbedding(fmt, entry["padding_idx"])
    set_submodule(model, name, embedding)
    for head in entry["tied_heads"]:
        set_submodule(model, head, TiedLinear(embedding))


@dataclass(frozen=True)
class LayerModule:
    """One kind of manifest layer entry (see :data:`matpress.manifest.LAYER_KINDS`): the module class it
    is loaded as; the layers of a model it can replace and such a layer's weight shape; what else it
    must fit (``fits`` returns the model keys it replaces beyond the layer's own, and its stored keys
    beyond its format's, relative to the layer's name); how it is put into the model; and what ``save``
    records beyond its format."""

    cls: type[FormatModule]
    find: Callable[[nn.Module], dict[str, nn.Module]]
    shape: Callable[[nn.Module], tuple[int, ...]]
    fits: Callable[..., tuple[set[str], set[str]]]
    install: Callable[[nn.Module, str, Format, dict[str, Any], dict[str, torch.Tensor]], None]
    entry: Callable[[Any, list[str]], dict[str, Any]]


LAYER_MODULES: dict[str, LayerModule] = {
    "linear": LayerModule(
        CompressedLinear, find_linear_layers, lambda m: tuple(linear_weight(m).shape), _linear_fits, _install_linear,
        lambda m, heads: {"bias": m.bias is not None},
    ),
    "embedding": LayerModule(
        CompressedEmbedding, find_embeddings, lambda m: tuple(m.weight.shape), _embedding_fits, _install_embedding,
        lambda m, heads: {"padding_idx": m.padding_idx, "tied_heads": list(heads)},
    ),
}


# -- saving ---------------------------------------------------------------------------------------


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias another one (tied embeddings); return kept tensors and alias -> kept."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        # meta tensors (a streamed model's weights still in its source files) have no data pointer
        storage = t.untyped_storage()._cdata if t.is_meta else t.untyped_storage().data_ptr()
        ident = (t.device, storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        kept[key] = t.detach() if t.is_meta else t.detach().contiguous().cpu()
    return kept, aliases


def _shard_names(n: int) -> list[str]:
    return [TENSORS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> dict[str, list[str]]:
    """Shard file name -> the tensor names it holds, in order, each shard (but one holding a single
    bigger tensor) at most ``max_shard_bytes``; one shard is the plain ``model.safetensors``."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return dict(zip(_shard_names(len(groups)), groups))


def _write_tensors(
    path: Path, keys: list[str], state: dict[str, torch.Tensor], stored: dict[str, StoredTensor],
    metadata: dict[str, str], bar: Any,
) -> None:
    """Write ``keys`` of ``state`` as the safetensors file ``path``, one tensor at a time: a tensor
    ``stored`` locates in a file (a streamed model's source or spill files) is copied from there, byte
    for byte (never all in memory)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        t = state[key]
        dtype, shape = (stored[key].dtype, stored[key].shape) if key in stored else (t.dtype, tuple(t.shape))
        n = t.numel() * dtype.itemsize
        header[key] = {"dtype": stored_dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in keys:
            t = state[key]
            if key in stored:
                stored[key].copy_to(f, COPY_CHUNK)
            else:
                f.write(tensor_bytes(t))
            bar.update(header[key]["data_offsets"][1] - header[key]["data_offsets"][0])


def _stored_sources(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, StoredTensor]:
    """Where each tensor of ``state`` that a streamed model holds in a file is: a meta tensor (a weight
    not in memory) in the model's source files, under its name or a name tied to it; a spilled
    compressed layer's tensor in its spill file."""
    source = source_of(model)
    names: dict[str, list[str]] = {}
    for alias, kept in aliases.items():
        names.setdefault(kept, []).append(alias)
    located = {}
    for key, t in state.items():
        if source is not None and key in source.spilled:
            located[key] = source.spilled[key]
        if not t.is_meta:
            continue
        found = [source.tensors[n] for n in [key, *names.get(key, [])] if n in source.tensors] if source is not None else []
        if not found:
            raise CheckpointError(
                f"cannot save {key}: it is on the meta device and in no source file; materialise the model's "
                "weights before saving it"
            )
        located[key] = found[0]
    return located


def _is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a matpress checkpoint of any version (a real, not linked, manifest)."""
    path = directory / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format_version"), int)


def _readable_as_umask_allows(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` would (safetensors writes 0600 whatever the umask), so a
    checkpoint's files share one set of permissions."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def check_output_location(path: Union[str, Path], force: bool = False, nbytes: int = 0) -> None:
    """Refuse, before any work, a place :func:`save` could not write a checkpoint of ``nbytes`` to.

    ``path`` must be absent, an empty directory or an earlier matpress checkpoint (``force`` allows any
    directory: it is then replaced whole), not a file or a symbolic link; the nearest existing parent
    must be a directory we can create entries in, with ``nbytes`` (plus a margin) free.
    """
    path = Path(os.path.abspath(path))
    if path.is_symlink():
        raise CheckpointError(f"{path} is a symbolic link; pass the directory it points to, or another path")
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file, not a directory; choose a directory for the checkpoint")
        with os.scandir(path) as it:
            names = [e.name for _, e in zip(range(4), it)]
        if names and not force and not _is_checkpoint(path):
            raise CheckpointError(
                f"{path} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) and not a matpress "
                "checkpoint; choose a new or empty directory, or pass --force (force=True) to replace it and "
                "delete its contents"
            )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {path}: {parent} is not a directory")
    try:
        fresh_dir(parent, ".matpress-probe-").rmdir()
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint to {path}: {parent} is not writable ({e.strerror})") from None
    free = shutil.disk_usage(parent).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise CheckpointError(
            f"cannot write a checkpoint of {nbytes / 1e6:.1f} MB to {path}: only {free / 1e6:.1f} MB free on its "
            "filesystem; free some space or choose another location"
        )


def _layer_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    layers = {}
    heads = tied_to(model)
    for name, m in model.named_modules():
        kind = next((k for k, lm in LAYER_MODULES.items() if isinstance(m, lm.cls)), None)
        if kind is None or isinstance(m, TiedLinear):  # a tied head stores nothing: its embedding's entry names it
            continue
        stored = m.fmt.to_tensors()
        layers[name] = {
            "kind": kind,
            "format": m.format_name,
            "description": m.fmt.describe(),
            "shape": list(m.fmt.shape),
            "config": m.format_config,
            "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in stored.items()},
            **LAYER_MODULES[kind].entry(m, heads.get(name, [])),
        }
    return layers


def save(
    model: nn.Module,
    directory: Union[str, Path],
    tokenizer: Any = None,
    recipe: Any = None,
    source: Optional[str] = None,
    force: bool = False,
    extra_files: Optional[Callable[[Path], None]] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write ``model`` (with its compressed layers) to ``directory`` as one transaction; returns it.

    Tensors are written one at a time; a streamed model's weights still in its source files (see
    :mod:`matpress.walk.source`) are copied from there. More than ``max_shard_bytes`` of tensors are
    written as shards ``model-0000i-of-0000n.safetensors`` with an index ``model.safetensors.index.json``
    (which then records the manifest's body digest); the manifest digests every shard. ``progress``: a
    bar over the bytes written.

    ``extra_files(staging_dir)`` may write more files into the checkpoint before it is put in place
    (they are listed and digested in the manifest like the others). See :func:`check_output_location`
    for which targets are accepted and what ``force`` does.
    """
    target = Path(os.path.abspath(directory))
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {quote(max_shard_bytes)}")
    state, aliases = _dedupe_shared(model.state_dict())
    stored = _stored_sources(model, state, aliases)
    nbytes = sum(t.numel() * (stored[k].dtype if k in stored else t.dtype).itemsize for k, t in state.items())
    check_output_location(target, force, nbytes)
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
        "layers": _layer_entries(model),
        "experts": unfused_experts(model),
        "tied": aliases,
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # the digests cover what is read back
    with staged_dir(target) as staging:
        producer = {"producer": f"matpress {__version__}"}
        root = {**producer, BODY_DIGEST_KEY: body_digest(manifest)}
        shards = _plan_shards(state, max_shard_bytes)
        with tqdm(total=nbytes, desc="saving", unit="B", unit_scale=True, disable=not progress) as bar:
            for shard, keys in shards.items():
                _write_tensors(staging / shard, keys, state, stored, producer if len(shards) > 1 else root, bar)
                _readable_as_umask_allows(staging / shard)
        if len(shards) > 1:
            index = {"metadata": root, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
            (staging / INDEX).write_text(json.dumps(index, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        for write in (hf_config_file(model), extra_files):
            if write is not None:
                write(staging)
        files = sorted(p for p in staging.iterdir() if p.is_file() and not p.is_symlink())
        manifest["files"] = {p.name: file_entry(p) for p in files}
        text = json.dumps(manifest, indent=1)
        if len(text.encode()) > max_manifest_bytes(len(state)):
            raise CheckpointError(f"the manifest of {target} would exceed {max_manifest_bytes(len(state))} bytes: the model's config or recipe is too large")
        parse_manifest(text.encode(), staging / MANIFEST)  # never write a checkpoint load would refuse
        (staging / MANIFEST).write_text(text)
    return Path(directory)
