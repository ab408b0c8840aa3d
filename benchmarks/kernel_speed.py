"""Fused IKL kernel and chunked fused-linear IKL: forward+backward time and peak extra memory.

    python benchmarks/kernel_speed.py              # on a CUDA GPU: the full tables (Markdown)
    python benchmarks/kernel_speed.py --smoke      # tiny shapes, also on CPU (a test runs this)
    python benchmarks/kernel_speed.py --no-compile --no-linear   # quicker partial run

Table 1, per shape (B, C) and dtype: the bandwidth floor (one elementwise pass that reads two
(B, C) tensors and writes one), ``F.kl_div`` eager and ``torch.compile``d, ``dkl.ikl_loss`` on the
torch path eager and compiled, and the fused Triton kernel (``impl="triton"``) for IKL and KL.
The student logits require grad, the teacher's do not (knowledge distillation). Time is the median
of CUDA-event-timed forward+backward calls; peak extra memory is the allocator's peak above what
was allocated before the call (inputs), and includes the (B, C) gradient itself, whose size is
printed in the header of each table.

Table 2, LLM head (N tokens, hidden H, vocabulary V, bf16): materialised student and teacher
logits followed by ``ikl_loss`` (torch path and fused kernel), against ``dkl.llm.fused_linear_ikl``
at a few chunk sizes. Peak extra memory counts everything above the inputs (hidden states and head
weights), i.e. also the gradients of the student's hidden states and head weight.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import dkl
from dkl import ops
from dkl.llm import fused_linear_ikl

SHAPES = [(512, 1000), (8192, 32000), (8192, 128000)]
SMOKE_SHAPES = [(8, 1000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LINEAR = {"N": 8192, "H": 4096, "V": 128000, "chunks": (1024, 2048)}
SMOKE_LINEAR = {"N": 24, "H": 32, "V": 500, "chunks": (16,)}
IKL = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "weight_temperature": 4.0}
T = IKL["temperature"]


def kl_div(zs, zt):
    """Hinton-style KL as people write it with torch: F.kl_div on log-probabilities."""
    return F.kl_div(
        F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="batchmean", log_target=True
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


class Timer:
    """Median wall time of ``fn()`` in ms and the peak extra memory in MiB (CUDA only)."""

    def __init__(self, device: torch.device, repeats: int, budget_s: float = 5.0, warmup: int = 2):
        self.device, self.repeats, self.budget_s, self.warmup = device, repeats, budget_s, warmup

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn):
        for _ in range(self.warmup):  # includes compilation and autotuning
            fn()
        self._sync()
        mem = float("nan")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            self._sync()
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        end = time.perf_counter() + self.budget_s
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start_ev = torch.cuda.Event(enable_timing=True)
                stop_ev = torch.cuda.Event(enable_timing=True)
                start_ev.record()
                fn()
                stop_ev.record()
                stop_ev.synchronize()
                times.append(start_ev.elapsed_time(stop_ev))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() > end:
                break
        return statistics.median(times), mem


def copy_bandwidth(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read and written."""
    src = torch.empty(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = Timer(device, repeats=10, budget_s=1.0)(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms / 1e3)


def loss_methods(compile_: bool, device: torch.device) -> dict:
    """name -> callable(zs, zt) returning a scalar loss, or a string saying why it is skipped."""
    methods = {
        "F.kl_div eager": kl_div,
        "ikl_loss torch eager": functools.partial(dkl.ikl_loss, impl="torch", **IKL),
    }
    if compile_:
        methods["F.kl_div compiled"] = torch.compile(kl_div)
        methods["ikl_loss torch compiled"] = torch.compile(
            functools.partial(dkl.ikl_loss, impl="torch", **IKL)
        )
    else:
        methods["F.kl_div compiled"] = "skipped (--no-compile)"
        methods["ikl_loss torch compiled"] = "skipped (--no-compile)"
    probe = torch.empty(1, device=device)
    reason = ops.triton_unavailable_reason(probe)
    if reason is None:
        methods["ikl fused kernel"] = functools.partial(dkl.ikl_loss, impl="triton", **IKL)
        methods["kl fused kernel"] = functools.partial(dkl.kl_loss, impl="triton", temperature=T)
    else:
        methods["ikl fused kernel"] = f"skipped ({reason})"
        methods["kl fused kernel"] = "skipped"
    return methods


def _fmt_mem(mib: float) -> str:
    return "n/a" if math.isnan(mib) else f"{mib:.0f}"


def bench_shape(B, C, dname, dtype, methods, timer, device) -> list[str]:
    gen = torch.Generator(device=device).manual_seed(0)
    zs = (torch.randn(B, C, device=device, generator=gen) * 3).to(dtype).requires_grad_(True)
    zt = (torch.randn(B, C, device=device, generator=gen) * 3).to(dtype)
    grad_mib = zs.numel() * zs.element_size() / 2**20
    lines = [
        f"\n**{B} × {C}, {dname}** (the gradient alone is {grad_mib:.1f} MiB)\n",
        "| method | fwd+bwd (ms) | × floor | peak extra (MiB) |",
        "|---|---|---|---|",
    ]
    out = torch.empty_like(zt)
    zs_data = zs.detach()
    floor_ms, _ = timer(lambda: torch.add(zs_data, zt, out=out))
    lines.append(f"| floor: read 2, write 1 | {floor_ms:.3f} | 1.0 | – |")
    for name, fn in methods.items():
        if isinstance(fn, str):
            lines.append(f"| {name} | {fn} | | |")
            continue

        def step(fn=fn):
            fn(zs, zt).backward()
            zs.grad = None

        try:
            ms, mib = timer(step)
        except torch.OutOfMemoryError:
            lines.append(f"| {name} | out of memory | | |")
            zs.grad = None
            torch.cuda.empty_cache()
            continue
        lines.append(f"| {name} | {ms:.3f} | {ms / floor_ms:.1f} | {_fmt_mem(mib)} |")
    return lines


def bench_losses(shapes, dtypes, timer, compile_, device) -> list[str]:
    methods = loss_methods(compile_, device)
    lines = []
    for dname, dtype in dtypes.items():
        for B, C in shapes:
            lines += bench_shape(B, C, dname, dtype, methods, timer, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return lines


def bench_linear(cfg, timer, device, dtype) -> list[str]:
    N, H, V = cfg["N"], cfg["H"], cfg["V"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    hs = randn(N, H, scale=1.0).requires_grad_(True)
    ws = randn(V, H, scale=H**-0.5).requires_grad_(True)
    ht, wt = randn(N, H, scale=1.0), randn(V, H, scale=H**-0.5)
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    labels[::7] = -100
    logits_mib = N * V * torch.finfo(dtype).bits / 8 / 2**20
    title = (
        f"\n**LM head: N = {N} tokens, H = {H}, V = {V}, {str(dtype).split('.')[-1]}** "
        f"(one (N, V) logits tensor is {logits_mib:.0f} MiB)\n"
    )
    lines = [
        title,
        "| method | fwd+bwd (ms) | peak extra (MiB) |",
        "|---|---|---|",
    ]

    def materialised(impl):
        def step():
            zs = hs @ ws.t()
            with torch.no_grad():
                zt = ht @ wt.t()
            mask = labels != -100
            loss = dkl.ikl_loss(zs, zt, mask=mask, impl=impl, **IKL)
            loss.backward()
            hs.grad = ws.grad = None

        return step

    def chunked(chunk):
        def step():
            loss = fused_linear_ikl(hs, ws, ht, wt, labels=labels, chunk_size=chunk, **IKL)
            loss.backward()
            hs.grad = ws.grad = None

        return step

    candidates = {"materialised + ikl_loss torch": materialised("torch")}
    kernel_ok = ops.triton_unavailable_reason(hs) is None
    if kernel_ok:
        candidates["materialised + ikl_loss fused kernel"] = materialised("triton")
    for c in cfg["chunks"]:
        candidates[f"fused_linear_ikl, chunk {c}"] = chunked(c)
    for name, step in candidates.items():
        try:
            ms, mib = timer(step)
        except torch.OutOfMemoryError:
            lines.append(f"| {name} | out of memory | |")
            hs.grad = ws.grad = None
            torch.cuda.empty_cache()
            continue
        lines.append(f"| {name} | {ms:.1f} | {_fmt_mem(mib)} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU too")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-linear", action="store_true", help="skip the LM-head table")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print(
            "No CUDA device: the full benchmark needs a GPU (the shapes take tens of GB). "
            "Run with --smoke for a tiny CPU version."
        )
        return
    smoke = args.smoke
    shapes = SMOKE_SHAPES if smoke else SHAPES
    dtypes = {"fp32": torch.float32} if smoke else DTYPES
    compile_ = not args.no_compile and not smoke
    if smoke:
        timer = Timer(device, repeats=1, budget_s=0.0, warmup=0)
    else:
        timer = Timer(device, repeats=args.repeats)

    print(f"# dkl kernel benchmark on {device_name(device)}\n")
    print(
        f"torch {torch.__version__}; IKL with {IKL}; forward + backward, median of up to "
        f"{timer.repeats} calls{' (smoke run)' if smoke else ''}"
    )
    for line in bench_losses(shapes, dtypes, timer, compile_, device):
        print(line)
    if not args.no_linear:
        cfg = SMOKE_LINEAR if smoke else LINEAR
        dtype = torch.float32 if smoke else torch.bfloat16
        for line in bench_linear(cfg, timer, device, dtype):
            print(line)


if __name__ == "__main__":
    main()
