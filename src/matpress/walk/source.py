"""Streaming a source model's weights from its safetensors files, one block at a time.

A Hugging Face model directory stores its weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``. :func:`open_source` reads only the files' headers (names, dtypes,
shapes, byte ranges), and :func:`streamed_skeleton` builds the model with its parameters on the meta
device (buffers real, nothing randomly initialised) and attaches a :class:`WeightSource` to it.

The passes call :func:`materialised` (or :class:`BlockStream`) around the work on one block (or one
layer): the parameters under that module are read from the files (one ``read`` per tensor, straight
into its buffer), cast to fp32 for computing, and afterwards the parameters still dense are put back
on the meta device, where they stay until ``save`` copies them from the files in their stored dtype.
The layers compressed in the meantime are *spilled*: their stored tensors are written to a file in a
temporary directory and mapped back from it, so they work as before but occupy memory only while
read (``save`` copies them file to file). On a model without a source (any in-memory ``nn.Module``)
all of this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from matpress.atomic import process_alive
from matpress.errors import MatpressError, quote
from matpress.formats.packing import row_chunks
from matpress.inputs import json_object
from matpress.nn.layers import FormatModule, TiedLinear

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COMPUTE_DTYPE = torch.float32  # blocks are compressed in fp32, whatever their stored dtype
MAX_HEADER_BYTES = 100 << 20
MAX_INDEX_BYTES = 64 << 20
SOURCE_ATTRIBUTE = "matpress_source"
DAMAGED = "the model directory is damaged"

# safetensors' dtype names <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> torch.Tensor:
        """The tensor, in its stored dtype, read with one ``readinto`` into its own buffer."""
        buffer = bytearray(self.nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(buffer) != self.nbytes:
                raise MatpressError(f"{self.file} is shorter than its header says; {DAMAGED}")
        if not buffer:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buffer, dtype=self.dtype).view(self.shape)

    def copy_to(self, out: BinaryIO, chunk: int) -> None:
        """Write the tensor's stored bytes to ``out``, ``chunk`` bytes at a time."""
        with open(self.file, "rb") as f:
            f.seek(self.start)
            left = self.nbytes
            while left:
                data = f.read(min(chunk, left))
                if not data:
                    raise MatpressError(f"{self.file} is shorter than its header says; {DAMAGED}")
                out.write(data)
                left -= len(data)


def read_header(file: Path, damaged: str = DAMAGED, error: type[MatpressError] = MatpressError) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Name -> :class:`StoredTensor` for every tensor of the safetensors ``file``, and its string
    metadata, from its header only; a header that does not describe the file raises ``error`` naming
    it and ending with ``damaged`` (what that means for the user)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise error(f"{file} is not a safetensors file (its header length is wrong): it is truncated or corrupted; {damaged}")
        raw = f.read(n)
    try:
        header = json_object(raw, f"the safetensors header of {file}", damaged)
    except MatpressError as e:
        raise error(str(e)) from None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{file}: the safetensors metadata is not an object of strings; {damaged}")
    base = 8 + n
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise error(f"{file}: tensor {quote(name)} has a malformed or unsupported header entry; {damaged}") from None
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=0) < 0 or not 0 <= start <= end <= size - base or end - start != numel * dtype.itemsize:
            raise error(f"{file}: tensor {quote(name)} lies outside the file or has the wrong size: it is truncated or corrupted; {damaged}")
        tensors[name] = StoredTensor(file, dtype, shape, base + start, base + end)
    return tensors, metadata


def safetensors_files(directory: Path) -> Optional[list[Path]]:
    """The safetensors files holding a model directory's weights (the one file, or the shards its index
    names), or None when it has neither."""
    index = directory / INDEX_FILE
    if index.is_file():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise MatpressError(f"{index} holds more than {MAX_INDEX_BYTES} bytes; {DAMAGED}")
        weight_map = json_object(index.read_bytes(), str(index), DAMAGED).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MatpressError(f"{index} has no 'weight_map' of tensor names to shard files; {DAMAGED}")
        shards = sorted(set(map(str, weight_map.values())))
        files = []
        for shard in shards:
            path = directory / str(shard)
            if os.path.dirname(shard) or not path.is_file():
                raise MatpressError(f"{index} names the shard {quote(shard)}, which is not a file in {directory}")
            files.append(path)
        return files
    single = directory / SINGLE_FILE
    return [single] if single.is_file() else None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of the contiguous CPU tensor ``t``, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data


SPILL_ALIGNMENT = 64
SPILL_PREFIX = "matpress-spill-"


def new_spill_dir() -> Path:
    """A fresh spill directory in the temporary directory, named with this process's id. It is deleted
    with its source, or at exit (KeyboardInterrupt included); those a killed process left are deleted
    here, by the next process that spills."""
    parent = Path(tempfile.gettempdir())
    pattern = re.compile(re.escape(SPILL_PREFIX) + r"(\d+)-\w+")
    for path in parent.iterdir():
        found = pattern.fullmatch(path.name)
        if found and not path.is_symlink() and path.is_dir() and not process_alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))


