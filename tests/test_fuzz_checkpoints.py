"""Fuzzing: mutated checkpoints end in a MatpressError naming the file, or in a model identical to the
original (or, when the mutation was re-signed, one the original's published digest refuses).

The cases run in a worker process (this file run as a script) under a memory limit
(``RLIMIT_AS``: the worker's size after building its bases plus :data:`MEMORY_HEADROOM`), so that an
allocation a mutation inflates fails there instead of in pytest. ``MATPRESS_FUZZ_CASES`` sets the
number of cases (default 2,000; the seed is fixed). Half the mutated checkpoints are re-signed (their
digests recomputed as ``save`` does), so the checks behind the digests are reached.
"""

from __future__ import annotations

import copy
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

CASES = int(os.environ.get("MATPRESS_FUZZ_CASES", "2000"))
SEED = 10
MEMORY_HEADROOM = 1 << 30
SAMPLE_EVERY = 50  # keep one refused case in this many for the CLI test
TESTS = Path(__file__).resolve().parent


# -- the bases: two tiny models covering every format ---------------------------------------------


def layer_formats() -> list[Callable[[Any], Any]]:
    """One encoder per format, each applied to a (32, 32) weight."""
    from matpress.formats import (
        BlockDiagFormat, DenseFormat, IntFormat, LowRankFormat, MonarchFormat, NMSparseFormat, SparseFormat,
        SumFormat, TernaryFormat, TransformedFormat,
    )

    return [
        lambda w: IntFormat.encode(w, bits=4, group_size=16),
        lambda w: IntFormat.encode(w, bits=3, group_size=None, symmetric=True),
        lambda w: TernaryFormat.encode(w, group_size=8),
        lambda w: SparseFormat.encode(w, sparsity=0.8, layout="csr"),
        lambda w: SparseFormat.encode(w, sparsity=0.3, layout="bitmask", values={"format": "int", "bits": 8, "group_size": None}),
        lambda w: NMSparseFormat.encode(w, n=2, m=4),
        lambda w: LowRankFormat.encode(w, rank=4, factors={"format": "int", "bits": 8, "group_size": None}),
        lambda w: SumFormat.encode(w),
        lambda w: MonarchFormat.encode(w, nblocks=4),
        lambda w: BlockDiagFormat.encode(w, nblocks=4),
        lambda w: TransformedFormat.encode(w, rotate=True, bits=4, group_size=16),
        lambda w: DenseFormat.encode(w, dtype="fp16"),
    ]


