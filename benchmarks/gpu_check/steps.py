"""What the training-step sections (kd, adv, ssl) share: precision / compile modes, the timing of
repeated steps and the check of a first step's loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .core import Ctx
from .measure import peak_gib, rel_err, reset_peak, timed
from .report import Sink

NUM_CLASSES = 100  # CIFAR-100, the paper's KD / AT / SSL setting
# First training step's loss against float32 eager, relative.
STEP_TOL = {"fp32": 1e-3, "bf16": 5e-2}
STEP_TOLS = ", ".join(f"{k} {v:g}" for k, v in STEP_TOL.items())
# the smoke run: float32 and (IKL-AT only) bfloat16 + channels_last, nothing compiled (importing
# the compiler alone takes seconds)
SMOKE_MODES = ("fp32", "bf16 autocast + channels_last")


@dataclass(frozen=True)
class Mode:
    precision: str  # "fp32" or "bf16" (autocast)
    compiled: bool = False
    channels_last: bool = False

    @property
    def amp(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def __str__(self) -> str:
        parts = [self.precision if self.precision == "fp32" else "bf16 autocast"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compiled:
            parts.append("compiled")
        return " + ".join(parts)


# eager first, then compiled: a compile is what may not fit in the time left
MODES = [Mode("fp32"), Mode("bf16"), Mode("bf16", compiled=True), Mode("fp32", compiled=True)]


def mode_skip(ctx: Ctx, mode: Mode, need_s: float = 5.0) -> str | None:
    """Why ``mode`` is not run (``None``: run it)."""
    if ctx.smoke and str(mode) not in SMOKE_MODES:
        return "skipped (smoke run)"
    if mode.compiled:
        reason = ctx.compile_fits()
        if reason:
            return reason
    if ctx.left() < need_s:
        return "skipped (time budget)"
    return None


def runnable_modes(sink: Sink, ctx: Ctx) -> Iterator[Mode]:
    """The training modes, in order, that this run measures; a row of the current table for each
    one skipped."""
    for mode in MODES:
        skip = mode_skip(ctx, mode)
        if skip:
            sink.row(mode, "all", result=skip)
            continue
        yield mode


def repeat_steps(step: Callable, cfg: dict, ctx: Ctx) -> tuple[list[float], str]:
    """Times of ``cfg['reps']`` steps after ``cfg['warmup']`` (fewer near the deadline) and the
    peak memory over them."""
    reset_peak(ctx.device)
    times = []
    for r in range(cfg["warmup"] + cfg["reps"]):
        ms, _ = timed(step, ctx.device)
        if r >= cfg["warmup"]:
            times.append(ms)
        if ctx.left() < 3:
            break
    return times, peak_gib(ctx.device)


def loss_check(sink: Sink, mode: Mode, loss: float, ref: float | None, is_ref: bool) -> str:
    """The check cell of a first-step loss: finite, and within ``STEP_TOL`` of the reference
    (float32, eager) unless it is the reference or that one did not run."""
    ok = math.isfinite(loss)
    if not ok:
        verdict = "FAIL: loss not finite"
    elif is_ref:
        verdict = "reference"
    elif ref is None:
        verdict = "finite (no reference ran)"
    else:
        err = rel_err(loss, ref)
        ok = err <= STEP_TOL[mode.precision]
        verdict = f"{'ok' if ok else 'FAIL'}: {err:.1e} (tol {STEP_TOL[mode.precision]:g})"
    sink.check(ok)
    return verdict