class WeightSource:
    """The stored tensors a skeleton model's meta parameters are read from, and the spilled compressed
    tensors (see the module doc)."""

    def __init__(self, tensors: dict[str, StoredTensor]):
        self.tensors = tensors
        self.spilled: dict[str, StoredTensor] = {}  # a spilled compressed layer's tensors, by state-dict name
        # the module each layer's spilled tensors belong to: a layer replaced again (the budget taking back
        # a measured format) is spilled again, and its old tensors forgotten
        self.spilled_modules: "weakref.WeakValueDictionary[str, nn.Module]" = weakref.WeakValueDictionary()
        self._spill_files = 0
        self._mapped: dict[str, torch.UntypedStorage] = {}  # each spilled layer's mapping, by layer name
        self.reads = 0  # parameters materialised so far
        # the parameters read and not yet released: their names and (module, attribute) owners, kept so
        # that a layer replaced meanwhile (by its compressed form) still lets its weight go
        self.live: list[tuple[list[str], list[tuple[nn.Module, str]]]] = []
        self._spill_dir: Optional[Path] = None

    @classmethod
    def open(cls, directory: Path) -> Optional["WeightSource"]:
        """The source of ``directory``'s safetensors weights, or None when it stores none."""
        files = safetensors_files(directory)
        if files is None:
            return None
        tensors: dict[str, StoredTensor] = {}
        for file in files:
            tensors.update(read_header(file)[0])
        return cls(tensors)

    def covers(self, model: nn.Module) -> bool:
        """Whether every parameter of ``model`` (tied ones by any of their names) is stored under its name
        with its shape: only then can it be streamed (a checkpoint whose names transformers converts
        while loading, such as per-expert MoE weights, is loaded whole instead)."""
        names: dict[int, list[str]] = {}
        shapes: dict[int, tuple[int, ...]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            shapes[id(p)] = tuple(p.shape)
        return all(
            any(n in self.tensors and self.tensors[n].shape == shapes[key] for n in group) for key, group in names.items()
        )

    def stored(self, names: list[str]) -> StoredTensor:
        return next(self.tensors[n] for n in names if n in self.tensors)

    def materialise(self, model: nn.Module, prefix: str, skip: Optional[str] = None) -> int:
        """Read every meta parameter under module ``prefix`` ("" for all; none under module ``skip``) from
        the files, in fp32 (tied parameters once, for every name); returns how many were read."""
        count = 0
        for names, owners, param in _parameters(model, prefix, skip):
            if not param.is_meta:
                continue
            value = self.stored(names).read()
            value = value.to(COMPUTE_DTYPE) if value.is_floating_point() else value
            _set(owners, nn.Parameter(value, requires_grad=False))
            self.live.append((names, owners))
            count += 1
        self.reads += count
        return count

    def release(self, model: nn.Module, prefix: str, skip: Optional[str] = None) -> None:
        """Put every stored, still dense parameter under module ``prefix`` (none under ``skip``) back on
        the meta device, in its stored dtype (which ``save`` writes), unless the pass changed it (AWQ
        folds scales into norms): that one stays in memory."""
        start = f"{prefix}." if prefix else ""
        kept = []
        for names, owners in self.live:
            if not any(n.startswith(start) and (skip is None or not n.startswith(f"{skip}.")) for n in names):
                kept.append((names, owners))
                continue
            module, attr = owners[0]
            param, stored = getattr(module, attr), self.stored(names)
            if param.dtype == torch.bool or _holds(param.detach(), stored):
                _set(owners, nn.Parameter(torch.empty(stored.shape, dtype=stored.dtype, device="meta"), requires_grad=False))
        self.live = kept
        for name, module in model.named_modules():
            spillable = isinstance(module, FormatModule) and not isinstance(module, TiedLinear)
            if spillable and (name == prefix or name.startswith(start)) and self.spilled_modules.get(name) is not module:
                self._spill(name, module)
        self.drop_mapped_pages()

    def drop_mapped_pages(self) -> None:
        """Drop the pages of the spill files that reading the spilled layers brought into memory: a
        mapped file's resident pages count in the process's RSS, and without this the layers run since
        (the propagation through the blocks compressed so far) stayed resident, growing with the blocks
        done. The next read maps them in again from the file (the kernel's page cache, usually);
        nothing writes to a spilled tensor, so no change is lost (the mapping is private)."""
        if _MADVISE is None:
            return
        for storage in self._mapped.values():
            _MADVISE(ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(storage.nbytes()), mmap.MADV_DONTNEED)

    def _spill(self, name: str, module: FormatModule) -> None:
        """Write ``module``'s stored tensors to a spill file and map them back from it."""
        if self._spill_dir is None:
            self._spill_dir = new_spill_dir()
            weakref.finalize(self, shutil.rmtree, self._spill_dir, ignore_errors=True)  # also at exit
        for key in [k for k in self.spilled if k.startswith(f"{name}.")]:
            del self.spilled[key]
        file = self._spill_dir / f"{self._spill_files}.bin"
        self._spill_files += 1
        tensors = {key: getattr(module, key).detach().contiguous().cpu() for key in module._format_keys}
        where: dict[str, tuple[int, int]] = {}
        with open(file, "wb") as f:
            for key, t in tensors.items():
                f.write(b"\0" * (-f.tell() % SPILL_ALIGNMENT))
                where[key] = (f.tell(), f.tell() + t.numel() * t.element_size())
                f.write(tensor_bytes(t))
            size = f.tell()
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size) if size else None
        mapped = {}
        for key, t in tensors.items():
            start, end = where[key]
            self.spilled[f"{name}.{key}"] = StoredTensor(file, t.dtype, tuple(t.shape), start, end)
            mapped[key] = t if storage is None or not t.numel() else torch.empty(0, dtype=t.dtype).set_(storage, start // t.element_size(), t.shape)
        originals = {id(getattr(module, key)): key for key in module._format_keys}
        module._apply(lambda t: mapped[originals[id(t)]] if id(t) in originals else t)
        self.spilled_modules[name] = module
        if storage is not None:
            self._mapped[name] = storage
        else:
            self._mapped.pop(name, None)


def _holds(value: torch.Tensor, stored: StoredTensor) -> bool:
    """Whether ``value`` still equals the ``stored`` tensor it was read from, compared a chunk at a time
    (a whole fp32 copy of a big embedding would double it at its release)."""
    flat, original = value.reshape(-1), stored.read().reshape(-1)
    return all(torch.equal(flat[part], original[part].to(flat.dtype)) for part in row_chunks(flat.numel(), 1))


def _parameters(
    model: nn.Module, prefix: str, skip: Optional[str] = None
) -> Iterator[tuple[list[str], list[tuple[nn.Module, str]], nn.Parameter]]:
    """(all names, all (module, attribute) owners, parameter) for each distinct parameter of ``model``
    with a name under module ``prefix`` and not under module ``skip``; a tied parameter also lists its
    other names."""
    names: dict[int, list[str]] = {}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{attr}" if module_name else attr
            names.setdefault(id(p), []).append(full)
            owners.setdefault(id(p), []).append((module, attr))
            params[id(p)] = p
    start = f"{prefix}." if prefix else ""
    for key, group in names.items():
        if any(n.startswith(start) and (skip is None or not n.startswith(f"{skip}.")) for n in group):
            yield group, owners[key], params[key]


def _set(owners: list[tuple[nn.Module, str]], param: nn.Parameter) -> None:
    for module, attr in owners:
        setattr(module, attr, param)


def source_of(model: nn.Module) -> Optional[WeightSource]:
    """The :class:`WeightSource` a streamed model reads its parameters from, or None."""
    return getattr(model, SOURCE_ATTRIBUTE, None)


try:
    _MALLOC_TRIM: Optional[Callable[[int], int]] = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl)
    _MALLOC_TRIM = None


