"""The checkpoint manifest (``matpress.json``): its schema, a bounded parser, and its digests.

:func:`parse_manifest` turns the file's bytes into a validated dict or raises a
:class:`~matpress.errors.CheckpointError` naming the file, the field and the offending value
(quoted by :func:`matpress.errors.quote`, bounded). The schema is written once, below, as small
validator functions; ``load``, ``info`` and ``report`` all read manifests through it. Every field has
a type and bounds; unknown fields are refused; nesting is at most :data:`MAX_DEPTH` deep.

Each layer entry has a ``kind`` and is validated by ``LAYER_KINDS[kind]``: a new kind of compressed
layer is one more entry there (and one more in :data:`matpress.io.LAYER_MODULES`).

Digests (see :mod:`matpress.io` for how they are checked):

- the **body digest**: SHA-256 of the canonical JSON of the manifest without its ``files`` entry; it
  is recorded in the tensor file's safetensors metadata (``matpress_manifest_sha256``);
- the manifest's ``files`` entry records the size and SHA-256 of every other file of the checkpoint
  (the tensor file, the tokenizer's files, ``sensitivity.json``);
- the **checkpoint digest**: SHA-256 of the canonical JSON of the whole manifest. It covers the body
  and, through ``files``, every byte of every other file.

Canonical JSON is ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` of the
parsed manifest, so whitespace and key order do not matter but every value does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, NoReturn

from matpress import __version__
from matpress.errors import CheckpointError, FormatError, quote
from matpress.formats import format_class

FORMAT_VERSION = 2
MANIFEST = "matpress.json"
TENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor index, in place of TENSORS
BODY_DIGEST_KEY = "matpress_manifest_sha256"

# A manifest is a few KB of base-model config plus well under 1 KB per stored tensor; refuse more
# before reading it whole (``max_manifest_bytes``), and never read more than MAX_MANIFEST_BYTES.
MAX_MANIFEST_BYTES = 16 << 20
MANIFEST_BYTES_BASE = 1 << 20
MANIFEST_BYTES_PER_TENSOR = 4 << 10
MAX_DEPTH = 32
MAX_DESCRIPTION_CHARS = 200
MAX_NAME_CHARS = 1024
MAX_DIM = 1 << 40
MAX_FILES = 256

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")
RESAVE = "re-save the checkpoint with matpress.save, or ask its author for an intact copy"


def max_manifest_bytes(n_tensors: int) -> int:
    """The largest manifest a checkpoint storing ``n_tensors`` tensors can legitimately have."""
    return min(MAX_MANIFEST_BYTES, MANIFEST_BYTES_BASE + MANIFEST_BYTES_PER_TENSOR * n_tensors)


def canonical_bytes(data: Any) -> bytes:
    """The canonical JSON encoding the digests are computed over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def body_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its ``files`` entry (recorded in the tensor file)."""
    return hashlib.sha256(canonical_bytes({k: v for k, v in manifest.items() if k != "files"})).hexdigest()


def checkpoint_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the whole manifest: with the digests under ``files``, it covers every file."""
    return hashlib.sha256(canonical_bytes(manifest)).hexdigest()


def normalize_digest(text: str) -> str:
    """A user-given checkpoint digest as 64 lower-case hex digits (an optional ``sha256:`` prefix dropped)."""
    digest = str(text).strip().lower().removeprefix("sha256:")
    if not _is_sha256(digest):
        raise CheckpointError(
            f"expected checkpoint digest {quote(text)} is not a SHA-256 (64 hex digits); "
            "pass the digest that `matpress info` prints"
        )
    return digest


# -- parsing --------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Invalid("an object", f"holds the key {quote(duplicate)} twice")
    return result


