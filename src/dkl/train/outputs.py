"""What a run writes and shows: ``metrics.jsonl``, ``summary.json``, curves, TensorBoard, progress.

Only rank 0 writes (the loop decides); these helpers just write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["RunWriter", "format_record", "format_time", "plot_history", "progress_bar"]


def format_time(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_record(record: dict) -> str:
    """One log line: ``key=value`` pairs, floats to 4 significant digits."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar on stderr, or ``None`` when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr
    )


class RunWriter:
    """The files of one run folder: metrics history, summary, curves and TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self._tb = _tensorboard(self.run_dir) if tensorboard else None

    def history(self, history: list[dict]) -> None:
        # rewritten whole at every evaluation, so it stays consistent with a resumed run
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)

    def scalars(self, record: dict) -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self._tb.add_scalar(k, v, record["step"])

    def summary(self, summary: dict) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

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


def plot_history(history: list[dict], path: str | Path, title: str = "") -> None:
    """Loss and accuracy curves of one run (matplotlib, Agg backend) as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xkey = "epoch" if len({h["epoch"] for h in history}) == len(history) else "step"
    x = [h[xkey] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(x, [h.get("train_loss") for h in history], label="train loss")
    a1.plot(x, [h.get("test_loss") for h in history], label="test loss")
    a1.set_xlabel(xkey)
    a1.set_ylabel("loss")
    a1.legend()
    if any("train_acc" in h for h in history):
        a2.plot(x, [h.get("train_acc") for h in history], label="train acc")
    a2.plot(x, [h.get("top1") for h in history], label="test top-1")
    a2.set_xlabel(xkey)
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
