"""Checkpoints: atomic writes, safe loads, the random-generator states, which file a run means.

A run folder holds up to three files:

- ``last.pt``: the full training state (model, optimiser, lr schedule, AMP scaler, the task's
  state, position, history, RNG states, and each rank's own part under DDP), what ``--resume``
  continues;
- ``best.pt``: the evaluated model at its best test top-1 so far, ``{"model", "config",
  "metrics"}``;
- ``final.pt``: the evaluated model at the end of training (an EMA where the recipe keeps one),
  same layout.

:func:`find_checkpoint` is the one rule for which file a run folder stands for.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "config_changes",
    "find_checkpoint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "tree_add",
    "tree_cpu",
    "tree_zeros",
]

#: the ``"format"`` of a training state (``last.pt``); 2 added the lr scheduler's state
CHECKPOINT_FORMAT = "dkl-checkpoint-2"

#: what a run folder stands for, in order of preference: the model at the end of training (or
#: where it stopped), then the best epoch's
RUN_FILES = ("final.pt", "last.pt", "best.pt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, of another kind or model."""


def _tmp_name(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old file or the new one, never a torn file. A write
    that fails (a full disk) removes its temporary file and raises ``OSError`` saying so; the
    previous ``path`` is untouched.
    """
    path = Path(path)
    tmp = _tmp_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            reason = os.strerror(e.errno) if e.errno else str(e)
            hint = (
                " (free some space and resume)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            )
            kept = f"; the previous '{path.name}' is intact" if path.exists() else ""
            raise OSError(
                e.errno, f"could not write checkpoint '{path}': {reason}{kept}{hint}"
            ) from e
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (``.last.pt.tmp<pid>``).

    A run calls this when it starts, before it writes anything; only one run uses a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.pt.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a file from elsewhere cannot run code).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (one line) for a
    file that is empty, truncated, not a torch file, or holds anything but tensors and plain
    containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): an interrupted copy?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        if e.errno:  # the file system's error (permissions, I/O): as it is
            raise
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise CheckpointError(
                f"cannot load '{path}': it holds objects other than tensors and plain "
                f"containers (refused unread)"
            ) from None
        reason = "unreadable pickle"
    except Exception as e:  # noqa: BLE001  (garbage bytes fail anywhere inside the reader)
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:120]}" if text else type(e).__name__
    raise CheckpointError(f"cannot load '{path}': truncated or not a torch checkpoint ({reason})")


def find_checkpoint(target: str | Path) -> Path:
    """The file a run folder stands for (``final.pt``, else ``last.pt``, else ``best.pt``), or
    ``target`` itself when it is a file. Pass ``runs/x/best.pt`` to pick the best epoch's model."""
    p = Path(target)
    if p.is_dir():
        for name in RUN_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no {', '.join(RUN_FILES)} in run folder '{p}'")
    if not p.is_file():
        raise FileNotFoundError(f"no such run folder or checkpoint: '{p}'")
    return p


# --------------------------------------------------------------------------------------------
# Random-generator states (stored as tensors and lists: loadable with weights_only=True)
# --------------------------------------------------------------------------------------------


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def rng_state() -> dict:
    """torch's (and CUDA's, once initialised), NumPy's and Python's global generator states."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# Nested dicts of numbers / tensors (per-rank sums)
# --------------------------------------------------------------------------------------------


def tree_add(a: Any, b: Any) -> Any:
    """Sum of two nested dicts of numbers / tensors (a key missing on one side counts as 0)."""
    if isinstance(a, dict):
        return {
            k: tree_add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}
        }
    return a + b


def tree_zeros(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: tree_zeros(v) for k, v in a.items()}
    return torch.zeros_like(a) if torch.is_tensor(a) else type(a)(0)


def tree_cpu(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: tree_cpu(v) for k, v in a.items()}
    return a.detach().cpu().clone() if torch.is_tensor(a) else a


def config_changes(
    old: dict, new: dict, prefix: str = "", defaults: dict | None = None
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf where two config dicts differ.

    With ``defaults`` (a config dict of default values), a key the old config does not have at
    all (written by an older version) counts as unchanged when its new value is the default.
    """
    out: list[tuple[str, Any, Any]] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        d = defaults.get(k) if isinstance(defaults, dict) else None
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.", d if isinstance(d, dict) else None)
        elif k not in old and isinstance(defaults, dict) and k in defaults and b == d:
            continue
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out
