"""``matpress report DIR``: a Markdown page with PNG plots describing a compressed checkpoint.

Always: a summary table and a bar chart of bits per weight by layer, coloured by format. When the
checkpoint was compressed under a budget (it then holds ``sensitivity.json``): a heat map of every
layer's estimated damage per candidate, with the chosen candidate marked, and the estimated damage of
the best allocation as a function of the budget, with the chosen budget marked.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Union

import numpy as np

from matpress.errors import BudgetError, MatpressError
from matpress.io import read_checkpoint, stored_nbytes
from matpress.passes.budget import SENSITIVITY, SensitivityTable, choose, load_allocation
from matpress.recipe import Budget


def _pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files only (no display on servers); imported when a report is
    drawn, so the command line starts without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def _short(name: str) -> str:
    """Layer names without the common wrapper prefixes, for axis labels."""
    for prefix in ("model.layers.", "encoder.layer.", "transformer.h.", "model.decoder.layers."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _layer_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in manifest["layers"].items():
        n = entry["shape"][0] * entry["shape"][1]
        nbytes = stored_nbytes(entry)
        rows.append({"name": name, "format": entry.get("description", entry["format"]), "n": n, "nbytes": nbytes, "bpw": 8 * nbytes / n})
    return rows


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    formats = sorted({r["format"] for r in rows})
    palette = plt.cm.tab10 if len(formats) <= 10 else plt.cm.tab20
    colours = {f: palette(i % palette.N) for i, f in enumerate(formats)}
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4.2))
    ax.bar(range(len(rows)), [r["bpw"] for r in rows], color=[colours[r["format"]] for r in rows])
    ax.set_xticks(range(len(rows)), [_short(r["name"]) for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("bits per weight")
    ax.set_title("Chosen format and bits per weight, by layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[f]) for f in formats]
    ax.legend(handles, formats, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heat_map(table: SensitivityTable, choice: list[int], path: Path) -> None:
    plt = _pyplot()
    damage = np.full((len(table.layers), len(table.candidates)), np.nan)
    for i in range(len(table.layers)):
        for j in table.allowed[i]:
            damage[i, j] = table.damage(i, j)
    shown = np.log10(np.clip(damage, 1e-12, None))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(table.candidates) + 3), max(4, 0.22 * len(table.layers) + 1.5)))
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.scatter(choice, range(len(choice)), marker="s", facecolors="none", edgecolors="red", s=40)
    ax.set_xticks(range(len(table.candidates)), table.candidates, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(table.layers)), [_short(n) for n in table.layers], fontsize=6)
    ax.set_title("Estimated damage per layer and candidate (red: chosen)")
    fig.colorbar(im, ax=ax, label="log10 estimated damage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def damage_curve(table: SensitivityTable, points: int = 40) -> list[tuple[float, float]]:
    """(bits per weight, least total estimated damage) over the reachable range of budgets."""
    n = sum(table.n_weights)
    low = 8 * sum(min(table.nbytes[i][j] for j in table.allowed[i]) for i in range(len(table.layers))) / n
    high = 8 * sum(max(table.nbytes[i][j] for j in table.allowed[i]) for i in range(len(table.layers))) / n
    curve = []
    for bpw in np.linspace(low, high, points):
        try:
            choice = choose(table, Budget(bits_per_weight=float(bpw) + 1e-9))
        except BudgetError:
            continue
        curve.append((float(bpw), sum(table.damage(i, j) for i, j in enumerate(choice))))
    return curve


def _curve_plot(curve: list[tuple[float, float]], chosen_bpw: float, chosen_damage: float, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label="best allocation")
    ax.scatter([chosen_bpw], [chosen_damage], color="red", zorder=3, label=f"chosen ({chosen_bpw:.2f} bpw)")
    ax.set_yscale("log")
    ax.set_xlabel("budget (bits per weight)")
    ax.set_ylabel("estimated total damage")
    ax.set_title("Estimated damage vs budget")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(directory: Union[str, Path], out: Union[str, Path, None] = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out`` (default: the checkpoint directory)."""
    directory = Path(directory)
    manifest = read_checkpoint(directory).manifest
    out = Path(out) if out else directory
    sensitivity = directory / SENSITIVITY
    allocation = load_allocation(sensitivity) if sensitivity.is_file() else None  # checked before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MatpressError(f"cannot create the report directory {out} ({e.strerror or e}); pass another --out") from None
    rows = _layer_rows(manifest)
    total_n = sum(r["n"] for r in rows)
    total_bytes = sum(r["nbytes"] for r in rows)
    base = manifest["base_model"]
    lines = [
        f"# matpress report: {directory.name}",
        "",
        f"Base model: {base.get('class')} from `{base.get('source')}`. "
        f"{len(rows)} compressed layers, {total_n / 1e6:.2f} M weights, "
        f"{total_bytes / 1e6:.3f} MB stored ({8 * total_bytes / max(total_n, 1):.3f} bits per weight, "
        f"{100 * total_bytes / max(4 * total_n, 1):.1f}% of fp32).",
        "",
    ]
    budget = (manifest.get("recipe") or {}).get("budget")
    if budget:
        lines += [f"Compressed under a budget of {budget}.", ""]
    _bar_chart(rows, out / "layers.png")
    lines += ["## Format by layer", "", "![bits per weight by layer](layers.png)", ""]
    if allocation is not None:
        table, choice = allocation.table, allocation.choice
        _heat_map(table, choice, out / "sensitivity.png")
        curve = damage_curve(table)
        chosen_damage = sum(table.damage(i, j) for i, j in enumerate(choice))
        _curve_plot(curve, 8 * total_bytes / max(total_n, 1), chosen_damage, out / "budget_curve.png")
        lines += [
            "## Sensitivity",
            "",
            "Estimated damage of each candidate on each layer (relative output error on calibration "
            "activations, weighted by the layer's measured end-to-end effect); red squares: the choice.",
            "",
            "![sensitivity heat map](sensitivity.png)",
            "",
            "## Estimated damage vs budget",
            "",
            "![damage vs budget](budget_curve.png)",
            "",
        ]
    counts: dict[str, list[float]] = {}
    for r in rows:
        counts.setdefault(r["format"], []).append(r["bpw"])
    lines += ["## Summary", "", "| format | layers | mean bits/weight |", "|---|---|---|"]
    for fmt, bpws in sorted(counts.items()):
        lines.append(f"| {fmt} | {len(bpws)} | {sum(bpws) / len(bpws):.3f} |")
    lines += ["", "## Layers", "", "| layer | format | bits/weight | KiB |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['format']} | {r['bpw']:.3f} | {r['nbytes'] / 1024:.1f} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["damage_curve", "write_report"]
