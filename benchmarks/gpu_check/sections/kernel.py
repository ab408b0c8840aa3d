"""2. Kernel speed and memory: forward + backward time and peak extra memory at 4096 × 32,000 and
8192 × 128,000, float32 and bfloat16: the fused kernel, the torch path eager and compiled,
``F.kl_div`` eager and compiled, Liger-Kernel's KL when installed, and the bandwidth floor (read
two (B, C) tensors, write one, at the measured device-to-device copy bandwidth)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import dkl
from dkl import ops

from ..core import Ctx, Section, attempt, first_line, sibling
from ..measure import DTYPES, free_memory
from ..report import Sink

FULL = {
    "shapes": [(4096, 32000), (8192, 128000)],
    "dtypes": ("fp32", "bf16"),
    "copy_mib": 1024,
    "timer": {"repeats": 10, "budget_s": 1.5, "warmup": 2},
}
# the kernel in Triton's interpreter, timed once
SMOKE = {
    "shapes": [(8, 1000)],
    "dtypes": ("fp32",),
    "copy_mib": 4,
    "timer": {"repeats": 1, "budget_s": 0.0, "warmup": 0},
}
FLOOR_RATIO = 2.5  # target: kernel fwd+bwd at most this many times the bandwidth floor


def liger_kl():
    """Liger-Kernel's KL on log-probabilities (as users call it for distillation)."""
    from liger_kernel.transformers import LigerKLDIVLoss

    loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    T = sibling("kernel_speed").T
    return lambda zs, zt: loss(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1))


def kernel_methods(ctx: Ctx) -> dict[str, Callable | str]:
    """name -> callable(zs, zt) returning the loss, or the reason it is not run."""
    ks = sibling("kernel_speed")
    ikl_torch = functools.partial(dkl.ikl_loss, impl="torch", **ks.IKL)
    reason = ops.triton_unavailable_reason()
    methods: dict[str, Callable | str] = {
        "IKL fused kernel": functools.partial(dkl.ikl_loss, impl="triton", **ks.IKL),
        "KL fused kernel": functools.partial(dkl.kl_loss, impl="triton", temperature=ks.T),
    }
    if reason is not None:
        methods = dict.fromkeys(methods, f"skipped ({reason})")
    methods["IKL torch path"] = ikl_torch
    methods["F.kl_div"] = ks.kl_div
    try:
        methods["Liger-Kernel KL"] = liger_kl()
    except ImportError:
        methods["Liger-Kernel KL"] = "skipped (liger-kernel not installed)"
    except Exception as exc:  # noqa: BLE001  (a broken install is a row, not a crash)
        methods["Liger-Kernel KL"] = f"error: {first_line(exc)}"
    names = ("IKL torch path, compiled", "F.kl_div, compiled")
    if ctx.smoke:
        return methods | dict.fromkeys(names, "skipped (smoke run)")
    compile_ = functools.partial(torch.compile, backend=ctx.backend, dynamic=False)
    return methods | dict(zip(names, (compile_(ikl_torch), compile_(ks.kl_div))))


