"""Compile the C++ kernels at first use, for the CPU that runs them, and load them as PyTorch operators.

The library is built with the system C++ compiler (``$CXX``, else ``c++``/``g++``) as
``-O3 -march=native -fopenmp`` against torch's headers and libraries into a cache directory (``kernels`` in ``$MATPRESS_CACHE``,
``$XDG_CACHE_HOME/matpress`` or ``~/.cache/matpress``) under a name keyed by the source, the flags, the compiler and the CPU's
feature flags, so a machine builds once and a different CPU never loads a library built for another.
OpenMP resolves to the ``libgomp`` that torch has already loaded, so kernels and torch share one thread
pool. Once loaded (with ctypes, which only opens it), the library registers its kernels as PyTorch
custom operators (``torch.ops.matpress.matmul`` and ``decode_bf16``; a build with other flags, e.g.
another instruction set for tests, under a namespace of its own), with fake implementations so
``torch.compile`` and ``torch.export`` trace them: a call is one dispatcher call, a few microseconds. The
lean decode loop's steps through a model's Llama blocks are a custom class (``torch.classes.matpress.DecodePlan``)
that holds their layouts and caches, so a token is one call.

Loading a shared library runs its code, so the cache is checked before anything is loaded:

- the directory is created with mode 0700, and a directory, library or digest record that is not
  owned by the current user, is writable by group or others, or is not a plain file (a link) is
  refused: no one else can have put or changed anything in it;
- each build is compiled under a fresh temporary name, then renamed into place, its SHA-256 digest and
  size written beside it (``lowbit-<key>.sha256``, also renamed into place) and the library named by
  that digest (``lowbit-<key>-<digest>.so``), so concurrent builds never mix a library with another's
  record; a library is loaded only when its size and digest match the record, so a damaged, truncated
  or planted file (one with no record, or another file's) is never loaded, and a compiler that exits 0
  without writing a library leaves nothing cached;
- a freshly built library must export the kernels' symbols and register its operators, else it is deleted.

A cached entry that fails a check is rebuilt once, with one warning saying what was wrong and where;
when no library can be built or loaded, one warning, and every format uses its own (pure PyTorch,
exact) ``matmul``; nothing here crashes the process. Not covered: someone who runs as the same user
can write a matching record beside a planted library (they can run code as that user anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch  # also loads torch's libgomp before ours, so both share one OpenMP runtime
from torch.utils import cpp_extension

from matpress.errors import MatpressError

SOURCE = Path(__file__).with_name("lowbit.cpp")
DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20")
# The operators of the DEFAULT_FLAGS build; other builds get "matpress_<hash of their flags>".
NAMESPACE = "matpress"
# $MATPRESS_KERNEL_ISA: the instruction set the kernels are built for. "native" (the default) is the widest
# this CPU has; "avx2" builds them as an AVX2-only x86 CPU runs them (AMD Zen 2/3, most laptops) and
# "portable" the plain C++ path, so that one machine measures the paths other CPUs take.
ISA_VARIABLE = "MATPRESS_KERNEL_ISA"
ISA_MARCH = {"native": "native", "avx2": "x86-64-v3", "portable": "x86-64-v2"}


@dataclass(frozen=True)
class KernelLibrary:
    """One loaded build of the kernels: its C handle (for :meth:`isa`) and its operators."""

    handle: ctypes.CDLL
    namespace: str
    matmul: Callable[..., torch.Tensor]  # torch.ops.<namespace>.matmul.default
    decode_bf16: Callable[..., torch.Tensor]
    decode_plan: Callable[..., Any]  # torch.classes.<namespace>.DecodePlan: Llama blocks for one token (see lowbit.cpp)

    def isa(self) -> int:
        """The path compiled in: 1 AVX-512 VNNI, 2 AVX2, 0 portable C++."""
        return self.handle.mp_isa()


_LOADED: dict[tuple[str, ...], Optional[KernelLibrary]] = {}
# Operator namespaces registered in this process (a namespace can be defined once per process).
_REGISTERED: set[str] = set()


def torch_flags() -> tuple[str, ...]:
    """What building against torch adds to the flags: its headers, ABI and libraries."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [a for p in cpp_extension.library_paths() for a in (f"-L{p}", f"-Wl,-rpath,{p}")]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return (*includes, abi, *libs, "-ltorch_cpu", "-lc10")


