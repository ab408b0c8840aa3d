"""Checkpoints: atomic writes, safe loads, the random-generator states, which file a run means.

A run folder holds up to three files:

- ``last.pt``: the full training state (model, optimiser, lr schedule, AMP scaler, the task's
  state, position, history, RNG states, and each rank's own part under DDP), what ``--resume``
  continues;
- ``best.pt``: the evaluated model at its best test top-1 so far, ``{"model", "config",
  "metrics"}``;
- ``final.pt``: the evaluated model at the end of training (an EMA where the recipe keeps one),
  same layout.

Each also holds ``"sha256"``, the SHA-256 of the rest of its content (checked by
:func:`load_checkpoint`: a damaged byte is refused, not loaded), ``"made_from"``, the SHA-256 of
each file the run was made from (a student's teacher, the initial weights), and ``"data"``, the
classes, input shape and split sizes it was trained on (a resumed or evaluated run compares them).

:func:`find_checkpoint` is the one rule for which file a run folder stands for.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkl._files import (
    HASH_KEY,
    HASHED_MARK,
    CheckpointError,
    atomic_write,
    content_sha256,
    load_torch_file,
)
from dkl.config import preset_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "HASH_KEY",
    "CheckpointError",
    "class_record",
    "config_changes",
    "data_changes",
    "find_checkpoint",
    "load_checkpoint",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "saved_normalization",
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


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` ``obj`` plus its content hash (:func:`dkl._files.content_sha256`, under
    ``"sha256"``) to a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old file or the new one, never a torn file. A write
    that fails (a full disk, a quota) removes its temporary file and raises one ``OSError`` line
    saying so; the previous ``path`` is untouched. :func:`load_checkpoint` verifies the hash.
    """
    obj = {**obj, HASHED_MARK: "sha256 of the content, under 'sha256'"}
    obj[HASH_KEY] = content_sha256(obj)
    atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writes that were killed (``.last.pt.tmp<pid>``).

    A run calls this when it starts, once it holds the folder's lock, before it writes anything.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (a file from elsewhere cannot run code).

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` (one line naming
    the file) for a file that is empty, truncated, of another format (it says which), damaged
    (its content no longer matches the SHA-256 stored when it was written) or holds anything but
    tensors and plain containers. Files written before checkpoints carried a hash load as they are.
    """
    return load_torch_file(path, map_location=map_location)


def find_checkpoint(target: str | Path) -> Path:
    """The file a run folder stands for (``final.pt``, else ``last.pt``, else ``best.pt``), or
    ``target`` itself when it is a file, or the YAML file of a bundled preset named as ``dkl
    train`` takes it (``kd/digits_teacher``, to evaluate ``model.checkpoint=FILE`` with). Pass
    ``runs/x/best.pt`` to pick the best epoch's model."""
    p = Path(target)
    if p.is_dir():
        for name in RUN_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"no {', '.join(RUN_FILES)} in run folder '{p}'")
    if not p.is_file():
        preset = preset_file(str(target))
        if preset is None:
            raise FileNotFoundError(f"no such run folder or checkpoint: '{p}'")
        return preset
    return p


# --------------------------------------------------------------------------------------------
# Random-generator states (stored as tensors and lists: loadable with weights_only=True)
# --------------------------------------------------------------------------------------------


def saved_normalization(state: Any) -> dict | None:
    """The input normalisation a dkl checkpoint's models were built with: its record, or (older
    checkpoints) the lists its config gave; ``None`` when neither says."""
    if not isinstance(state, dict):
        return None
    rec = state.get("normalization")
    if isinstance(rec, dict) and {"mean", "std"} <= set(rec):
        return {"mean": tuple(rec["mean"]), "std": tuple(rec["std"])}
    data = (state.get("config") or {}).get("data") or {}
    mean, std = data.get("mean"), data.get("std")
    if isinstance(mean, list | tuple) and isinstance(std, list | tuple):
        return {"mean": tuple(mean), "std": tuple(std)}
    return None


def class_record(info: Any) -> dict:
    """What a checkpoint records of a data set's classes (a :class:`~dkl.data.DataInfo`): their
    number, and their names where the data has them."""
    out: dict[str, Any] = {"num_classes": int(info.num_classes)}
    if info.classes:
        out["classes"] = [str(c) for c in info.classes]
    return out


def data_changes(saved: dict, now: dict, keys: Any = None) -> list[str]:
    """How the data a checkpoint records (``saved``, its ``"data"``) differs from ``now``, one
    phrase per key both have (``keys``: those only); class lists show their first difference."""
    out = []
    for k in now if keys is None else keys:
        if k not in saved or k not in now or saved[k] == now[k]:
            continue
        if k == "classes":
            old, new = list(saved[k]), list(now[k])
            i = next(
                (j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new))
            )
            was, now_ = (names[i] if i < len(names) else None for names in (old, new))
            out.append(f"class names ({len(old)} -> {len(new)}, class {i}: {was!r} -> {now_!r})")
        else:
            out.append(f"{k.replace('_', ' ')} {saved[k]} -> {now[k]}")
    return out


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
