"""Measuring on one device: synchronisation, peak memory, relative errors, precision settings."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def rel_err(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-3)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|, in float64 (NaN in ``actual`` gives NaN)."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1e-12)
    return (actual - expected).abs().max().item() / scale


def ulp_rel(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at ``ref``'s largest magnitude, relative to it
    (below the normal range: the subnormals' fixed spacing)."""
    top = ref.abs().max().item()
    if top == 0:
        return 0.0
    info = torch.finfo(dtype)
    exponent = max(math.floor(math.log2(top)), math.log2(info.tiny))
    return 2.0**exponent * info.eps / top


@contextlib.contextmanager
def full_float32():
    """TF32 off for matrix products and cuDNN convolutions (torch runs the latter in TF32 by
    default), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def timed(step: Callable, device: torch.device):
    """(milliseconds, step's result), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out
