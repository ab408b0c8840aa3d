"""What every section shares: the progress log, the sections' context and registry entry, the
guard that turns a failure or an overrun into a one-line reason, and child processes."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dkl import ops

from . import START
from .measure import free_memory

if TYPE_CHECKING:
    from .report import Sink

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
ENTRY = BENCHMARKS / "gpu_check.py"  # the command line; children run it too


def log(msg: str) -> None:
    print(f"[gpu-check +{time.time() - START:5.0f}s] {msg}", flush=True)


@functools.cache
def sibling(name: str):
    """A module of benchmarks/ by file name (adv_step, kernel_speed, train_step)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# A section: its registry entry and the context it runs in
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One section of the report. ``run(sink, ctx)`` writes its records; ``full`` and ``smoke``
    are its sizes (``ctx.size``) in the full run (one GPU) and the smoke run (CPU, seconds);
    ``share`` is its share of the time budget; ``compile_s`` the seconds left below which a
    ``torch.compile``d variant is not started (a compile still running at the section's deadline
    is stopped there)."""

    name: str  # the --sections key
    title: str  # the report's heading
    share: float
    run: Callable[[Sink, Ctx], None]
    full: dict
    smoke: dict
    compile_s: float = 0.0

    def context(self, device: torch.device, smoke: bool, until: float, backend: str) -> Ctx:
        size = self.smoke if smoke else self.full
        return Ctx(device, smoke, until, backend, size=size, compile_s=self.compile_s)


@dataclass
class Ctx:
    device: torch.device
    smoke: bool
    until: float  # wall-clock deadline of this section (time.time())
    backend: str  # torch.compile backend
    size: dict = field(default_factory=dict)  # the section's sizes for this run
    compile_s: float = 0.0

    def left(self) -> float:
        return self.until - time.time()

    def compile_fits(self) -> str | None:
        """None when a compiled variant fits in what is left, else the reason to skip it."""
        if self.smoke:
            return "skipped (smoke run)"
        if self.left() < self.compile_s:
            return f"skipped (time budget: {self.left():.0f} s left, too little for a compile)"
        return None


# ---------------------------------------------------------------------------------------------
# The guard: a failure or an overrun is a row, and the section goes on
# ---------------------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


STOPPED = "stopped at the section's time budget"


class BudgetSpent(BaseException):
    """Raised at a section's deadline; a BaseException, so no ``except Exception`` on the way
    (torch.compile's among them) swallows it."""


@contextlib.contextmanager
def deadline(ctx: Ctx):
    """Interrupt the block (a compile, say) one second before the section's deadline. Main thread
    and POSIX only; off in the smoke run (its budget is never reached)."""
    if ctx.smoke or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise BudgetSpent

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(ctx.left() - 1.0, 0.05))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(fn: Callable, ctx: Ctx):
    """``(True, fn())``, or ``(False, one-line reason)`` when it raises, runs out of memory or
    reaches the section's deadline."""
    try:
        with deadline(ctx):
            return True, fn()
    except BudgetSpent:
        reason = STOPPED
        if "torch._dynamo" in sys.modules:  # a compile may have been cut short
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
    except torch.OutOfMemoryError:
        reason = "out of memory"
    except Exception as exc:  # noqa: BLE001  (reported in the table; the section goes on)
        reason = f"error: {first_line(exc)}"
    with contextlib.suppress(Exception):
        free_memory(ctx.device)
    return False, reason


def failed(sink: Sink, reason: str) -> None:
    """The check of a cell that did not finish: a failure, unless the time budget stopped it."""
    sink.check(None if reason == STOPPED else False)


def run_cases(sink: Sink, ctx: Ctx, cases: list[tuple[list, Callable]], needs_kernel=True):
    """One row per case: its head cells, then the cells ``case()`` returns and pass / FAIL."""
    reason = ops.triton_unavailable_reason() if needs_kernel else None
    for head, case in cases:
        if reason is not None or ctx.left() < 5:
            sink.row(*head, result=f"skipped ({reason or 'time budget'})")
            sink.check(None)
            continue
        done, res = attempt(case, ctx)
        if not done:
            sink.row(*head, result=res)
            failed(sink, res)
            continue
        cells, ok = res
        sink.row(*head, *cells, "pass" if ok else "FAIL")
        sink.check(ok)


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def run_in_session(cmd: list[str], timeout: float, **popen_kw) -> str:
    """Run ``cmd`` in a process group of its own: 'exit N', or 'timed out after T s' when it ran
    past ``timeout``. Then the group is killed, with whatever it left (compile workers, say)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **popen_kw)
    try:
        note = f"exit {proc.wait(timeout=timeout)}"
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout:.0f} s"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return note


def child_env(device: torch.device) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)  # the interpreter would time the CPU, not the GPU
    return env
