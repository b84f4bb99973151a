"""The kernel cache (matpress.kernels.build) never loads a library it did not build and check, and
never crashes the process: damaged, foreign or planted files are refused and rebuilt, or the formats'
own matmul runs after one warning."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from matpress.formats import IntFormat
from matpress.kernels import build, lowbit

# A quick build (the portable path without optimization): these tests are about files, not speed.
FLAGS = ("-O0", "-shared", "-fPIC", "-std=c++20")

REAL_CXX = build.compiler()
pytestmark = pytest.mark.skipif(REAL_CXX is None, reason="no C++ compiler here: nothing is built or cached")


@pytest.fixture(scope="module")
def quick_compiler(tmp_path_factory) -> Path:
    """A "compiler" that copies one real build of the kernels (made here, once, by the real compiler
    through build.build) to its output: these tests build many times into fresh caches, and each real
    build spends seconds in torch's headers; what they test is the cache's files, not the compiler."""
    directory = tmp_path_factory.mktemp("template")
    template = build.build(REAL_CXX, FLAGS, directory / "lowbit-template.sha256")
    stub = directory / "cxx-copy"
    stub.write_text(f'#!/bin/sh\nfor out; do :; done\nexec cp {template} "$out"\n')
    stub.chmod(0o755)
    return stub


@pytest.fixture
def cache(tmp_path, monkeypatch, quick_compiler) -> Path:
    """A fresh cache directory in ``$MATPRESS_CACHE``, nothing loaded yet in this process, the quick
    compiler in ``$CXX``."""
    monkeypatch.setenv("MATPRESS_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(quick_compiler))
    monkeypatch.setattr(build, "_LOADED", {})
    return tmp_path / "kernels"


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def load(flags: tuple[str, ...] = FLAGS):
    """Load afresh (as a new process would), return the library and the warnings raised."""
    build._LOADED.pop(flags, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = build.load_library(flags)
    return lib, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def assert_works(lib) -> None:
    torch.manual_seed(0)
    fmt = IntFormat.encode(torch.randn(8, 64), bits=4, group_size=32)
    x = torch.randn(2, 64)
    y = lowbit.lowbit_matmul(lowbit.layout_of(fmt), x, lib)
    assert lib.isa() == 0 and bool(((y - fmt.matmul(x)).abs() <= 0.05 * fmt.matmul(x).abs().max()).all())


def built(cache: Path) -> tuple[Path, Path]:
    """Build into ``cache`` without loading (a test may then damage the file in place, which would
    crash a process that has it mapped) and return (library, record)."""
    cxx = build.compiler()
    record = build.record_path(FLAGS, cxx)
    library = build.build(cxx, FLAGS, record)
    assert entries(cache) == sorted([library.name, record.name])
    return library, record


def put(path: Path, data: bytes) -> None:
    """Replace ``path`` by a new file (as an attacker would; writing in place into a library this
    process has loaded would crash it)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def compile_c(tmp_path: Path, source: str, name: str) -> bytes:
    """A shared library from C++ ``source``, as bytes."""
    src, out = tmp_path / f"{name}.cpp", tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run([REAL_CXX, "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out.read_bytes()


def test_cache_directory_is_created_private_and_entries_are_checked(cache):
    lib, caught = load()
    assert not caught
    assert_works(lib)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (library,) = cache.glob("lowbit-*.so")
    (record,) = cache.glob("lowbit-*.sha256")
    assert build.verified_library(record) == library
    assert not library.stat().st_mode & 0o077 and not record.stat().st_mode & 0o077
    before = library.stat().st_mtime_ns
    lib, caught = load()  # as a later process: the cached entry, no rebuild, no warning
    assert not caught and library.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_library_is_rebuilt_in_a_process_that_survives(damage, cache, tmp_path):
    library, _ = built(cache)
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(len(data)))
    # a new process: before, loading a truncated library there was a Bus error
    code = textwrap.dedent(f"""
        import warnings
        from matpress.kernels import build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lib = build.load_library({FLAGS!r})
        print(lib.isa(), [str(w.message) for w in caught])
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MATPRESS_CACHE": str(cache.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("0 ") and "does not match the size" in run.stdout and "rebuilt" in run.stdout
    assert library.read_bytes() == data  # the same library again
    lib, caught = load()
    assert not caught
    assert_works(lib)


def test_library_without_the_symbols_is_refused_and_rebuilt(cache, tmp_path):
    library, _ = built(cache)
    put(library, compile_c(tmp_path, 'extern "C" int unrelated(void) { return 0; }', "unrelated"))
    lib, caught = load()
    assert len(caught) == 1 and "does not match" in caught[0] and str(library) in caught[0]
    assert_works(lib)


def test_compiler_writing_nothing_falls_back_and_caches_nothing(cache, tmp_path, monkeypatch):
    stub = tmp_path / "cxx-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    monkeypatch.setenv("CXX", str(stub))
    lib, caught = load()
    assert lib is None and len(caught) == 1 and "wrote no library" in caught[0]
    assert entries(cache) == []


def test_compiler_building_something_else_falls_back_and_caches_nothing(cache, tmp_path, monkeypatch):
    # a compiler that exits 0 with a valid library that is not the kernels: loaded (we built it), refused
    stub = tmp_path / "cxx-other"
    stub.write_text(f'#!/bin/sh\nfor out; do :; done\nexec {REAL_CXX} -shared -fPIC -x c++ /dev/null -o "$out"\n')
    stub.chmod(0o755)
    monkeypatch.setenv("CXX", str(stub))
    lib, caught = load()
    assert lib is None and len(caught) == 1 and "lacks the kernels' symbols" in caught[0]
    assert entries(cache) == []


PLANTED = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {{
    FILE* f = fopen("{marker}", "w");
    if (f) fclose(f);
}}
extern "C" int mp_isa(void) {{ return 42; }}
"""


def test_planted_library_at_the_cache_name_never_runs(cache, tmp_path):
    library, record = built(cache)
    marker = tmp_path / "marker"
    planted = compile_c(tmp_path, PLANTED.format(marker=marker), "planted")
    record.unlink()
    put(library, planted)  # the very name our build takes, with no record of ours
    lib, caught = load()
    assert not marker.exists() and not caught
    assert_works(lib)
    # a planted library with a record that matches it, both by another user (or writable by anyone)
    digest = hashlib.sha256(planted).hexdigest()
    other = build.library_path(record, digest)
    put(other, planted)
    put(record, f"{digest} {len(planted)}\n".encode())
    for path in (other, record):
        make_foreign(path, "other-owner" if os.geteuid() == 0 else "world-writable")
    lib, caught = load()
    assert not marker.exists() and len(caught) == 1 and str(record) in caught[0]
    assert_works(lib)


def make_foreign(path: Path, how: str) -> str:
    """Give ``path`` to another user, or make it writable by its group (or by anyone: mode 0777);
    return the reason the cache must give for refusing it."""
    if how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give a file to another user")
        os.chown(path, 12345, 12345)
        return "owned by uid 12345"
    path.chmod(0o777 if how == "world-writable" else 0o720)
    return "writable by group or others"


@pytest.mark.parametrize("which", ["library", "record"])
@pytest.mark.parametrize("how", ["other-owner", "group-writable", "world-writable"])
def test_foreign_or_writable_entry_is_refused_and_rebuilt(which, how, cache):
    library, record = built(cache)
    path = library if which == "library" else record
    expected = make_foreign(path, how)
    lib, caught = load()
    assert len(caught) == 1 and expected in caught[0] and str(path) in caught[0] and "rebuilt" in caught[0]
    assert_works(lib)
    assert path.stat().st_uid == os.geteuid() and not path.stat().st_mode & 0o022  # replaced by ours


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "other-owner", "a link"])
def test_cache_directory_that_is_not_private_is_refused(how, cache, tmp_path):
    if how == "a link":
        real = tmp_path / "elsewhere"
        real.mkdir(mode=0o700)
        cache.symlink_to(real)
        expected = "not a plain directory"
    else:
        cache.mkdir(mode=0o700)
        expected = make_foreign(cache, how)
    lib, caught = load()
    assert lib is None and len(caught) == 1
    assert expected in caught[0] and str(cache) in caught[0] and "MATPRESS_CACHE" in caught[0]
    assert entries(cache) == []


def test_record_that_is_not_a_digest_is_refused_and_rebuilt(cache):
    library, record = built(cache)
    put(record, b"../" * 21 + b"x 12\n")  # 64 characters that would lead out of the cache as a name
    lib, caught = load()
    assert len(caught) == 1 and "is not a digest record" in caught[0] and str(record) in caught[0]
    assert_works(lib)
