"""Streaming source weights from sharded bf16 safetensors (matpress.source) and sharded checkpoints:
the same compressed tensors as the in-memory path, one block's parameters in memory at a time."""

import gc
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import random_data, tiny_llama

import matpress
from matpress.errors import CheckpointError
from matpress.io import read_checkpoint
from matpress.nn.layers import FormatModule
from matpress.manifest import INDEX, MANIFEST
from matpress.models import load_pretrained
from matpress.walk import source as streaming
from matpress.walk.source import WeightSource, source_of

LAYERS = 3
GPTQ = {"default": {"method": "gptq", "bits": 4, "group_size": 32}}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A tiny Llama saved as bf16 safetensors shards with an index, as Hugging Face writes big models."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bf16-shards")
    tiny_llama(layers=LAYERS).to(torch.bfloat16).save_pretrained(directory, max_shard_size="30KB")
    assert (directory / INDEX).is_file()
    return directory


def compressed_tensors(model):
    return {
        f"{name}.{key}": getattr(m, key).clone()
        for name, m in model.named_modules() if isinstance(m, FormatModule) for key in m._format_keys
    }


@pytest.fixture
def block_watch(monkeypatch):
    """After every read from the source: the blocks (model.layers.<i>) whose parameters are in memory,
    and how many parameters are (in the model or in a layer it replaced meanwhile: the source's
    ``live`` list; what the model reaches is checked against it)."""
    seen = []
    materialise = WeightSource.materialise

    def watched(self, model, prefix, skip=None):
        count = materialise(self, model, prefix, skip)
        live = [names[0] for names, _ in self.live]
        reachable = {n for n, p in model.named_parameters() if not p.is_meta and not n.endswith(".bias")}
        assert reachable <= {n for names, _ in self.live for n in names}
        blocks = {int(m.group(1)) for n in live if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        seen.append((prefix, blocks, len(live)))
        return count

    monkeypatch.setattr(WeightSource, "materialise", watched)
    return seen


@pytest.mark.parametrize("recipe", [None, GPTQ], ids=["rtn", "gptq"])
def test_streamed_compression_equals_in_memory_and_holds_one_block(source_dir, block_watch, recipe):
    data = random_data(128)
    whole = load_pretrained(str(source_dir)).model
    assert source_of(whole) is None and next(whole.parameters()).dtype == torch.float32
    matpress.compress(whole, recipe, progress=False, calibration=data)
    streamed = load_pretrained(str(source_dir), stream=True).model
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in streamed.parameters())
    matpress.compress(streamed, recipe, progress=False, calibration=data)

    expected, got = compressed_tensors(whole), compressed_tensors(streamed)
    assert expected.keys() == got.keys() and len(got) > 0
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    # every compressed tensor now lives in a spill file (mapped), every dense weight back on disk
    assert set(source_of(streamed).spilled) == set(got) and source_of(streamed).live == []
    assert all(p.is_meta for n, p in streamed.named_parameters() if not n.endswith(".bias"))

    reads = [blocks for prefix, blocks, _ in block_watch if prefix.startswith("model.layers.")]
    assert len(reads) >= LAYERS  # one read per block (gptq) or per layer (rtn)
    assert all(len(blocks) <= 1 for _, blocks, _ in block_watch), block_watch
    fresh = tiny_llama(layers=1)
    one_block = len(list(fresh.model.layers[0].parameters()))
    outside = len(list(fresh.parameters())) - one_block  # embeddings, final norm, head: read to capture inputs
    assert max(count for _, _, count in block_watch) <= max(one_block, outside)

    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        out_whole = whole(ids).logits
    torch.testing.assert_close(_loaded_logits(streamed, ids, source_dir), out_whole, rtol=0, atol=0.05)


@pytest.mark.parametrize("calibrated", [False, True], ids=["weights", "calibrated"])
def test_streamed_budget_equals_in_memory_and_holds_one_block(source_dir, block_watch, calibrated):
    """The budget path measures over a walk of the stream and applies over one: never the whole model."""
    recipe = {"budget": "4bpw", "candidates": "quant"}
    data = random_data(128) if calibrated else None
    whole = load_pretrained(str(source_dir)).model
    expected = matpress.compress(whole, recipe, progress=False, calibration=data)
    streamed = load_pretrained(str(source_dir), stream=True).model
    got = matpress.compress(streamed, recipe, progress=False, calibration=data)
    assert got.allocation.choice == expected.allocation.choice
    assert len(set(got.allocation.choice)) > 1  # a mixed allocation
    want, have = compressed_tensors(whole), compressed_tensors(streamed)
    assert want.keys() == have.keys() and len(have) > 0
    for key in want:
        assert torch.equal(want[key], have[key]), key
    assert source_of(streamed) is not None and set(source_of(streamed).spilled) == set(have)
    assert all(len(blocks) <= 1 for _, blocks, _ in block_watch), block_watch
    assert any(prefix.startswith("model.layers.") for prefix, _, _ in block_watch)