def make_stack():
    """A plain torch module (loaded through a skeleton): linear layers, a norm and a tied pair."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in layer_formats():
        layers += [nn.Linear(32, 32), nn.Tanh()]
    model = nn.Sequential(*layers, nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 32, bias=False))
    model[-1].weight = model[-2].weight  # tied
    return model


def compressed_stack():
    from matpress.nn.layout import install_format

    model = make_stack()
    for i, encode in enumerate(layer_formats()):
        install_format(model, str(2 * i), model[2 * i], encode(model[2 * i].weight.detach()))
    return model


def compressed_llama():
    import torch
    import transformers
    import matpress
    from matpress.formats import IntFormat, NMSparseFormat, SparseFormat, TernaryFormat
    from matpress.nn.layers import TiedLinear
    from matpress.nn.layout import find_linear_layers, install_format, linear_weight

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    encoders = {
        "q_proj": lambda w: IntFormat.encode(w, bits=4, group_size=16),
        "k_proj": lambda w: SparseFormat.encode(w, sparsity=0.7, layout="csr"),
        "v_proj": lambda w: NMSparseFormat.encode(w, n=2, m=4),
        "o_proj": lambda w: TernaryFormat.encode(w, group_size=16),
        "up_proj": lambda w: SparseFormat.encode(w, sparsity=0.4, layout="bitmask"),
        "down_proj": lambda w: IntFormat.encode(w, bits=2, group_size=16, symmetric=True),
    }
    for name, layer in find_linear_layers(model).items():
        short = name.rsplit(".", 1)[-1]
        if short in encoders:
            install_format(model, name, layer, encoders[short](linear_weight(layer)))
    # the embedding in int8, and the LM head tied to it multiplying by the same stored format
    embedding = {"pattern": "model.embed_tokens", "method": "rtn", "bits": 8, "group_size": 16}
    matpress.compress(model, {"rules": [embedding]}, progress=False)
    assert isinstance(model.lm_head, TiedLinear)
    return model


def outputs(model, skeleton: bool):
    import torch

    with torch.inference_mode():
        if skeleton:
            return model(torch.linspace(-2, 2, 4 * 32).view(4, 32))
        return model(torch.arange(12).view(2, 6) % 64).logits


# -- mutations ------------------------------------------------------------------------------------

HUGE_VALUES = [0, -1, 1, 2, 3, 2**31, 2**63, 10**30, -(10**12), 0.5, -0.0, 1e308, "", "x" * 3000, True, False, None, [], {}, [1, 2], {"a": 1}]


def nodes(data: Any, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(data, dict):
        for k, v in data.items():
            found += nodes(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += nodes(v, path + (i,))
    return found


def get_at(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def mutate_value(rng: random.Random, value: Any) -> Any:
    if isinstance(value, bool) and rng.random() < 0.5:
        return not value
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.7:
        return rng.choice([value + 1, value - 1, value * 2, value // 2, -value, value * 1000, 0, value + 2**32])
    if isinstance(value, float) and rng.random() < 0.7:
        return rng.choice([value * 10, value / 10, -value, 0.0, float("inf"), float("nan")])
    if isinstance(value, str) and rng.random() < 0.5:
        return rng.choice([value + "x", value[:-1], value.upper(), "", value * 50])
    return rng.choice(HUGE_VALUES + [nested(rng.choice([40, 200]))])


def mutate_manifest_data(rng: random.Random, manifest: Any) -> tuple[Any, str]:
    """One structural edit of the parsed manifest; returns the new manifest and what was done."""
    paths = nodes(manifest)
    path = rng.choice(paths[1:])
    parent, key = get_at(manifest, path[:-1]), path[-1]
    op = rng.random()
    if op < 0.25:
        del parent[key]
        return manifest, f"delete {path}"
    if op < 0.35 and isinstance(get_at(manifest, path), dict):
        get_at(manifest, path)[rng.choice(["extra", "kind", "shape", "bias"])] = rng.choice(HUGE_VALUES)
        return manifest, f"add a key at {path}"
    if op < 0.45:
        other = copy.deepcopy(get_at(manifest, rng.choice(paths[1:])))
        parent[key] = other
        return manifest, f"copy another node to {path}"
    parent[key] = mutate_value(rng, parent[key])
    return manifest, f"change {path}"


def mutate_manifest_text(rng: random.Random, text: str, limit: int) -> tuple[str, str]:
    op = rng.randrange(6)
    if op == 0:
        cut = rng.randrange(len(text))
        return text[:cut], f"truncate the manifest at {cut}"
    if op == 1:
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["\x00", "}", "]", ",", '"', "\ud800", "\xff", "NaN"]) + text[at:], "insert a character"
    if op == 2:
        return text.replace('"tied": {', '"tied": {"x": "y", "x": "z", ', 1), "duplicate a key"
    if op == 3:
        return "[" * 5000 + "]" * 5000, "deep nesting"
    if op == 4:
        return text[:-1] + " " * limit + "}", "pad past the size limit"
    return json.dumps({"format_version": 2, "x": nested(30)}), "a near-empty manifest"


def mutate_header(rng: random.Random, header: dict[str, Any], body_len: int) -> str:
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    op = rng.randrange(8)
    if op == 0:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "I16", "I32", "I64", "BOOL", "F64", "F8_E4M3", "XX"])
    elif op == 1:
        shape = entry["shape"]
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, 1, shape[i] + 1, shape[i] * 2, 2**40, -1])
        else:
            shape.append(1)
    elif op == 2:
        entry["shape"] = list(reversed(entry["shape"])) + rng.choice([[], [1]])
    elif op == 3:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start, body_len + 8], [start + 1, end + 1], [0, end - start], [start, 2**62]])
    elif op == 4:
        del header[key]
    elif op == 5:
        header[key + "x"] = header.pop(key)
    elif op == 6:
        header["__metadata__"] = rng.choice([{}, {"producer": "x"}, {"matpress_manifest_sha256": "0" * 64}])
    else:
        other = rng.choice(keys)
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    return f"header: edit {key} ({op})"


INDEX_KEYS = ("row_ptr", "col_idx", "mask", "indices", "packed", "signs", "scales", "zeros")
WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1, "F64": 8}


def mutate_tensor_data(rng: random.Random, header: dict[str, Any], body: bytearray) -> str:
    """Write hostile values into an index tensor (or another stored tensor) of the data section."""
    keys = [k for k in header if k != "__metadata__"]
    preferred = [k for k in keys if k.rsplit(".", 1)[-1].split("__")[-1] in INDEX_KEYS]
    key = rng.choice(preferred if preferred and rng.random() < 0.8 else keys)
    start, end = header[key]["data_offsets"]
    width = WIDTHS[header[key]["dtype"]]
    if end - start < width:
        return f"data: {key} is empty"
    at = start + width * rng.randrange((end - start) // width)
    value = rng.choice([0, 1, 255, 2**width * 8 - 1, -1, 2**15, 2**30, 0x7C00, 0x7E00])  # incl. fp16 inf, NaN
    body[at:at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return f"data: {key} element at byte {at - start} := {value}"


# -- the worker -----------------------------------------------------------------------------------


def digest_refusal(message: str) -> bool:
    return any(s in message for s in ("do not belong together", "SHA-256 does not match", "the manifest says"))


def run_case(rng, case_dir: Path, base: dict[str, Any], limit: int) -> tuple[str, str, bool]:
    """Mutate the copy of a base in ``case_dir``, maybe re-sign it, read and load it. Returns
    (outcome, mutation, re-signed); raises AssertionError on a broken promise."""
    from checkpoint_edits import join_tensor_file, resign, split_tensor_file
    from matpress.errors import MatpressError
    from matpress.io import load, read_checkpoint
    from matpress.manifest import MANIFEST, TENSORS

    manifest_path, tensor_path = case_dir / MANIFEST, case_dir / TENSORS
    kind = rng.random()
    if kind < 0.45:
        manifest, what = mutate_manifest_data(rng, json.loads(manifest_path.read_text()))
        manifest_path.write_text(json.dumps(manifest))
    elif kind < 0.55:
        text, what = mutate_manifest_text(rng, manifest_path.read_text(), limit)
        manifest_path.write_bytes(text.encode("utf-8", "surrogatepass"))
    elif kind < 0.75:
        header, body = split_tensor_file(tensor_path.read_bytes())
        what = mutate_header(rng, header, len(body))
        tensor_path.write_bytes(join_tensor_file(header, body))
    elif kind < 0.95:
        header, body = split_tensor_file(tensor_path.read_bytes())
        body = bytearray(body)
        what = mutate_tensor_data(rng, header, body)
        tensor_path.write_bytes(join_tensor_file(header, bytes(body)))
    else:
        data = tensor_path.read_bytes()
        cut = rng.choice([0, 4, 8, 100, len(data) // 2, len(data) - 1])
        tensor_path.write_bytes(data[:cut])
        what = f"truncate the tensor file at {cut}"
    signed = False
    if rng.random() < 0.5:
        try:
            resign(case_dir)
            signed = True
        except Exception:  # the edit left nothing to sign (an unparseable file): test it as it is
            pass
    where = str(case_dir)

    def refused(e: MatpressError, stage: str) -> str:
        assert where in str(e), f"{what}: the message does not name the file: {e}"
        return "digest" if digest_refusal(str(e)) else stage

    try:
        read_checkpoint(case_dir)
    except MatpressError as e:
        return refused(e, "refused reading"), what, signed
    try:
        model = load(case_dir, model=copy.deepcopy(base["skeleton"]) if base["skeleton"] is not None else None)
    except MatpressError as e:
        return refused(e, "refused building"), what, signed
    if outputs(model, base["skeleton"] is not None).equal(base["outputs"]):
        return "identical", what, signed
    try:
        read_checkpoint(case_dir, expect_digest=base["digest"])
    except MatpressError:
        return "different, refused by the digest", what, signed
    raise AssertionError(f"{what}: a different model has the original's digest")


def worker(out: Path, cases: range, seed: int) -> None:
    """Run ``cases`` (their indices seed them) and write the outcomes to ``out/results.json``."""
    import torch
    import transformers

    import matpress
    from matpress.io import read_checkpoint
    from matpress.manifest import max_manifest_bytes

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # hostile configs make transformers warn
    warnings.simplefilter("ignore")  # and compress warns about the layers the bases leave dense
    bases = []
    for name, model, skeleton in (("stack", compressed_stack(), make_stack()), ("llama", compressed_llama(), None)):
        path = matpress.save(model, out / "bases" / name)
        checkpoint = read_checkpoint(path)
        loaded = matpress.load(path, model=copy.deepcopy(skeleton) if skeleton is not None else None)
        bases.append({
            "path": path, "skeleton": skeleton, "digest": checkpoint.digest, "outputs": outputs(loaded, skeleton is not None),
            "limit": max_manifest_bytes(len(checkpoint.stored)),
        })
        assert outputs(model, skeleton is not None).equal(bases[-1]["outputs"])
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_HEADROOM, resource.RLIM_INFINITY))
    try:
        torch.empty(2 * MEMORY_HEADROOM, dtype=torch.uint8)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the memory limit is not in force")
    counts: dict[str, int] = {}
    signed_counts: dict[str, int] = {}
    failures, samples = [], []
    case_dir = out / "case"
    for i in cases:
        rng = random.Random(seed * 1_000_003 + i)
        base = bases[0] if rng.random() < 0.7 else bases[1]
        shutil.rmtree(case_dir, ignore_errors=True)
        shutil.copytree(base["path"], case_dir)
        try:
            outcome, what, signed = run_case(rng, case_dir, base, base["limit"])
        except BaseException as e:  # anything but a MatpressError or a promise kept is a finding
            failures.append(f"case {i}: {type(e).__name__}: {str(e)[:300]}")
            continue
        counts[outcome] = counts.get(outcome, 0) + 1
        if signed:
            signed_counts[outcome] = signed_counts.get(outcome, 0) + 1
        if outcome.startswith("refused") or outcome == "digest":
            if len(samples) < len(cases) // SAMPLE_EVERY and i % 7 == 0:
                keep = out / "samples" / f"{i:05d}"
                shutil.copytree(case_dir, keep)
                samples.append({"dir": str(keep), "stage": outcome, "what": what})
    (out / "results.json").write_text(json.dumps({"counts": counts, "signed": signed_counts, "failures": failures, "samples": samples}))


WORKERS = 2


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
    """The merged outcomes of WORKERS worker processes, each running every WORKERS-th case."""
    out = tmp_path_factory.mktemp("fuzz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out / str(k)), str(k), str(WORKERS), str(CASES), str(SEED)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for k in range(WORKERS)
    ]
    merged: dict[str, Any] = {"counts": {}, "signed": {}, "failures": [], "samples": []}
    for k, proc in enumerate(procs):
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        results = json.loads((out / str(k) / "results.json").read_text())
        for key in ("counts", "signed"):
            for outcome, n in results[key].items():
                merged[key][outcome] = merged[key].get(outcome, 0) + n
        merged["failures"] += results["failures"]
        merged["samples"] += results["samples"]
    return merged


def test_mutated_checkpoints_are_refused_cleanly_or_load_identical(fuzz_results):
    counts, signed = fuzz_results["counts"], fuzz_results["signed"]
    assert fuzz_results["failures"] == []
    assert sum(counts.values()) == CASES
    # every stage is reached, and most re-signed cases get past the digest check
    for outcome in ("digest", "refused reading", "refused building", "identical", "different, refused by the digest"):
        assert counts.get(outcome, 0) > 0, counts
    assert signed.get("digest", 0) < 0.1 * sum(signed.values()), signed


def test_the_cli_refuses_fuzzed_checkpoints_in_one_line(fuzz_results, capsys):
    from matpress.cli import main

    samples = fuzz_results["samples"]
    assert len(samples) >= 10
    for sample in samples:
        commands = [["eval", sample["dir"], "--quiet"]]
        if sample["stage"] != "refused building":  # info reads without building
            commands.append(["info", sample["dir"]])
        for argv in commands:
            assert main(argv) == 2, (argv, sample["what"])
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and sample["dir"] in err and "Traceback" not in err, (argv, err)
    for sample in samples[:1]:
        proc = subprocess.run([sys.executable, "-m", "matpress.cli", "eval", sample["dir"]], capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and sample["dir"] in proc.stderr


if __name__ == "__main__":
    out, part, parts, cases, seed = Path(sys.argv[1]), *map(int, sys.argv[2:])
    worker(out, range(part, cases, parts), seed)
