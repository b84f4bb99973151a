"""Fuzzing recipes: mutated valid recipes (type swaps, deletions, huge, negative and zero numbers, deep
nesting, long strings, shared subtrees, damaged file bytes), read from YAML and JSON files, under a
memory limit. Each case must end in a valid Recipe (that survives its own to_dict) or in a MatpressError
naming the file with a short message; never another exception, never an allocation beyond the limit.

``MATPRESS_FUZZ_CASES`` raises the number of cases (default 2,000, fixed seed).
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

VALID = [
    {"default": {"method": "rtn", "bits": 4, "group_size": 128}, "rules": [{"pattern": "*.value", "bits": 8},
     {"pattern": "*.output.dense", "method": "dense", "dtype": "fp16"}], "include": ["*"], "exclude": ["*lm_head", "*embed*"]},
    {"default": {"method": "gptq", "bits": 3, "group_size": 64, "act_order": True, "rotate": True},
     "calibration": {"text": "builtin", "samples": 16, "seq_len": 32, "batch_size": 4}},
    {"budget": "3.2bpw", "candidates": [{"method": "rtn", "bits": 3}, {"method": "rtn", "bits": 8}],
     "allow": [{"pattern": "*.value", "candidates": ["*8b*"]}], "rules": [{"pattern": "re:.*query", "method": "sparsegpt", "nm": "2:4"}]},
    {"default": {"method": "eora", "quantizer": "gptq", "bits": 3, "rank_bits": 0.5, "factor_bits": 8},
     "calibration": {"text": ["one sentence of calibration text.", "and another one here."], "unit": "sentence"}},
]

SHARED = ["x"] * 50


def odd_values(rng: random.Random, share_levels: int) -> list[Any]:
    deep: Any = "leaf"
    for _ in range(rng.choice([5, 20, 200])):
        deep = [deep]
    shared = SHARED
    for _ in range(rng.randint(1, share_levels)):
        shared = [shared] * 50  # a subtree used many times over: YAML writes it with aliases, JSON in full
    return [
        None, True, False, 0, -1, 1, 2**63, -(2**63), 10**400, 1e308, -0.0, float("nan"), float("inf"), 0.5,
        "", " ", "x" * rng.choice([10, 10_000, 300_000]), "\x00\x01\x1b", "re:(", "re:" + "(a*)*" * 3, "*", "3bpw",
        "1e999MB", "0MB", "-3bpw", "2:4", "9:2", "channel", [], {}, [1, "a", None], {"1": 2}, {1: 2, "a": 3},
        deep, shared, [{}] * 3, {"pattern": "*"}, {"method": "rtn"},
    ]


def mutate(data: Any, rng: random.Random, share_levels: int) -> Any:
    """One to three random edits somewhere in a deep copy of ``data`` (never inside an inserted value,
    so shared subtrees are not multiplied by each other)."""
    data = copy.deepcopy(data)
    inserted: list[Any] = []  # kept alive so that their ids stay theirs

    def odd() -> Any:
        inserted.append(rng.choice(odd_values(rng, share_levels)))
        return inserted[-1]

    for _ in range(rng.randint(1, 3)):
        parent, key = _random_slot(data, rng, {id(v) for v in inserted})
        if parent is None:
            return odd()
        op = rng.random()
        if op < 0.2 and isinstance(parent, (dict, list)) and len(parent) > 0:
            del parent[key]
        elif op < 0.3 and isinstance(parent, dict):
            parent[rng.choice(["bits", "method", "pattern", "unknown", "text", "samples", "budget", 7])] = odd()
        elif op < 0.4:
            parent[key] = [parent[key]] if rng.random() < 0.5 else {"k": parent[key]}
        else:
            parent[key] = odd()
    return data


def _random_slot(data: Any, rng: random.Random, skip: set[int]) -> tuple[Any, Any]:
    slots: list[tuple[Any, Any]] = [(None, None)]
    stack = [data]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            slots.append((node, k))
            if isinstance(v, (dict, list)) and id(v) not in skip:
                stack.append(v)
    return rng.choice(slots)


def write_case(data: Any, path: Path, rng: random.Random) -> None:
    try:
        text = json.dumps(data) if path.suffix == ".json" else _yaml(data)
    except (ValueError, TypeError, RecursionError, OverflowError):
        text = repr(data)[:10_000]  # not serialisable: the parser gets whatever this is
    raw = text.encode()
    if rng.random() < 0.15:  # damaged bytes: flips, a cut, binary, another encoding
        choice = rng.randrange(4)
        if choice == 0 and raw:
            i = rng.randrange(len(raw))
            raw = raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
        elif choice == 1:
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif choice == 2:
            raw = rng.randbytes(rng.randrange(1, 2000))
        else:
            raw = text.encode("utf-16")
    path.write_bytes(raw)


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, width=10**9)


def fuzz(n_cases: int, seed: int, workdir: Path) -> list[str]:
    """Run the cases; returns the failures (empty when every case ended as it should)."""
    from matpress.errors import MatpressError
    from matpress.recipe import Recipe

    rng = random.Random(seed)
    failures = []
    for case in range(n_cases):
        path = workdir / f"case{case}{rng.choice(['.json', '.yaml'])}"
        data = mutate(rng.choice(VALID), rng, 6 if path.suffix == ".yaml" else 3)
        write_case(data, path, rng)
        try:
            recipe = Recipe.load(path)
        except MatpressError as e:
            message = str(e)
            if str(path) not in message or len(message) > 1200 or "\n" in message:
                failures.append(f"case {case}: message does not name the file in one short line: {message[:300]!r}")
        except BaseException:  # noqa: BLE001 - anything else (MemoryError included) is the defect to report
            failures.append(f"case {case} ({path.read_bytes()[:200]!r}):\n{traceback.format_exc(limit=4)}")
        else:  # what is accepted is written to manifests and read back
            try:
                if Recipe.from_dict(recipe.to_dict()) != recipe:
                    failures.append(f"case {case}: the recipe changes through to_dict: {recipe}")
            except BaseException:  # noqa: BLE001
                failures.append(f"case {case}: an accepted recipe does not survive to_dict:\n{traceback.format_exc(limit=4)}")
        path.unlink()
    return failures


def test_fuzzed_recipes_end_in_a_recipe_or_a_clear_error(tmp_path):
    n_cases = int(os.environ.get("MATPRESS_FUZZ_CASES", "2000"))
    script = f"""
import resource, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import matpress.recipe  # torch and all: mapped before the limit is set
from test_recipe_fuzz import fuzz
size = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more than now
failures = fuzz({n_cases}, seed=10, workdir=Path({str(tmp_path)!r}))
print("\\n".join(failures[:20]))
print(f"{{len(failures)}} of {n_cases} cases failed")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    assert run.stdout.strip().endswith(f"0 of {n_cases} cases failed"), run.stdout[-8000:]


def test_the_cli_refuses_a_sample_of_fuzzed_recipes_in_one_line(tmp_path, capsys):
    """The first 30 fuzz cases that Recipe.load refuses, given to ``matpress compress --recipe``:
    exit 2 and one line naming the file (the recipe is read before any model is loaded)."""
    from matpress.cli import main
    from matpress.errors import MatpressError
    from matpress.recipe import Recipe

    rng = random.Random(11)
    tried = 0
    while tried < 30:
        path = tmp_path / f"case{tried}{rng.choice(['.json', '.yaml'])}"
        write_case(mutate(rng.choice(VALID), rng, 3), path, rng)
        try:
            Recipe.load(path)
            continue  # accepted: compressing with it is not this test's business
        except MatpressError:
            tried += 1
        assert main(["compress", "minilm", "--recipe", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], lines
