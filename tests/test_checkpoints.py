"""Hostile and broken checkpoints: digests, the manifest schema, bounded reading and allocation, and
saving as a transaction (issue 10, parts 4 and 5)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import matpress
from matpress.cli import main
from matpress.errors import CheckpointError, FormatError
from matpress.formats import SparseFormat, TernaryFormat, format_class
from matpress.io import HF_CONFIG, check_output_location, read_checkpoint
from matpress.manifest import MANIFEST, TENSORS, max_manifest_bytes

from checkpoint_edits import edit_manifest, resign, split_tensor_file, join_tensor_file
from conftest import tiny_llama


def llama_inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(llama_inputs()).logits


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama, int4 with 32-column groups, saved; yields its directory."""
    model = tiny_llama()
    matpress.compress(model, matpress.Recipe.from_dict({"default": {"method": "rtn", "bits": 4, "group_size": 32}}), progress=False)
    return matpress.save(model, tmp_path / "ckpt")


def one_line_error(argv, capsys) -> str:
    """Run the CLI, check it exits 2 with one line on stderr and no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


# -- part 4: digests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["base_model"]["config"].update(rms_norm_eps=0.1),
        lambda m: m["base_model"]["config"]["rope_parameters"].update(rope_theta=50.0),
        # 64 columns in groups of 33 are still 2 groups: every tensor keeps its shape
        lambda m: m["layers"]["model.layers.0.mlp.gate_proj"]["config"].update(group_size=33),
    ],
    ids=["norm-epsilon", "rope-base", "group-size"],
)
def test_an_edit_that_keeps_every_tensor_shape_is_detected(checkpoint, change, capsys):
    before = logits(matpress.load(checkpoint))
    digest = read_checkpoint(checkpoint).digest
    edit_manifest(checkpoint, change, sign=False)
    with pytest.raises(CheckpointError, match="do not belong together"):
        matpress.load(checkpoint)
    assert "do not belong together" in one_line_error(["info", str(checkpoint)], capsys)
    # re-signed, it is a different checkpoint: it loads, different, and only the published digest tells
    resign(checkpoint)
    assert not torch.equal(logits(matpress.load(checkpoint)), before)
    with pytest.raises(CheckpointError, match=f"is not the expected sha256:{digest}"):
        matpress.load(checkpoint, expect_digest=digest)
    assert "different checkpoint" in one_line_error(["info", str(checkpoint), "--expect-digest", digest], capsys)


def test_the_checkpoint_digest_names_the_content(checkpoint, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(checkpoint):
        (copy / name).write_bytes((checkpoint / name).read_bytes())
    digest = read_checkpoint(checkpoint).digest
    assert read_checkpoint(copy).digest == digest
    assert main(["info", str(copy), "--expect-digest", f"sha256:{digest.upper()}"]) == 0
    assert f"checkpoint digest: sha256:{digest}" in capsys.readouterr().out
    assert torch.equal(logits(matpress.load(copy, expect_digest=digest)), logits(matpress.load(checkpoint)))
    with pytest.raises(CheckpointError, match="not a SHA-256"):
        matpress.load(checkpoint, expect_digest="abc")


# -- part 4: allocations sized by the manifest ----------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        # 4M x 64 fp32 is 1 GB built and initialised before the old loader compared a shape
        (lambda c: c.update(vocab_size=4_000_000), r"embed_tokens.weight is \(128, 64\) float32, the model's is \(4000000, 64\)"),
        (lambda c: c.update(num_hidden_layers=100_000), "builds more than"),
        (lambda c: c.update(intermediate_size=10**7), "mlp.gate_proj: manifest shape"),
    ],
    ids=["vocabulary", "layers", "intermediate-size"],
)
def test_inflated_sizes_are_refused_before_allocating(checkpoint, change, match):
    edit_manifest(checkpoint, lambda m: change(m["base_model"]["config"]))
    with pytest.raises(CheckpointError, match=match):
        matpress.load(checkpoint)


class TableConfig(transformers.PretrainedConfig):
    model_type = "matpress-table"

    def __init__(self, rows: int = 4, table: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.rows, self.table = rows, table


class TableModel(transformers.PreTrainedModel):
    """A model with an unsaved buffer whose size only the config sets."""

    config_class = TableConfig

    def __init__(self, config: TableConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.rows, config.rows)
        self.register_buffer("table", torch.arange(config.table), persistent=False)
        self.post_init()


def test_an_unsaved_buffer_sized_by_the_config_is_bounded(tmp_path, monkeypatch):
    # load finds model classes as attributes of the transformers module (in sys.modules at call time)
    monkeypatch.setattr(sys.modules["transformers"], "TableModel", TableModel, raising=False)
    path = matpress.save(TableModel(TableConfig()), tmp_path / "table")
    assert torch.equal(matpress.load(path).table, torch.arange(8))
    edit_manifest(path, lambda m: m["base_model"]["config"].update(table=10**10))  # 80 GB of int64
    with pytest.raises(CheckpointError, match="unsaved buffers"):
        matpress.load(path)


def csr_layer() -> SparseFormat:
    torch.manual_seed(0)
    return SparseFormat.encode(torch.randn(6, 40), sparsity=0.9, layout="csr")


def tampered(fmt, key: str, edit) -> dict:
    tensors = {k: t.clone() for k, t in fmt.to_tensors().items()}
    edit(tensors[key])
    return tensors


@pytest.mark.parametrize(
    "key,edit,match",
    [
        ("row_ptr", lambda t: t.__setitem__(-1, 2**30), "row pointers"),  # one 2**30-entry allocation before
        ("row_ptr", lambda t: t.__setitem__(0, 1), "row pointers"),
        ("row_ptr", lambda t: t.__setitem__(2, t[1] - 1), "row pointers"),
        ("col_idx", lambda t: t.__setitem__(0, 40), r"column indices must lie in \[0, 40\)"),
        ("col_idx", lambda t: t.__setitem__(0, -3), r"column indices must lie in \[0, 40\)"),
    ],
)
def test_csr_index_tensors_are_validated_before_use(key, edit, match):
    fmt = csr_layer()
    assert int(fmt.positions["row_ptr"][2]) > int(fmt.positions["row_ptr"][1])  # rows 0 and 1 keep entries
    with pytest.raises(FormatError, match=match):
        SparseFormat.from_tensors(fmt.shape, fmt.config(), tampered(fmt, key, edit))


def test_repeated_csr_positions_are_refused():
    fmt = csr_layer()
    row = int(torch.argmax(fmt.positions["row_ptr"].diff()))
    start = int(fmt.positions["row_ptr"][row])
    tensors = tampered(fmt, "col_idx", lambda t: t.__setitem__(start + 1, t[start]))
    with pytest.raises(FormatError, match="increase within each row"):
        SparseFormat.from_tensors(fmt.shape, fmt.config(), tensors)


def test_impossible_ternary_bytes_are_refused_when_loaded():
    torch.manual_seed(0)
    fmt = TernaryFormat.encode(torch.randn(4, 20))
    with pytest.raises(FormatError, match="byte above 242"):
        TernaryFormat.from_tensors(fmt.shape, fmt.config(), tampered(fmt, "packed", lambda t: t.__setitem__((0, 0), 250)))


@pytest.mark.parametrize(
    "spec",
    [{"format": "dense", "shape": [1, 4], "config": []}, {"format": ["dense"], "shape": [1, 4], "config": {}}],
)
def test_malformed_child_specs_are_refused(spec):
    fmt = csr_layer()
    config = {**fmt.config(), "values": spec}
    with pytest.raises(FormatError):
        format_class("sparse").from_tensors(fmt.shape, config, fmt.to_tensors())


# -- part 4: structure ----------------------------------------------------------------------------

LAYER = "model.layers.0.mlp.up_proj"


def set_in(*path_and_value):
    *path, value = path_and_value

    def change(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value

    return change


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


MALFORMED = {
    "manifest-is-a-list": lambda m: [m],
    "layers-is-a-list": set_in("layers", []),
    "layer-is-a-list": set_in("layers", LAYER, [1, 2]),
    "layer-without-tensors": lambda m: m["layers"][LAYER].pop("tensors"),
    "layer-without-kind": lambda m: m["layers"][LAYER].pop("kind"),
    "files-without-digest": lambda m: m["files"][TENSORS].pop("sha256"),
    "files-entry-is-a-string": set_in("files", TENSORS, "abc"),
    "files-without-tensor-file": lambda m: m["files"].pop(TENSORS),
    "file-outside-the-directory": set_in("files", "../x", {"bytes": 1, "sha256": "0" * 64}),
    "unknown-dtype": set_in("layers", LAYER, "tensors", "packed", "dtype", "float99"),
    "shape-of-strings": set_in("layers", LAYER, "tensors", "packed", "shape", ["a", 3]),
    "zero-dimension": set_in("layers", LAYER, "shape", [0, 64]),
    "one-dimension": set_in("layers", LAYER, "shape", [64]),
    "negative-dimension": set_in("layers", LAYER, "shape", [-64, 64]),
    "huge-dimension": set_in("layers", LAYER, "shape", [10**30, 64]),
    "base-model-is-null": set_in("base_model", None),
    "config-is-a-list": set_in("base_model", "config", [1]),
    "init-kwargs-is-a-list": set_in("base_model", "init_kwargs", []),
    "tied-is-a-list": set_in("tied", []),
    "format-is-a-number": set_in("layers", LAYER, "format", 7),
    "bias-is-a-string": set_in("layers", LAYER, "bias", "yes"),
    "description-is-huge": set_in("layers", LAYER, "description", "x" * 10**5),
    "unknown-field": set_in("surprise", 1),
    "deep-recipe": set_in("recipe", nested(100)),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_manifests_are_refused_with_the_file_named(checkpoint, name, capsys):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest = MALFORMED[name](manifest) or manifest
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=str(checkpoint / MANIFEST)) as e:
        matpress.load(checkpoint)
    assert len(str(e.value)) < 800  # offending values are quoted, not copied
    assert str(checkpoint / MANIFEST) in one_line_error(["info", str(checkpoint)], capsys)


@pytest.mark.parametrize(
    "text",
    [
        lambda t: "[" * 100_000 + "]" * 100_000,
        lambda t: t.replace('"tied": {', '"tied": {"a": "b", "a": "c", ', 1),
        lambda t: t.replace('"format_version": 2', '"format_version": 2, "recipe": ' + "1" * 5000, 1),
        lambda t: t.encode("utf-16").decode("latin-1"),
    ],
    ids=["deep-nesting", "duplicate-key", "huge-integer", "not-utf8"],
)
def test_unparseable_manifests_are_refused(checkpoint, text, capsys):
    path = checkpoint / MANIFEST
    path.write_bytes(text(path.read_text()).encode("latin-1"))
    with pytest.raises(CheckpointError, match=str(path)):
        matpress.load(checkpoint)
    assert str(path) in one_line_error(["info", str(checkpoint)], capsys)


def test_an_oversized_manifest_is_refused_before_it_is_read(checkpoint, capsys):
    path = checkpoint / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["recipe"] = {"junk": [{}] * 4_000_000}  # 20 MB of JSON, ~300 MB once parsed
    path.write_text(json.dumps(manifest))
    limit = max_manifest_bytes(len(read_header_names(checkpoint)))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="more than the .* a checkpoint of .* tensors needs"):
            read_checkpoint(checkpoint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit
    assert "bytes, more than" in one_line_error(["info", str(checkpoint)], capsys)


def read_header_names(directory) -> list[str]:
    header, _ = split_tensor_file((directory / TENSORS).read_bytes())
    return [k for k in header if k != "__metadata__"]


def test_a_manifest_that_is_not_a_regular_file_is_refused(checkpoint):
    (checkpoint / MANIFEST).unlink()
    os.mkfifo(checkpoint / MANIFEST)  # reading it would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        matpress.load(checkpoint)


def test_tensor_file_header_edits_are_refused(checkpoint):
    path = checkpoint / TENSORS
    header, body = split_tensor_file(path.read_bytes())
    key = f"{LAYER}.scales"
    header[key]["dtype"] = "I16"  # same bytes, other dtype
    path.write_bytes(join_tensor_file(header, body))
    resign(checkpoint)
    with pytest.raises(CheckpointError, match=f"layer {LAYER}: tensor scales is .* int16 in .* float16 in the manifest"):
        matpress.load(checkpoint)


# -- part 5: saving is a transaction --------------------------------------------------------------


class InterruptedTokenizer:
    """Ctrl-C arrives half-way through writing the tokenizer's files."""

    def save_pretrained(self, directory):
        Path(directory, "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt


def test_saving_over_a_checkpoint_replaces_it_whole(checkpoint, tmp_path):
    (checkpoint / "tokenizer.json").write_text("{}")  # a stale file of the old checkpoint
    model = tiny_llama()
    matpress.save(model, checkpoint, extra_files=lambda d: (d / "sensitivity.json").write_text("{}"))
    assert sorted(os.listdir(checkpoint)) == sorted([MANIFEST, TENSORS, HF_CONFIG, "sensitivity.json"])
    assert "sensitivity.json" in read_checkpoint(checkpoint).manifest["files"]
    assert torch.equal(logits(matpress.load(checkpoint)), logits(model))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_every_file_of_a_checkpoint_gets_the_mode_the_umask_gives(checkpoint):
    """safetensors writes its file 0600; the manifest beside it follows the umask: one mode for all."""
    old = os.umask(0o027)
    try:
        matpress.save(tiny_llama(), checkpoint)
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((checkpoint / name).stat().st_mode) for name in os.listdir(checkpoint)}
    assert modes == {MANIFEST: 0o640, TENSORS: 0o640, HF_CONFIG: 0o640}