def section_kernel(sink: Sink, ctx: Ctx) -> None:
    size, dev = ctx.size, ctx.device
    ks = sibling("kernel_speed")
    bw = ks.copy_bandwidth(dev, size["copy_mib"])
    timer = ks.Timer(dev, **size["timer"])
    sink.text(
        f"Forward + backward of one loss call, student logits requiring grad, teacher's not; "
        f"IKL with {ks.IKL}, KL at T = {ks.T}. Median of up to {timer.repeats} CUDA-event-timed "
        f"calls after {timer.warmup} warm-ups (compiles happen there). Peak extra memory: "
        "allocator peak above the inputs, the (B, C) gradient included. Floor: reading two "
        f"(B, C) tensors and writing one at the measured copy bandwidth, {bw / 1e9:.0f} GB/s "
        "(bytes read + written)."
    )
    methods = kernel_methods(ctx)
    sink.table("B × C", "dtype", "method", "fwd+bwd (ms)", "× floor", "peak extra (MiB)")
    ms: dict[tuple, float] = {}
    mib: dict[tuple, float] = {}
    floor: dict[tuple, float] = {}
    grad: dict[tuple, float] = {}
    combos = [(B, C, d) for B, C in size["shapes"] for d in size["dtypes"]]
    for compiled_pass in (False, True):  # everything eager first: compiles are what may not fit
        # compiled: the largest shape first, the one the targets are about
        for B, C, dname in sorted(combos, key=lambda c: -c[0] * c[1]) if compiled_pass else combos:
            key, head = (B, C, dname), [f"{B} × {C}", dname]
            dtype = DTYPES[dname]
            nbytes = B * C * torch.finfo(dtype).bits // 8
            floor[key], grad[key] = 3 * nbytes / bw * 1e3, nbytes / 2**20
            if not compiled_pass:
                gradient = f"gradient alone: {grad[key]:.0f}"
                sink.row(*head, "floor: read 2, write 1", f"{floor[key]:.3f}", "1.0", gradient)

            def inputs(B=B, C=C, dtype=dtype):
                gen = torch.Generator(device=dev).manual_seed(0)
                zs = (torch.randn(B, C, device=dev, generator=gen) * 3).to(dtype)
                zt = (torch.randn(B, C, device=dev, generator=gen) * 3).to(dtype)
                return zs.requires_grad_(True), zt

            made, tensors = attempt(inputs, ctx)
            for name, fn in methods.items():
                if name.endswith("compiled") != compiled_pass:
                    continue
                skip = fn if isinstance(fn, str) else None
                if skip is None and compiled_pass:
                    skip = ctx.compile_fits()
                if skip is None and ctx.left() < 3:
                    skip = "skipped (time budget)"
                if skip is None and not made:
                    skip = f"inputs: {tensors}"
                if skip:
                    sink.row(*head, name, result=skip)
                    continue
                zs, zt = tensors

                def step(fn=fn, zs=zs, zt=zt):
                    fn(zs, zt).backward()
                    zs.grad = None

                done, out = attempt(lambda step=step: timer(step), ctx)
                zs.grad = None
                if not done:
                    sink.row(*head, name, result=out)
                    continue
                ms[key + (name,)], mib[key + (name,)] = out
                mem = "n/a" if math.isnan(out[1]) else f"{out[1]:.0f}"
                sink.row(*head, name, f"{out[0]:.3f}", f"{out[0] / floor[key]:.1f}", mem)
            del tensors
            free_memory(dev)

    for B, C, dname in combos:
        key, tag = (B, C, dname), f"{B} × {C} {dname}: IKL kernel"
        k = key + ("IKL fused kernel",)
        if k not in ms:
            sink.target(f"{tag} measured", "not measured", None, None)
            continue
        ratio = ms[k] / floor[key]
        sink.target(
            f"{tag} ≤ {FLOOR_RATIO}× floor",
            f"{ms[k]:.2f} vs {floor[key]:.2f} ms",
            ratio,
            ratio <= FLOOR_RATIO,
        )
        for other in ("F.kl_div, compiled", "Liger-Kernel KL"):
            o = key + (other,)
            if o in ms:
                sink.target(
                    f"{tag} faster than {other}",
                    f"{ms[k]:.2f} vs {ms[o]:.2f} ms",
                    ms[k] / ms[o],
                    ms[k] < ms[o],
                )
        if not math.isnan(mib[k]):  # nothing beyond the gradient (and (B,)-sized rows)
            sink.target(
                f"{tag} memory: the gradient only",
                f"{mib[k]:.0f} vs {grad[key]:.0f} MiB",
                mib[k] / grad[key],
                mib[k] <= grad[key] * 1.01 + 1.0,
            )


SECTION = Section(
    "kernel",
    "2. Kernel speed and memory",
    share=120,
    run=section_kernel,
    full=FULL,
    smoke=SMOKE,
    compile_s=10,
)
