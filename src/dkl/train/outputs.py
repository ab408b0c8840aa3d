"""What a run writes and shows: ``metrics.jsonl``, ``summary.json``, curves, TensorBoard, progress.

Only rank 0 writes (the loop decides); these helpers just write.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TextIO

from dkl._files import atomic_write

__all__ = [
    "RunWriter",
    "curve_panels",
    "format_record",
    "format_time",
    "plot_history",
    "progress_bar",
]


def format_time(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_record(record: dict) -> str:
    """One log line: ``key=value`` pairs, floats to 4 significant digits."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def progress_bar(enabled: bool, total: int, initial: int, desc: str, *, file: TextIO | None = None):
    r"""A tqdm bar on ``file`` (stderr), or ``None`` when disabled or ``file`` is not a terminal.

    Redrawing a bar takes ``\r`` frames that a log file or a CI console keeps as clutter; there,
    the per-epoch lines the trainer logs anyway are the progress report.
    """
    file = sys.stderr if file is None else file
    if not enabled or not _is_terminal(file):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=file)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class RunWriter:
    """The files of one run folder: metrics history, summary, curves and TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self._tb = _tensorboard(self.run_dir) if tensorboard else None

    def history(self, history: list[dict]) -> None:
        # rewritten whole at every evaluation, so it stays consistent with a resumed run
        text = "".join(json.dumps(h) + "\n" for h in history)
        atomic_write(self.run_dir / "metrics.jsonl", lambda f: f.write(text.encode()), "metrics")

    def scalars(self, record: dict) -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self._tb.add_scalar(k, v, record["step"])

    def summary(self, summary: dict) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(self.run_dir / "summary.json", lambda f: f.write(text.encode()), "summary")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "train.tensorboard=true but tensorboard is not installed (pip install "
            "'dkl[tensorboard]'); continuing without it",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(run_dir / "tb"))


_NOT_PLOTTED = ("epoch", "step", "time")


def _is_percent(key: str) -> bool:
    return key in ("top1", "top5") or "acc" in key or re.fullmatch(r"pgd\d+", key) is not None


def curve_panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    """The panels of ``curves.png``: ``(title, keys)``, one scale per panel.

    Training loss and its components together, the test loss alone, every accuracy (%) together,
    the learning rate alone, then each other number (a mask ratio, an attack's eps...) alone.
    Keys appear in the order the history first shows them.

    >>> curve_panels([{"epoch": 1, "lr": 0.1, "train_loss": 2.0, "train_acc": 40.0,
    ...                "train_kd": 0.5, "top1": 50.0, "test_loss": 1.5, "eps": 0.01}])
    ... # doctest: +NORMALIZE_WHITESPACE
    [('train loss', ['train_loss', 'train_kd']), ('test loss', ['test_loss']),
     ('accuracy (%)', ['train_acc', 'top1']), ('learning rate', ['lr']), ('eps', ['eps'])]
    """
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if numeric and k not in keys and k not in _NOT_PLOTTED:
                keys.append(k)
    groups = {
        "train loss": [
            k for k in keys if k.startswith("train_") and not _is_percent(k) and "ratio" not in k
        ],
        "test loss": [k for k in keys if k == "test_loss"],
        "accuracy (%)": [k for k in keys if _is_percent(k)],
        "learning rate": [k for k in keys if k == "lr"],
    }
    placed = {k for ks in groups.values() for k in ks}
    panels = [(title, ks) for title, ks in groups.items() if ks]
    return panels + [(k, [k]) for k in keys if k not in placed]


def plot_history(
    history: list[dict], path: str | Path, title: str = ""
) -> list[tuple[str, list[str]]]:
    """The curves of one run as a PNG (matplotlib, Agg backend), one panel per scale
    (:func:`curve_panels`); returns the panels drawn."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = "epoch" if len({h["epoch"] for h in history}) == len(history) else "step"
    panels = curve_panels(history)
    cols = 2 if len(panels) == 4 else min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(h[xkey], h[k]) for h in history if isinstance(h.get(k), (int, float))]
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xkey)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"), "plot")
    plt.close(fig)
    return panels
