"""Directories written as one transaction: everything goes into a fresh staging directory beside the
target, named with the writing process's id, which is renamed into place only when complete. Any
failure, KeyboardInterrupt included, removes the staging directory; the leftovers of a process killed
outright (``kill -9``) are cleaned up by the next write of the same target. Checkpoints
(:func:`matpress.save`) and the converted-model cache (:mod:`matpress.models`) are written this way."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Optional

NEW, OLD = "new", "old"  # a write's directories beside its target: the one being written, the replaced one


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory in ``parent`` (permissions from the umask, unlike ``tempfile.mkdtemp``)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def work_prefix(target: Path, role: str, pid: Optional[int] = None) -> str:
    """Name prefix of a write's work directory beside ``target``; it carries the writing process's id so
    that a later write can tell the leftovers of a process killed outright from a write still running."""
    return f".{target.name}.matpress-{role}-{os.getpid() if pid is None else pid}-"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_killed_writes(target: Path) -> None:
    """Clean up after writes of ``target`` whose process was killed outright: their staging directories
    are deleted, and a replaced directory left aside is put back when the target is gone (the kill fell
    between the two renames) or deleted when the new one is in place."""
    pattern = re.compile(re.escape(f".{target.name}.matpress-") + r"(new|old)-(\d+)-[0-9a-f]+")
    for path in sorted(target.parent.iterdir()):
        found = pattern.fullmatch(path.name)
        if found is None or path.is_symlink() or not path.is_dir() or process_alive(int(found.group(2))):
            continue
        if found.group(1) == OLD and not os.path.lexists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``; an existing target is renamed aside
    first (and restored if the rename fails), then deleted."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    else:
        aside = fresh_dir(target.parent, work_prefix(target, OLD))
        os.rename(target, aside)  # replaces the empty placeholder
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync(target.parent)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A fresh directory to write ``target``'s files into; when the block ends normally its files are
    synced and it replaces ``target``, when it raises it is deleted and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_killed_writes(target)
    staging = fresh_dir(target.parent, work_prefix(target, NEW))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                fsync(path)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