def _depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """Decode, parse and validate a manifest's bytes (read from ``path``, named in errors)."""
    try:
        text = data.decode("utf-8")
        manifest = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}); the manifest is corrupted; {RESAVE}") from None
    except ValueError as e:  # invalid JSON, or an integer too long to convert
        raise CheckpointError(f"{path} is not valid JSON ({quote(str(e))}); the manifest is corrupted; {RESAVE}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the manifest nests deeper than {MAX_DEPTH} levels; {RESAVE}") from None
    except _Invalid as e:
        _fail(path, e)
    if _depth(manifest) > MAX_DEPTH:
        raise CheckpointError(f"{path}: the manifest nests deeper than {MAX_DEPTH} levels; {RESAVE}")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: the manifest must be a JSON object, not {_type_name(manifest)}; {RESAVE}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"{path}: checkpoint format version {quote(version)} is not supported by matpress {__version__} "
            f"(it reads version {FORMAT_VERSION}); use the matpress version that wrote it"
        )
    try:
        MANIFEST_SCHEMA(manifest, "the manifest")
    except _Invalid as e:
        _fail(path, e)
    return manifest


# -- the schema -----------------------------------------------------------------------------------
# A validator is called as ``check(value, where)`` and raises _Invalid; ``where`` names the field.

Validator = Callable[[Any, str], None]
_MISSING = object()


class _Invalid(Exception):
    def __init__(self, where: str, problem: str, value: Any = _MISSING):
        super().__init__(where, problem)
        self.where, self.problem, self.value = where, problem, value


def _fail(path: Path, e: _Invalid) -> NoReturn:
    got = "" if e.value is _MISSING else f", got {quote(e.value)}"
    raise CheckpointError(f"{path}: {e.where} {e.problem}{got}; {RESAVE}") from None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def record(required: dict[str, Validator], optional: dict[str, Validator] | None = None) -> Validator:
    """An object with exactly these keys (``optional`` ones may be absent)."""
    optional = optional or {}

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(where, f"must be an object, not {_type_name(value)}", value)
        missing = [k for k in required if k not in value]
        if missing:
            raise _Invalid(where, f"lacks the field {missing[0]!r}")
        unknown = [k for k in value if k not in required and k not in optional]
        if unknown:
            raise _Invalid(where, f"has the unknown field {quote(unknown[0])}")
        for key, item in value.items():
            (required.get(key) or optional[key])(item, f"{where}.{key}" if where != "the manifest" else key)

    return check


def mapping(key: Validator, item: Validator, max_items: int) -> Validator:
    """An object with any keys ``key`` accepts, each value checked by ``item``."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(where, f"must be an object, not {_type_name(value)}", value)
        if len(value) > max_items:
            raise _Invalid(where, f"has {len(value)} entries, more than the {max_items} a checkpoint can have")
        for k, v in value.items():
            key(k, f"a key of {where}")
            item(v, f"{where}[{quote(k)}]")

    return check


def list_of(item: Validator, min_len: int, max_len: int) -> Validator:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise _Invalid(where, f"must be a list of {min_len} to {max_len} entries", value)
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")

    return check


def integer(low: int, high: int) -> Validator:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _Invalid(where, f"must be an integer from {low} to {high}", value)

    return check


def string(max_chars: int, name: bool = False) -> Validator:
    """A string of at most ``max_chars`` characters; with ``name``, non-empty and without control characters."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or len(value) > max_chars:
            raise _Invalid(where, f"must be a string of at most {max_chars} characters", value)
        if name and (not value or any(ord(c) < 32 or ord(c) == 127 for c in value)):
            raise _Invalid(where, "must be a non-empty name without control characters", value)

    return check


def one_of(choices: tuple[Any, ...]) -> Validator:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(where, f"must be one of {list(choices)}", value)

    return check


def nullable(inner: Validator) -> Validator:
    def check(value: Any, where: str) -> None:
        if value is not None:
            inner(value, where)

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(where, "must be true or false", value)


def json_object(value: Any, where: str) -> None:
    """Free-form data (a model config, a recipe): an object; its depth is bounded by the parser."""
    if not isinstance(value, dict):
        raise _Invalid(where, f"must be an object, not {_type_name(value)}", value)


