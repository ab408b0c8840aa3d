"""What every demo reports and writes: mean ± std over seeds, a Markdown table, and the same three
files in its output folder (``summary.json``, ``results.md``, ``results.png``)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "plot_bars",
    "pyplot",
    "write_results",
]

RESULT_FILES = ("summary.json", "results.md", "results.png")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)``; the std is 0.0 for a single value.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("Expected at least one value, got none")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"m ± s"`` over several values, just ``"m"`` for one (a std of one seed means nothing).

    >>> format_mean_std([97.5, 97.0]), format_mean_std([97.5]), format_mean_std([0.5, 0.7], 1)
    ('97.25 ± 0.35', '97.50', '0.6 ± 0.1')
    """
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells as given, ``str()`` of anything else).

    >>> print(markdown_table(["method", "top-1"], [["ce", "97.50"]]))
    | method | top-1 |
    |---|---|
    | ce | 97.50 |
    """
    bad = [r for r in rows if len(r) != len(header)]
    if bad:
        raise ValueError(f"Expected rows of {len(header)} cells, got {[len(r) for r in bad]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out: str | Path, summary: Mapping, table: str, figure: Callable[[Path], None]
) -> list[Path]:
    """Write ``summary.json``, ``results.md`` (``table``) and ``results.png`` (``figure(path)``
    draws it) into ``out``; return the three paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / name for name in RESULT_FILES]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    paths[1].write_text(table + "\n")
    figure(paths[2])
    return paths


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(
    path: str | Path,
    values: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    ylabel: str,
    title: str,
) -> None:
    """Bars of ``values[group][method]`` (one value per seed): the mean, the seeds as dots."""
    plt = pyplot()
    groups = list(values)
    methods = list(dict.fromkeys(m for g in groups for m in values[g]))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(groups) * max(len(methods), 2), 4))
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        runs = [list(values[g].get(method, [])) for g in groups]
        means = [mean_std(r)[0] if r else 0.0 for r in runs]
        bars = ax.bar(xs, means, width * 0.9, label=method)
        for x, r in zip(xs, runs):
            ax.plot([x] * len(r), r, "k.", ms=4)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), [g.replace(" (", "\n(") for g in groups], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the value labels
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
