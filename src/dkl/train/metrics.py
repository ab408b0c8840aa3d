"""Running training metrics and the test-set evaluation, both summed over ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dkl.train.distributed import all_reduce_sum

__all__ = ["RunningMetrics", "accuracy_counts", "evaluate_classifier"]


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """``(top-1 hits, top-k hits)`` of a batch (``k`` capped at the number of classes)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


class RunningMetrics:
    """Sums of the training loss, accuracy and a task's extra outputs since the last evaluation.

    :meth:`add` takes a task's step output: ``loss`` (a float), ``logits`` + ``labels`` for the
    training accuracy, and any other entry (float or 0-d tensor) averaged over the steps.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {"loss": 0.0, "correct": 0, "seen": 0, "steps": 0, "extra": {}}

    def add(self, loss: float, out: dict) -> None:
        r = self.sums
        r["loss"] += loss
        r["steps"] += 1
        logits, labels = out.get("logits"), out.get("labels")
        if logits is not None and labels is not None:
            r["correct"] += int((logits.detach().argmax(1) == labels).sum())
            r["seen"] += int(labels.numel())
        for k, v in out.items():
            if k in ("loss", "logits", "labels") or v is None:
                continue
            v = float(v.detach()) if torch.is_tensor(v) else float(v)
            r["extra"][k] = r["extra"].get(k, 0.0) + v

    def mean_loss(self) -> float:
        return self.sums["loss"] / max(self.sums["steps"], 1)

    def accuracy(self) -> float | None:
        return 100.0 * self.sums["correct"] / self.sums["seen"] if self.sums["seen"] else None

    def reduce(self) -> dict[str, float]:
        """``train_loss``, ``train_acc`` and ``train_<extra>``, averaged over every rank's steps."""
        r = self.sums
        keys = sorted(r["extra"])
        vals = torch.tensor(
            [r["loss"], r["correct"], r["seen"], r["steps"], *[r["extra"][k] for k in keys]],
            dtype=torch.float64,
        )
        loss, correct, seen, steps, *extra = all_reduce_sum(vals).tolist()
        out = {"train_loss": loss / max(steps, 1)}
        if seen:
            out["train_acc"] = 100.0 * correct / seen
        for k, v in zip(keys, extra):
            out[f"train_{k}"] = v / max(steps, 1)
        return out

    def state_dict(self) -> dict:
        return self.sums

    def load_state_dict(self, state: dict) -> None:
        self.sums = state


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean CE of ``model`` on ``loader``, summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        c1, c5 = accuracy_counts(logits, y)
        sums += torch.tensor(
            [c1, c5, float(F.cross_entropy(logits, y, reduction="sum")), y.numel()],
            dtype=torch.float64,
        )
    c1, c5, loss, n = all_reduce_sum(sums).tolist()
    model.train(was_training)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "test_loss": loss / n}
