"""Editing saved checkpoints the way an attacker or a clumsy user would: the manifest's JSON, the tensor
file's raw safetensors header and data, and re-signing (recomputing the digests as ``save`` does) so
an edit reaches the checks behind the digests."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable

from matpress.io import file_entry
from matpress.manifest import BODY_DIGEST_KEY, MANIFEST, TENSORS, body_digest


def split_tensor_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header JSON, data section) of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_tensor_file(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def resign(directory: Path) -> None:
    """Record the manifest's body digest in the tensor file and every file's size and SHA-256 in the
    manifest, as ``save`` does, whatever was edited before."""
    manifest = json.loads((directory / MANIFEST).read_text())
    path = directory / TENSORS
    header, body = split_tensor_file(path.read_bytes())
    header.setdefault("__metadata__", {})[BODY_DIGEST_KEY] = body_digest(manifest)
    path.write_bytes(join_tensor_file(header, body))
    manifest["files"] = {name: file_entry(directory / name) for name in manifest["files"]}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], Any], sign: bool = True) -> None:
    """Apply ``change`` to the parsed manifest, write it back and (by default) re-sign the checkpoint."""
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    if sign:
        resign(directory)