def scalar(value: Any, where: str) -> None:
    if not (value is None or isinstance(value, (bool, int, float, str))):
        raise _Invalid(where, "must be a number, string, boolean or null", value)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def sha256_hex(value: Any, where: str) -> None:
    if not _is_sha256(value):
        raise _Invalid(where, "must be a SHA-256 digest (64 lower-case hex digits)", value)


def file_name(value: Any, where: str) -> None:
    """A plain file name inside the checkpoint directory (no path, not the manifest itself)."""
    string(255, name=True)(value, where)
    if "/" in value or "\\" in value or value in (".", "..", MANIFEST):
        raise _Invalid(where, "must be a plain file name inside the checkpoint directory", value)


def known_format(value: Any, where: str) -> None:
    string(64, name=True)(value, where)
    try:
        format_class(value)
    except FormatError as e:
        raise _Invalid(where, str(e)) from None


NAME = string(MAX_NAME_CHARS, name=True)


def local_name(value: Any, where: str) -> None:
    """A format's name for one of its stored tensors (no dots: they separate layer and key)."""
    string(MAX_NAME_CHARS, name=True)(value, where)
    if "." in value:
        raise _Invalid(where, "must not contain '.'", value)


TENSOR_ENTRY = record({"shape": list_of(integer(0, MAX_DIM), 0, 8), "dtype": one_of(DTYPE_NAMES)})
FORMAT_FIELDS: dict[str, Validator] = {
    "format": known_format,
    "description": string(MAX_DESCRIPTION_CHARS),
    "shape": list_of(integer(1, MAX_DIM), 2, 2),
    "config": json_object,
    "tensors": mapping(local_name, TENSOR_ENTRY, 1024),
}
LINEAR_LAYER = record({**FORMAT_FIELDS, "kind": one_of(("linear",)), "bias": boolean})
EMBEDDING_FIELDS = record({
    **FORMAT_FIELDS,
    "kind": one_of(("embedding",)),
    "padding_idx": nullable(integer(0, MAX_DIM)),
    "tied_heads": list_of(NAME, 0, 64),
})


def embedding_layer(value: Any, where: str) -> None:
    EMBEDDING_FIELDS(value, where)
    rows = value["shape"][0]
    if value["padding_idx"] is not None and value["padding_idx"] >= rows:
        raise _Invalid(f"{where}.padding_idx", f"is not a row of the {rows}-row embedding", value["padding_idx"])


LAYER_KINDS: dict[str, Validator] = {"linear": LINEAR_LAYER, "embedding": embedding_layer}


def layer_entry(value: Any, where: str) -> None:
    kind = value.get("kind") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in LAYER_KINDS:
        raise _Invalid(f"{where}.kind", f"must be one of {sorted(LAYER_KINDS)}", kind)
    LAYER_KINDS[kind](value, where)


def files_entry(value: Any, where: str) -> None:
    mapping(file_name, record({"bytes": integer(0, 1 << 50), "sha256": sha256_hex}), MAX_FILES)(value, where)
    if TENSORS not in value and INDEX not in value:
        raise _Invalid(where, f"has no entry for {TENSORS} (or {INDEX} for a sharded checkpoint)")


MANIFEST_SCHEMA = record({
    "format_version": integer(FORMAT_VERSION, FORMAT_VERSION),
    "matpress_version": string(64),
    "base_model": record({
        "class": string(256, name=True),
        "source": nullable(string(4096)),
        "config": nullable(json_object),
        "init_kwargs": mapping(NAME, scalar, 64),
    }),
    "recipe": nullable(json_object),
    "layers": mapping(NAME, layer_entry, 1 << 20),
    "experts": mapping(NAME, string(256, name=True), 1 << 16),
    "tied": mapping(NAME, NAME, 1 << 20),
    "files": files_entry,
})


__all__ = [
    "BODY_DIGEST_KEY", "DTYPE_NAMES", "FORMAT_VERSION", "LAYER_KINDS", "MANIFEST", "MAX_DEPTH",
    "INDEX", "MAX_MANIFEST_BYTES", "TENSORS", "body_digest", "canonical_bytes", "checkpoint_digest",
    "max_manifest_bytes", "normalize_digest", "parse_manifest",
]
