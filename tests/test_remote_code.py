"""No matpress path runs code shipped in a model directory unless the user passes trust_remote_code.

The hostile directory is the tiny Llama with an ``auto_map`` in config.json and tokenizer_config.json
pointing at ``evil.py``, whose import writes a marker file. The CLI runs in a subprocess whose stdin
answers "y": if transformers ever asked "Do you wish to run the custom code?", the marker would appear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import matpress
from matpress.errors import RemoteCodeError
from matpress.io import load_tokenizer
from matpress.models import load_pretrained

from checkpoint_edits import resign

EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("code from the model directory ran")
from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig


class EvilTokenizer(BertTokenizerFast):
    pass
"""


def add_auto_map(directory: Path, marker: Path) -> None:
    (directory / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    add_tokenizer_auto_map(directory)


def add_tokenizer_auto_map(directory: Path) -> None:
    tok = json.loads((directory / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def evil_dir(tiny_causal_dir, tmp_path, marker) -> Path:
    path = tmp_path / "evil-model"
    shutil.copytree(tiny_causal_dir, path)
    add_auto_map(path, marker)
    return path


@pytest.fixture
def no_prompt(monkeypatch):
    def refuse(*args):
        raise AssertionError("something asked on stdin")

    monkeypatch.setattr("builtins.input", refuse)


def run_cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    # HF_HOME in tmp: if code were ever trusted, transformers copies it into a cache there, not in ~
    env = {**os.environ, "HF_HOME": str(home / "hf"), "HF_MODULES_CACHE": str(home / "hf-modules")}
    return subprocess.run(
        [sys.executable, "-m", "matpress.cli", *args], input="y\ny\ny\n", capture_output=True, text=True, env=env, timeout=600
    )


def test_load_pretrained_refuses_a_directory_with_code(evil_dir, marker, no_prompt):
    with pytest.raises(RemoteCodeError, match=r"config\.json has 'auto_map'.*evil\.py.*--trust-remote-code"):
        load_pretrained(str(evil_dir))
    assert not marker.exists()


def test_load_tokenizer_refuses_a_tokenizer_with_code(tiny_causal_dir, tmp_path, marker, no_prompt):
    path = tmp_path / "ckpt-tokenizer"
    shutil.copytree(tiny_causal_dir, path)
    (path / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    add_tokenizer_auto_map(path)
    with pytest.raises(RemoteCodeError, match=r"tokenizer_config\.json has 'auto_map'.*trust_remote_code=True"):
        load_tokenizer(path)
    assert not marker.exists()


def test_cli_compress_refuses_without_reading_stdin(evil_dir, marker, tmp_path):
    run = run_cli(["compress", str(evil_dir), "--out", str(tmp_path / "out"), "--quiet"], tmp_path)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "--trust-remote-code" in run.stderr
    assert "Do you wish" not in run.stdout + run.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture
def checkpoint(tiny_causal_dir, tmp_path) -> Path:
    """A clean int8 checkpoint of the tiny Llama; its recorded source is the fixture's directory."""
    loaded = load_pretrained(str(tiny_causal_dir))
    matpress.compress(loaded.model, matpress.Recipe.simple("rtn", bits=8, group_size=32), progress=False)
    return matpress.save(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer, source=loaded.source)


@pytest.mark.parametrize("where", ["checkpoint tokenizer", "recorded source"])
def test_cli_eval_refuses_code_in_the_checkpoint_or_its_source(where, checkpoint, evil_dir, marker, tmp_path):
    if where == "checkpoint tokenizer":
        (checkpoint / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
        add_tokenizer_auto_map(checkpoint)
        resign(checkpoint)  # else the digests refuse the edited tokenizer_config.json first
        args = ["eval", str(checkpoint), "--quiet"]
    else:  # the original, as the manifest (or --reference) names it, now ships code
        args = ["eval", str(checkpoint), "--reference", str(evil_dir), "--quiet"]
    run = run_cli(args, tmp_path)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "--trust-remote-code" in run.stderr, run.stderr
    assert not marker.exists()


def test_with_the_flag_the_shipped_code_is_allowed_to_run(evil_dir, marker, tmp_path):
    """--trust-remote-code hands the directory to transformers with trust_remote_code=True: it imports
    evil.py (here a Llama under another name), and the compression goes on with that model."""
    out = tmp_path / "out"
    run = run_cli(["compress", str(evil_dir), "--bits", "8", "--out", str(out), "--quiet", "--trust-remote-code"], tmp_path)
    assert marker.exists(), run.stderr
    assert run.returncode == 0, run.stderr
    assert (out / "matpress.json").is_file()


def test_every_from_pretrained_call_goes_through_models_from_pretrained():
    """The check above guards one function; a direct ``X.from_pretrained(...)`` elsewhere would bypass it."""
    import ast

    root = Path(__file__).resolve().parent.parent
    direct = []
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        allowed = {
            id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "from_pretrained"
            and path.name == "models.py" for node in ast.walk(fn)
        }
        direct += [
            f"{path.relative_to(root)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("from_pretrained", "pipeline") and id(node) not in allowed
        ]
    assert direct == []