def test_a_save_cleans_up_after_a_save_killed_outright(checkpoint, tmp_path):
    """kill -9 runs no clean-up: the next save of the target deletes a dead process's staging directory,
    puts back a checkpoint it had renamed aside, and leaves a running save's directories alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    staging = tmp_path / f".ckpt.matpress-new-{pid}-0a1b2c"
    staging.mkdir()
    (staging / TENSORS).write_bytes(b"\0" * 1000)
    running = tmp_path / f".ckpt.matpress-new-{os.getpid()}-3d4e5f"
    running.mkdir()
    aside = tmp_path / f".ckpt.matpress-old-{pid}-6a7b8c"
    before = logits(matpress.load(checkpoint))
    os.rename(checkpoint, aside)  # killed between renaming the old checkpoint aside and the new one in
    matpress.atomic.recover_killed_writes(checkpoint)
    assert torch.equal(logits(matpress.load(checkpoint)), before)  # the old checkpoint is back whole
    assert not staging.exists() and running.exists()
    os.rename(checkpoint, aside)
    model = tiny_llama()
    matpress.save(model, checkpoint)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", running.name])
    assert torch.equal(logits(matpress.load(checkpoint)), logits(model))


def test_an_interrupted_save_leaves_the_old_checkpoint_whole(checkpoint, tmp_path):
    before = logits(matpress.load(checkpoint))
    listing = sorted(os.listdir(checkpoint))
    with pytest.raises(KeyboardInterrupt):
        matpress.save(tiny_llama(), checkpoint, tokenizer=InterruptedTokenizer())
    assert sorted(os.listdir(checkpoint)) == listing
    assert torch.equal(logits(matpress.load(checkpoint)), before)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left


def test_a_directory_that_is_not_a_checkpoint_needs_force(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty .*notes.txt.* pass --force"):
        matpress.save(tiny_llama(), target)
    assert (target / "notes.txt").read_text() == "keep me"
    matpress.save(tiny_llama(), target, force=True)
    assert sorted(os.listdir(target)) == sorted([MANIFEST, TENSORS, HF_CONFIG])


def test_a_symlinked_manifest_is_not_followed(tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / MANIFEST).symlink_to(victim)
    with pytest.raises(CheckpointError, match="not a matpress checkpoint"):
        matpress.save(tiny_llama(), target)
    matpress.save(tiny_llama(), target, force=True)
    assert victim.read_text() == "precious" and not (target / MANIFEST).is_symlink()


def test_a_symlinked_target_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(CheckpointError, match="symbolic link"):
        matpress.save(tiny_llama(), tmp_path / "link", force=True)
    assert os.listdir(real) == []


@pytest.mark.parametrize(
    "out,match",
    [("file.txt/ckpt", "is not a directory"), ("file.txt", "is a file"), ("/proc/matpress-ckpt", "not writable")],
)
def test_compress_checks_the_output_location_first(tiny_causal_dir, tmp_path, monkeypatch, capsys, out, match):
    (tmp_path / "file.txt").write_text("x")

    def no_compression(*args, **kwargs):
        raise AssertionError("compression ran before the output location was checked")

    monkeypatch.setattr(matpress, "compress", no_compression)
    err = one_line_error(["compress", str(tiny_causal_dir), "--out", str(tmp_path / out), "--quiet"], capsys)
    assert match in err


def test_a_full_filesystem_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match="only 0.0 MB free"):
        matpress.save(tiny_llama(), tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="free"):
        check_output_location(tmp_path / "ckpt", nbytes=10**6)