try:  # Linux: madvise(MADV_DONTNEED) drops a private file mapping's resident pages
    _MADVISE: Optional[Callable[..., int]] = ctypes.CDLL(None).madvise if hasattr(mmap, "MADV_DONTNEED") and os.uname().sysname == "Linux" else None
except (OSError, AttributeError):
    _MADVISE = None


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).
    glibc keeps the memory of freed tensors below its mmap threshold (up to 32 MB: packed codes,
    scales, small weights) for reuse, and a streamed pass never reuses all of it: without this an 8B
    model's RTN pass grew about 0.2 GB in its first block and 0.07 GB in each further one."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class BlockStream:
    """The walk's default :class:`~matpress.walk.walker.BlockSource`: ``materialise(prefix)`` before the
    walk works on module ``prefix`` of ``model`` ("" for all of it), ``release(prefix)`` when done with
    it; both do nothing on a model without a source."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.source = source_of(model)

    def materialise(self, prefix: str, module: Optional[nn.Module] = None) -> None:
        if self.source is not None:
            self.source.materialise(self.model, prefix)

    def release(self, prefix: str, module: Optional[nn.Module] = None) -> None:
        if self.source is not None:
            self.source.release(self.model, prefix)
            return_freed_memory()


def read_whole(model: nn.Module) -> None:
    """Read every parameter of a streamed ``model`` (fp32) and detach its source, so that from then on it
    is an ordinary in-memory model that no walk releases (the budget path measures the whole model at
    once); nothing on a model without a source."""
    source = source_of(model)
    if source is None:
        return
    source.materialise(model, "")
    source.live.clear()
    delattr(model, SOURCE_ATTRIBUTE)


@contextlib.contextmanager
def materialised(model: nn.Module, prefix: str, skip: Optional[str] = None) -> Iterator[None]:
    """Inside the ``with``: module ``prefix`` ("" for the whole model) of a streamed model, except module
    ``skip``, has its parameters read (fp32); after it, those still dense are released (see the module
    doc). On a model without a source it does nothing."""
    source = source_of(model)
    if source is None:
        yield
        return
    source.materialise(model, prefix, skip)
    try:
        yield
    finally:
        source.release(model, prefix, skip)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real."""

    def hook(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
        if param is None or param.is_meta:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch_module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def stored_dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of ``dtype``."""
    return DTYPE_NAMES[dtype]
