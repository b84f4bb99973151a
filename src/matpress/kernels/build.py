"""Compile the C++ kernels at first use, for the CPU that runs them, and load them with ctypes.

The library is built with the system C++ compiler (``$CXX``, else ``c++``/``g++``) as
``-O3 -march=native -fopenmp`` into a cache directory (``$MATPRESS_CACHE`` or ``~/.cache/matpress``)
under a name keyed by the source, the flags, the compiler and the CPU's feature flags, so a machine
builds once and a different CPU never loads a library built for another. OpenMP resolves to the
``libgomp`` that torch has already loaded, so kernels and torch share one thread pool.

When no compiler is found or the build fails, :func:`load_library` warns once and returns None; the
kernels then decline and every format uses its own (pure PyTorch, exact) ``matmul``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch  # noqa: F401  (loads torch's libgomp before ours, so both share one OpenMP runtime)

SOURCE = Path(__file__).with_name("lowbit.cpp")
DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_LOADED: dict[tuple[str, ...], Optional[ctypes.CDLL]] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$MATPRESS_CACHE/kernels`` or ``~/.cache/matpress/kernels``."""
    root = os.environ.get("MATPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "matpress")
    return Path(root) / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (part of the cache key), or the machine name where /proc is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.mp_isa.restype = i
    lib.mp_isa.argtypes = []
    lib.mp_matmul.restype = i
    lib.mp_matmul.argtypes = [i, p, p, p, i, i, i, p, i, i, i, i, i, p, i, i, i]
    lib.mp_decode_bf16.restype = i
    lib.mp_decode_bf16.argtypes = [i, p, p, p, i, i, i, i, i, i, i, p, i, i]
    return lib


def build(flags: tuple[str, ...] = DEFAULT_FLAGS) -> Path:
    """Compile the kernels with ``flags`` (cached) and return the shared library's path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cxx.encode(), cpu_flags().encode()]))
    target = cache_dir() / f"lowbit-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cxx} failed on {SOURCE}:\n{run.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(flags: tuple[str, ...] = DEFAULT_FLAGS) -> Optional[ctypes.CDLL]:
    """The compiled kernels (built on first call), or None after one warning when they cannot be built."""
    if flags not in _LOADED:
        try:
            _LOADED[flags] = _declare(ctypes.CDLL(str(build(flags))))
        except (OSError, RuntimeError) as e:
            warnings.warn(
                f"matpress: the fast CPU kernels could not be built ({e}); using the slower pure-PyTorch "
                "matmul. Install a C++ compiler with OpenMP (e.g. g++) to enable them.",
                RuntimeWarning,
                stacklevel=2,
            )
            _LOADED[flags] = None
    return _LOADED[flags]


def disabled() -> bool:
    """``MATPRESS_KERNELS=0`` switches the compiled kernels off (every format uses its own matmul)."""
    return os.environ.get("MATPRESS_KERNELS", "1") == "0"
