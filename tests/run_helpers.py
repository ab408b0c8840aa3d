"""Tiny training runs that tests evaluate, distil from or take weights from."""

from __future__ import annotations

from pathlib import Path

QUIET = ["train.progress=false", "train.plot=false", "train.threads=1", "train.device=cpu"]


def tiny_overrides(out_dir: Path, steps: int = 2) -> list[str]:
    """One epoch of ``steps`` steps, quiet, on CPU, written under ``out_dir``."""
    return [
        *QUIET,
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.out_dir={out_dir}",
    ]


def tiny_run(out_dir: Path, *overrides: str, preset: str = "kd/digits_teacher", steps: int = 2):
    """Train ``preset`` for :func:`tiny_overrides` (then ``overrides``); its config."""
    from dkl.api import train
    from dkl.config import load_config

    cfg = load_config(preset, [*tiny_overrides(out_dir, steps), *overrides])
    train(cfg, log=lambda m: None)
    return cfg


def plain_weights(cfg, path: Path) -> Path:
    """The run's final model as a plain state dict at ``path`` (as torchvision / timm ship them)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.load(cfg.run_dir / "final.pt", weights_only=True)["model"], path)
    return path
