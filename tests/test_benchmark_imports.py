"""Every name a benchmark script imports from matpress or from a sibling script exists: the scripts run
for an hour and are not imported by the other tests, so a moved function would otherwise surface only
when someone reruns them."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def top_level_names(path: Path) -> set[str]:
    """Names a script defines or imports at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:  # a name, or a tuple of names (A, B = 1, 2)
                names.update(t.id for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def missing_imports(path: Path) -> list[str]:
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.module is None:
            continue
        sibling = BENCHMARKS / f"{node.module}.py"
        if sibling.is_file():
            defined = top_level_names(sibling)
            missing += [f"{node.module}.{a.name}" for a in node.names if a.name not in defined]
        elif node.module.split(".")[0] == "matpress":
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                missing.append(node.module)
                continue
            for a in node.names:
                if not hasattr(module, a.name):
                    try:
                        importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{a.name}")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_imports_exist(script: Path) -> None:
    assert missing_imports(script) == [], f"{script.name} imports names that do not exist"


def test_a_missing_name_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "helper.py").write_text("def present():\n    pass\nFIRST, SECOND = 1, 2\n")
    script = tmp_path / "script.py"
    script.write_text("from helper import present, SECOND, absent\nfrom matpress.models import load_pretrained, no_such_name\n")
    monkeypatch.setattr(sys.modules[__name__], "BENCHMARKS", tmp_path)
    assert missing_imports(script) == ["helper.absent", "matpress.models.no_such_name"]


def names_transformers_probes() -> set[str]:
    """Top-level packages transformers imports when it finds them (its optional integrations)."""
    import transformers.utils.import_utils as import_utils

    source = Path(import_utils.__file__).read_text()
    return set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', source))


def test_benchmark_scripts_shadow_no_package() -> None:
    # Python puts a script's folder first on sys.path, so a benchmarks/kernels.py was imported by
    # transformers in place of the `kernels` package it probes for, and `make demo` failed on it.
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    taken |= names_transformers_probes()
    assert len(names_transformers_probes()) > 20, "transformers' optional-package probes not found"
    clashes = sorted(s.name for s in SCRIPTS if s.stem in taken)
    assert clashes == [], f"benchmark scripts named like an importable package: {clashes}; rename them"