def test_the_walk_hands_freed_memory_back_after_every_block(source_dir, monkeypatch):
    """glibc keeps freed tensors' memory: an 8B RTN pass grew by 0.07 GB a block without a trim."""
    trims = []
    monkeypatch.setattr(streaming, "return_freed_memory", lambda: trims.append(1))
    streamed = load_pretrained(str(source_dir), stream=True).model
    matpress.compress(streamed, None, progress=False)
    assert len(trims) == LAYERS
    matpress.compress(load_pretrained(str(source_dir)).model, None, progress=False)
    assert len(trims) == LAYERS  # nothing streamed, nothing to hand back


def spill_pages_resident(spill_dir) -> int:
    """Bytes of this process's mappings of files in ``spill_dir`` that are resident (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = len(fields) > 5 and fields[5].startswith(str(spill_dir))
        elif current and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_a_release_drops_the_spilled_layers_resident_pages(source_dir):
    """Mapped spill files count in RSS once read: the 1B GPTQ run kept every block's compressed layers
    resident. After a release none of their pages is; they still read back the same."""
    streamed = load_pretrained(str(source_dir), stream=True).model
    matpress.compress(streamed, None, progress=False)
    source = source_of(streamed)
    before = {k: t.clone() for k, t in compressed_tensors(streamed).items()}  # reads every page
    spilled_bytes = sum(t.nbytes for t in before.values())
    assert spill_pages_resident(source._spill_dir) >= spilled_bytes  # whole pages hold them
    source.release(streamed, "model.layers.0")
    assert spill_pages_resident(source._spill_dir) == 0
    after = compressed_tensors(streamed)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_spill_files_of_a_killed_process_are_deleted_by_the_next_one(source_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, running = tmp_path / f"{streaming.SPILL_PREFIX}{gone.pid}-abc123", tmp_path / f"{streaming.SPILL_PREFIX}{os.getpid()}-def456"
    for d in (stale, running):
        d.mkdir()
        (d / "0.bin").write_bytes(b"x")
    streamed = load_pretrained(str(source_dir), stream=True).model
    matpress.compress(streamed, None, progress=False)
    spill_dir = source_of(streamed)._spill_dir
    assert not stale.exists() and running.exists() and spill_dir.parent == tmp_path
    assert spill_dir.name.startswith(f"{streaming.SPILL_PREFIX}{os.getpid()}-") and any(spill_dir.iterdir())
    del streamed
    gc.collect()
    assert not spill_dir.exists()  # deleted with its source


def _loaded_logits(streamed, ids, tmp):
    """Logits of ``streamed`` after a save -> load round trip (the dense weights copied from the
    bf16 source files, so they stay bf16)."""
    out = tmp.parent / f"{tmp.name}-checkpoint"
    matpress.save(streamed, out, force=True)
    loaded = matpress.load(out)
    assert {p.dtype for n, p in loaded.named_parameters() if "norm" in n or "embed" in n} == {torch.bfloat16}
    with torch.no_grad():
        return loaded(ids).logits.float()


def test_sharded_checkpoint_round_trips_and_is_verified(source_dir, tmp_path):
    model = load_pretrained(str(source_dir)).model
    matpress.compress(model, None, progress=False)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    matpress.save(model, single)
    matpress.save(model, sharded, max_shard_bytes=20_000)
    manifest = json.loads((sharded / MANIFEST).read_text())
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(shards) | {INDEX} <= set(manifest["files"])
    assert set(json.loads((sharded / INDEX).read_text())["weight_map"].values()) == set(shards)
    a, b = matpress.load(single).state_dict(), matpress.load(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(sharded).sharded and not read_checkpoint(single).sharded

    data = bytearray((sharded / shards[1]).read_bytes())
    data[-1] ^= 1
    (sharded / shards[1]).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shards[1]}: SHA-256 does not match"):
        matpress.load(sharded)
    index = json.loads((sharded / INDEX).read_text())
    (sharded / shards[1]).write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # intact again
    index["weight_map"][next(iter(index["weight_map"]))] = "../elsewhere.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a valid shard index"):
        matpress.load(sharded)


def test_save_refuses_a_meta_weight_with_no_source(tmp_path):
    model = tiny_llama(layers=1)
    matpress.compress(model, None, progress=False)
    model.model.norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(CheckpointError, match="model.norm.weight: it is on the meta device and in no source file"):
        matpress.save(model, tmp_path / "out")