def cache_root() -> Path:
    """matpress's cache: ``$MATPRESS_CACHE``, else ``$XDG_CACHE_HOME/matpress``, else ``~/.cache/matpress``."""
    if os.environ.get("MATPRESS_CACHE"):
        return Path(os.environ["MATPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "matpress"


def cache_dir() -> Path:
    """Where built libraries are kept: ``kernels`` in :func:`cache_root`."""
    return cache_root() / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key), or the machine name where /proc is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


SYMBOLS = ("mp_isa", "mp_register_ops")
RECORD_BYTES = 200  # a digest record is one short line; anything longer is not one


class KernelCacheError(RuntimeError):
    """A file or directory of the kernel cache that is refused, and why."""


def namespace_of(flags: tuple[str, ...]) -> str:
    """The operator namespace of the build with ``flags``."""
    if flags == DEFAULT_FLAGS:
        return NAMESPACE
    return f"{NAMESPACE}_{hashlib.sha256(chr(0).join(flags).encode()).hexdigest()[:12]}"


# The operators' geometry argument, in order (lowbit.cpp's Geometry; LowbitLayout.operator_geometry builds it).
GEOMETRY_FIELDS = ("bits", "n_blocks", "padded", "in_features", "group", "sub", "width", "out_features", "scales_nonfinite")
IN_FEATURES, OUT_FEATURES = GEOMETRY_FIELDS.index("in_features"), GEOMETRY_FIELDS.index("out_features")


def _fake_matmul(codes, scales, zeros, levels, x, geometry):
    return x.new_empty((*x.shape[:-1], geometry[OUT_FEATURES]))


def _fake_decode_bf16(codes, scales, zeros, levels, geometry):
    return codes.new_empty((geometry[OUT_FEATURES], geometry[IN_FEATURES]), dtype=torch.bfloat16)


def _register(lib: ctypes.CDLL, namespace: str) -> None:
    """Register the library's operators under ``namespace`` (with their fake implementations), once per
    process: a later build of the same flags (e.g. rebuilt into another cache) is the same code."""
    lib.mp_isa.restype = ctypes.c_int
    lib.mp_isa.argtypes = []
    if namespace in _REGISTERED:
        return
    error = ctypes.create_string_buffer(1000)
    lib.mp_register_ops.restype = ctypes.c_int
    lib.mp_register_ops.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    if lib.mp_register_ops(namespace.encode(), error, len(error)) != 0:
        raise KernelCacheError(f"the kernels' operators could not be registered as {namespace}: {error.value.decode()}")
    torch.library.register_fake(f"{namespace}::matmul", _fake_matmul)
    torch.library.register_fake(f"{namespace}::decode_bf16", _fake_decode_bf16)
    _REGISTERED.add(namespace)


def check_private(path: Path, directory: bool = False) -> None:
    """Raise :class:`KernelCacheError` unless ``path`` is a plain file (or a directory) of the current
    user that group and others cannot write."""
    st = os.lstat(path)
    kind = "directory" if directory else "file"
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        raise KernelCacheError(f"{path} is not a plain {kind} (a link or a special file)")
    if st.st_uid != os.geteuid():
        raise KernelCacheError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def private_cache_dir() -> Path:
    """:func:`cache_dir`, created with mode 0700 if absent, checked to be private."""
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        check_private(directory, directory=True)
    except KernelCacheError as e:
        raise KernelCacheError(
            f"the kernel cache is refused: {e}; make it private (chown it to you, chmod 700) or set "
            "$MATPRESS_CACHE to a private directory"
        ) from None
    return directory


def record_path(flags: tuple[str, ...], cxx: str) -> Path:
    """The digest record of the library built from this source with ``flags`` by ``cxx`` for this CPU
    and this torch."""
    source = SOURCE.read_bytes()
    build_flags = " ".join((*flags, *torch_flags(), torch.__version__)).encode()
    key = hashlib.sha256(b"\0".join([source, build_flags, cxx.encode(), cpu_flags().encode()]))
    return private_cache_dir() / f"lowbit-{key.hexdigest()[:16]}.sha256"


def library_path(record: Path, digest: str) -> Path:
    return record.with_name(f"{record.stem}-{digest[:16]}.so")


def verified_library(record: Path) -> Optional[Path]:
    """The library that ``record`` describes, once its owner, mode, size and digest are checked; None
    when nothing is cached yet. Raises :class:`KernelCacheError` naming what is off."""
    if not os.path.lexists(record):
        return None
    check_private(record)
    with open(record, "rb") as f:
        fields = f.read(RECORD_BYTES).split()
    if len(fields) != 2 or not re.fullmatch(rb"[0-9a-f]{64}", fields[0]) or not fields[1].isdigit():
        raise KernelCacheError(f"{record} is not a digest record ('<sha256> <size>')")
    digest, size = fields[0].decode(), int(fields[1])
    library = library_path(record, digest)
    if not os.path.lexists(library):
        raise KernelCacheError(f"{library}, recorded in {record}, is missing")
    check_private(library)
    data = library.read_bytes()
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise KernelCacheError(
            f"{library} ({len(data)} bytes) does not match the size ({size}) and SHA-256 digest recorded in {record}"
        )
    return library


def _replace_with(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a fresh temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(cxx: str, flags: tuple[str, ...], record: Path) -> Path:
    """Compile the kernels with ``flags`` into a fresh temporary file, rename it into the cache under
    its digest, write ``record``, and return the library's path."""
    fd, tmp = tempfile.mkstemp(prefix=".lowbit-", suffix=".so", dir=record.parent)
    os.close(fd)
    try:
        run = subprocess.run([cxx, *flags, str(SOURCE), *torch_flags(), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE}:\n{run.stderr[-2000:]}")
        data = Path(tmp).read_bytes()
        if not data:
            raise RuntimeError(f"{cxx} exited 0 but wrote no library for {SOURCE}")
        digest = hashlib.sha256(data).hexdigest()
        library = library_path(record, digest)
        os.chmod(tmp, 0o700)  # the linker may have created it under the umask
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _replace_with(record, f"{digest} {len(data)}\n".encode())
    return library


def _open(flags: tuple[str, ...]) -> tuple[KernelLibrary, Optional[str]]:
    """The loaded kernels, and why the cached entry was refused and rebuilt (None if it was not)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    record = record_path(flags, cxx)
    refused = None
    try:
        library = verified_library(record)
    except KernelCacheError as e:
        refused, library = str(e), None
    if library is None:
        library = build(cxx, flags, record)
    try:
        lib = ctypes.CDLL(str(library))  # safe: checked above to be the library we built
        missing = [name for name in SYMBOLS if not hasattr(lib, name)]
        if missing:
            raise KernelCacheError(f"{library}, built by {cxx}, lacks the kernels' symbols {missing}")
        namespace = namespace_of(flags)
        _register(lib, namespace)
    except (OSError, KernelCacheError) as e:
        os.unlink(record)  # what this compiler makes is not the kernels: do not keep it
        os.unlink(library)
        raise KernelCacheError(f"{e}; deleted it") from None
    ops = getattr(torch.ops, namespace)
    plan = getattr(torch.classes, namespace).DecodePlan
    return KernelLibrary(lib, namespace, ops.matmul.default, ops.decode_bf16.default, plan), refused


# The two settings below are read once, at the first kernel call, as torch reads ATEN_CPU_CAPABILITY:
# every call consults them, and os.environ.get of an unset name costs a microsecond (a KeyError raised
# and caught) on a call of a few microseconds. Set them before the process starts, or switch the kernels
# off in the process with `switched_off`.


@functools.cache
def chosen_isa() -> str:
    """The instruction set of :data:`ISA_VARIABLE` (``native`` when unset)."""
    isa = os.environ.get(ISA_VARIABLE, "native")
    if isa not in ISA_MARCH:
        raise MatpressError(f"${ISA_VARIABLE} is {isa!r}; set it to one of {', '.join(ISA_MARCH)} or unset it")
    return isa


@functools.cache
def chosen_flags() -> tuple[str, ...]:
    """DEFAULT_FLAGS with the ``-march`` of :func:`chosen_isa`."""
    march = f"-march={ISA_MARCH[chosen_isa()]}"
    return tuple(march if f == "-march=native" else f for f in DEFAULT_FLAGS)


def load_library(flags: Optional[tuple[str, ...]] = None) -> Optional[KernelLibrary]:
    """The compiled kernels (built on first call) with ``flags`` (default :func:`chosen_flags`), or None
    after one warning when they cannot be built."""
    flags = flags or chosen_flags()
    if flags not in _LOADED:
        try:
            _LOADED[flags], refused = _open(flags)
            if refused:
                warnings.warn(
                    f"matpress: refused a cached kernel library: {refused}; rebuilt it", RuntimeWarning, stacklevel=2
                )
        except (OSError, RuntimeError) as e:
            hint = "" if isinstance(e, KernelCacheError) else " Install a C++ compiler with OpenMP (e.g. g++) to enable them."
            warnings.warn(
                f"matpress: the fast CPU kernels could not be built or loaded ({e}); using the slower "
                f"pure-PyTorch matmul.{hint}",
                RuntimeWarning,
                stacklevel=2,
            )
            _LOADED[flags] = None
    return _LOADED[flags]


ISA_NAMES = {0: "portable C++", 1: "AVX-512 VNNI", 2: "AVX2"}


def kernel_path() -> str:
    """Which path compressed layers take on this CPU, in words, for benchmark headers."""
    lib = None if disabled() else load_library()
    return "the formats' own PyTorch matmul (no compiled kernels)" if lib is None else f"compiled kernels, {ISA_NAMES[lib.isa()]}"


def disabled() -> bool:
    """Whether the compiled kernels are off (every format then uses its own matmul): inside
    :func:`switched_off`, or for the process by ``MATPRESS_KERNELS=0``."""
    return _SWITCHED_OFF > 0 or disabled_by_environment()


@functools.cache
def disabled_by_environment() -> bool:
    """``MATPRESS_KERNELS=0`` at the first kernel call switches the compiled kernels off for the process."""
    return os.environ.get("MATPRESS_KERNELS", "1") == "0"


_SWITCHED_OFF = 0  # depth of nested switched_off blocks


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """The compiled kernels off for the duration (the formats' own exact matmul runs)."""
    global _SWITCHED_OFF
    _SWITCHED_OFF += 1
    try:
        yield
    finally:
        _SWITCHED_OFF -= 1
