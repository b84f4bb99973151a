"""Every input the CLI refuses ends the same way: exit status 2 and one line on stderr that names what
was wrong and where, and no traceback (an exception escaping ``main`` fails the test)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import matpress
from matpress.cli import main
from matpress.models import load_pretrained

from test_inputs import ALIAS_BOMB, PNG_LIKE, PROSE
from test_remote_code import add_auto_map


@pytest.fixture(scope="module")
def paths(tiny_causal_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    p = {"root": root, "missing": root / "missing", "model": tiny_causal_dir}
    p["file"] = root / "a-file"
    p["file"].write_text("not a directory\n")
    for name, config in (("no-config", None), ("broken-config", "{not json"), ("list-config", "[1, 2]"),
                         ("unknown-type", json.dumps({"model_type": "no-such-model"}))):
        p[name] = root / name
        p[name].mkdir()
        if config is not None:
            (p[name] / "config.json").write_text(config)
    for name, file, damage in (
        ("truncated-weights", "model.safetensors", lambda b: b[:1000]),
        ("broken-tokenizer", "tokenizer.json", lambda b: b"garbage{"),
        ("bad-hidden-size", "config.json", lambda b: b.replace(b'"hidden_size": 64', b'"hidden_size": -5')),
    ):
        p[name] = root / name
        shutil.copytree(tiny_causal_dir, p[name])
        (p[name] / file).write_bytes(damage((p[name] / file).read_bytes()))
    p["auto-map"] = root / "auto-map"
    shutil.copytree(tiny_causal_dir, p["auto-map"])
    add_auto_map(p["auto-map"], root / "MARKER")
    for name, content in (
        ("latin1.yaml", "default: {bits: 4}  # caf\xe9\n".encode("latin-1")),
        ("bomb.yaml", (ALIAS_BOMB + "\nexclude: *i\n").encode()),
        ("bad.yaml", b"default: [unclosed\n"),
        ("unknown.yaml", b"colour: blue\n"),
        ("binary.txt", PNG_LIKE),
        ("random.txt", random.Random(1).randbytes(3000).replace(b"\x00", b"\x01")),
        ("utf16.txt", PROSE.encode("utf-16-le")),
    ):
        p[name.replace(".", "-")] = root / name
        (root / name).write_bytes(content)
    loaded = load_pretrained(str(tiny_causal_dir))
    matpress.compress(loaded.model, matpress.Recipe.simple("rtn", bits=8, group_size=32), progress=False)
    p["ckpt"] = matpress.save(loaded.model, root / "ckpt", tokenizer=loaded.tokenizer, source=loaded.source)
    for name, content in (
        ("junk-sensitivity", b"\xff\xfe{"),
        ("bad-sensitivity", json.dumps({"budget": "3bpw", "choice": [0], "table": {
            "layers": ["a", "b"], "n_weights": [1], "candidates": ["c"], "nbytes": [[1]], "error": [[0.1]],
            "weight": [1.0], "allowed": [[0]]}}).encode()),
    ):
        p[name] = root / name
        shutil.copytree(p["ckpt"], p[name])
        (p[name] / "sensitivity.json").write_bytes(content)
    return p


OUT = ["--out", "{out}", "--quiet"]  # a fresh directory per case, which must not appear
CASES = [
    # (argv with {name} for a path of the fixture, what the line must say)
    (["compress", "{missing}", *OUT], "{missing} is not a Hugging Face model directory"),
    (["compress", "{file}", *OUT], "{file} is not a Hugging Face model directory"),
    (["compress", "{no-config}", *OUT], "no config.json there"),
    (["compress", "{broken-config}", *OUT], "{broken-config}/config.json is not valid JSON"),
    (["compress", "{list-config}", *OUT], "config.json holds list, not a JSON object"),
    (["compress", "{unknown-type}", *OUT], "{unknown-type}: transformers could not load the model"),
    (["compress", "{auto-map}", *OUT], "pass --trust-remote-code"),
    (["compress", "{truncated-weights}", *OUT], "{truncated-weights}/model.safetensors is not a safetensors file"),
    (["compress", "{broken-tokenizer}", *OUT], "{broken-tokenizer}: its tokenizer files could not be loaded"),
    (["compress", "{bad-hidden-size}", *OUT], "hidden size (-5) is not a multiple"),
    (["compress", "{model}", "--recipe", "{missing}", *OUT], "recipe file {missing} does not exist"),
    (["compress", "{model}", "--recipe", "{root}", *OUT], "recipe file {root} is a directory"),
    (["compress", "{model}", "--recipe", "{file}/x.yaml", *OUT], "recipe file {file}/x.yaml cannot be read"),
    (["compress", "{model}", "--recipe", "{latin1-yaml}", *OUT], "{latin1-yaml} is not UTF-8 text"),
    (["compress", "{model}", "--recipe", "{bomb-yaml}", *OUT], "{bomb-yaml} holds more than 100,000 values"),
    (["compress", "{model}", "--recipe", "{bad-yaml}", *OUT], "{bad-yaml} could not be parsed"),
    (["compress", "{model}", "--recipe", "{unknown-yaml}", *OUT], "unknown recipe key(s) ['colour']"),
    (["compress", "{model}", "--method", "gptq", "--calib", "{binary-txt}", "--samples", "4", *OUT], "{binary-txt} contains NUL bytes"),
    (["compress", "{model}", "--method", "gptq", "--calib", "{root}", *OUT], "is not an existing file"),
    (["compress", "{model}", "--bits", "9", *OUT], "bits must be an integer from 2 to 8, got 9"),
    (["compress", "{model}", "--bits", "four", *OUT], "argument --bits: invalid int value: 'four'"),
    (["compress", "{model}", "--group", "0", *OUT], "--group takes a positive integer or 'channel', got '0'"),
    (["compress", "{model}", "--samples", "0", "--method", "gptq", *OUT], "calibration samples must be a positive integer"),
    (["compress", "{model}", "--budget", "lots", *OUT], "cannot read the budget 'lots'"),
    (["compress", "{model}", "--budget", "3bpw", "--bits", "4", *OUT], "--bits describe one rule for every layer"),
    (["compress", "{model}", "--method", "magic", *OUT], "argument --method: invalid choice: 'magic'"),
    (["compress", "{model}"], "the following arguments are required: --out"),
    (["eval", "{missing}"], "{missing}/matpress.json not found"),
    (["eval", "{file}"], "{file} is not a matpress checkpoint"),
    (["eval", "{ckpt}", "--reference", "{auto-map}", "--quiet"], "pass --trust-remote-code"),
    (["eval", "{ckpt}", "--text", "{binary-txt}", "--quiet"], "text file {binary-txt} contains NUL bytes"),
    (["eval", "{ckpt}", "--text", "{random-txt}", "--quiet"], "text file {random-txt} is not UTF-8 text"),
    (["eval", "{ckpt}", "--text", "{utf16-txt}", "--quiet"], "UTF-16"),
    (["eval", "{ckpt}", "--text", "{root}", "--quiet"], "text file {root} is a directory"),
    (["eval", "{ckpt}", "--text", "{missing}", "--quiet"], "text file {missing} does not exist"),
    (["eval", "{ckpt}", "--sentences", "many"], "argument --sentences: takes a positive integer, got 'many'"),
    (["eval", "{ckpt}", "--sentences", "-5"], "argument --sentences: takes a positive integer, got '-5'"),
    (["info", "{missing}"], "{missing} is not a matpress checkpoint"),
    (["report", "{file}"], "{file} is not a matpress checkpoint"),
    (["report", "{junk-sensitivity}", "--out", "{out}"], "{junk-sensitivity}/sensitivity.json is damaged"),
    (["report", "{bad-sensitivity}", "--out", "{out}"], "n_weights has 1 entries, expected 2"),
    (["report", "{ckpt}", "--out", "{file}"], "cannot create the report directory {file}"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(CASES)])
def test_refused_input_exits_2_with_one_line(paths, argv, expected, capsys, tmp_path):
    names = {**{k: str(v) for k, v in paths.items()}, "out": str(tmp_path / "out")}
    try:
        code = main([a.format(**names) for a in argv])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"matpress{' ' + argv[0] if argv[0] != 'frobnicate' else ''}: error: ")
    assert expected.format(**names) in lines[0]
    assert not (paths["root"] / "MARKER").exists() and not (tmp_path / "out").exists()
