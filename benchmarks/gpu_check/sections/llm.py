"""5. The LLM loss at vocabulary scale: one forward + backward with respect to the student's hidden
states and head weight at 8,192 tokens × 4,096 → 128,256, both sides sharing one teacher forward.
``fused_linear_ikl`` at several chunk sizes against Liger-Kernel's fused-linear JSD (its forward-KL
end, ``jsd_beta=0``) in float32 and bfloat16, and against the materialised forward KL compiled
(bfloat16); then the fused JSD (β = 0.5) and reverse KL against Liger's at the same β. Peak extra
memory is the allocator's peak above the inputs, broken down into the head-weight gradient, the
hidden-state gradient and what the chunks hold at once."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from dkl.llm import fused_linear_ikl, fused_linear_jsd, fused_linear_reverse_kl

from ..core import Ctx, Section, attempt, sibling
from ..measure import DTYPES, free_memory
from ..report import Sink

FULL = {
    "N": 8192,
    "H": 4096,
    "V": 128256,
    "dtypes": ("bf16", "fp32"),
    "chunks": (256, 512, 1024, 2048),
    "timer": {"repeats": 3, "budget_s": 1.0, "warmup": 1},
}
SMOKE = {
    "N": 24,
    "H": 8,
    "V": 300,
    "dtypes": ("bf16", "fp32"),
    "chunks": (8, 16),
    "timer": {"repeats": 1, "budget_s": 0.0, "warmup": 0},
}
DEFAULT_CHUNK = 1024  # fused_linear_*'s default chunk_size
HP = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 1.0}
JSD_BETA = 0.5


def _liger(beta: float):
    """Liger-Kernel's fused-linear JSD at ``beta`` (0: forward KL, 1: reverse KL), or why not."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return "skipped (liger-kernel not installed)"
    return LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)


def methods(ht, wt, size, dname, ctx: Ctx) -> list[tuple[str, int | str, object]]:
    """``(method, chunk, fn(hs, ws) -> loss, or the reason it is not run)``, eager ones first."""
    out: list[tuple[str, int | str, object]] = []
    for chunk in size["chunks"]:
        fn = functools.partial(fused_linear_ikl, teacher_hidden=ht, teacher_head_weight=wt)
        out.append(("fused_linear_ikl", chunk, _bound(fn, chunk_size=chunk, **HP)))
    liger = _liger(0.0)
    out.append(("Liger fused-linear JSD, β = 0 (KL)", "its own", _liger_call(liger, ht, wt)))
    if dname == "bf16":
        jsd = functools.partial(fused_linear_jsd, teacher_hidden=ht, teacher_head_weight=wt)
        rkl = functools.partial(fused_linear_reverse_kl, teacher_hidden=ht, teacher_head_weight=wt)
        out.append(
            (
                f"fused_linear_jsd, β = {JSD_BETA}",
                DEFAULT_CHUNK,
                _bound(jsd, beta=JSD_BETA, temperature=1.0),
            )
        )
        out.append(
            (
                f"Liger fused-linear JSD, β = {JSD_BETA}",
                "its own",
                _liger_call(_liger(JSD_BETA), ht, wt),
            )
        )
        out.append(("fused_linear_reverse_kl", DEFAULT_CHUNK, _bound(rkl, temperature=1.0)))
        out.append(
            (
                "Liger fused-linear JSD, β = 1 (reverse KL)",
                "its own",
                _liger_call(_liger(1.0), ht, wt),
            )
        )
        kl = functools.partial(_materialised_kl, ht=ht, wt=wt)
        skip = ctx.compile_fits()
        compiled = skip or torch.compile(kl, backend=ctx.backend, dynamic=False)
        out.append(("materialised logits + F.kl_div, compiled", "–", compiled))
    return out


def _bound(fn, **kw):
    return lambda hs, ws: fn(hs, ws, **kw)


def _liger_call(liger, ht, wt):
    if isinstance(liger, str):
        return liger
    return lambda hs, ws: liger(hs, ws, ht, wt, None)


def _materialised_kl(hs, ws, *, ht, wt):
    with torch.no_grad():
        zt = ht @ wt.T
    return F.kl_div(
        F.log_softmax((hs @ ws.T).float(), 1),
        F.log_softmax(zt.float(), 1),
        log_target=True,
        reduction="batchmean",
    )


def section_llm(sink: Sink, ctx: Ctx) -> None:
    size, dev = ctx.size, ctx.device
    N, H, V = size["N"], size["H"], size["V"]
    timer = sibling("kernel_speed").Timer(dev, **size["timer"])
    sink.text(
        f"One forward + backward with respect to the student's hidden states and head weight, "
        f"N = {N:,} tokens, H = {H:,}, V = {V:,}; IKL with {HP}. Median of up to "
        f"{timer.repeats} CUDA-event-timed calls after {timer.warmup} warm-up(s). Peak extra "
        "memory: allocator peak above the inputs, broken down as head-weight gradient + "
        "hidden-state gradient + the rest (the chunks' working set, in chunk-sized buffers of "
        "the logits' dtype). TF32 off (the torch default)."
    )
    sink.table("dtype", "method", "chunk", "fwd+bwd (ms)", "peak extra (MiB)", "breakdown")
    ms: dict[tuple, float] = {}
    mib: dict[tuple, float] = {}
    for dname in size["dtypes"]:
        dtype = DTYPES[dname]
        esize = torch.finfo(dtype).bits // 8
        grad_w, grad_h = V * H * esize / 2**20, N * H * esize / 2**20

        def inputs(dtype=dtype):
            gen = torch.Generator(device=dev).manual_seed(0)

            def rand(*shape, scale):
                return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

            hs = rand(N, H, scale=1.0).requires_grad_(True)
            ws = rand(V, H, scale=H**-0.5 * 3).requires_grad_(True)
            return hs, ws, rand(N, H, scale=1.0), rand(V, H, scale=H**-0.5 * 3)

        made, tensors = attempt(inputs, ctx)
        if not made:
            sink.row(dname, "inputs", result=tensors)
            continue
        hs, ws, ht, wt = tensors
        for name, chunk, fn in methods(ht, wt, size, dname, ctx):
            if isinstance(fn, str) or ctx.left() < 5:
                sink.row(dname, name, chunk, result=fn if isinstance(fn, str) else "skipped")
                continue

            def step(fn=fn, hs=hs, ws=ws):
                fn(hs, ws).backward()
                hs.grad = ws.grad = None

            done, out = attempt(lambda step=step: timer(step), ctx)
            hs.grad = ws.grad = None
            if not done:
                sink.row(dname, name, chunk, result=out)
                continue
            ms[(dname, name, chunk)], mib[(dname, name, chunk)] = out
            rest = out[1] - grad_w - grad_h
            buffers = (
                f" = {rest / (chunk * V * esize / 2**20):.1f} chunk buffers"
                if isinstance(chunk, int)
                else ""
            )
            breakdown = (
                "n/a"
                if math.isnan(out[1])
                else (f"{grad_w:,.0f} + {grad_h:,.0f} + {rest:,.0f}{buffers}")
            )
            sink.row(dname, name, chunk, f"{out[0]:.1f}", f"{out[1]:,.0f}", breakdown)
        del hs, ws, ht, wt, tensors
        free_memory(dev)
    _targets(sink, size, ms, mib)


def _targets(sink: Sink, size, ms, mib) -> None:
    liger = "Liger fused-linear JSD, β = 0 (KL)"
    for dname in size["dtypes"]:
        ours = {
            c: (ms[k], mib[k]) for k in ms if k[:2] == (dname, "fused_linear_ikl") for c in [k[2]]
        }
        ref = (dname, liger, "its own")
        if not ours or ref not in mib:
            sink.target(
                f"{dname}: fused IKL memory ≤ Liger's fused-linear JSD", "not measured", None, None
            )
            continue
        for chunk in sorted(ours):
            got = ours[chunk][1]
            sink.target(
                f"{dname}, chunk {chunk}: fused IKL memory ≤ Liger's fused-linear JSD",
                f"{got:,.0f} vs {mib[ref]:,.0f} MiB",
                got / mib[ref],
                got <= mib[ref],
            )
    _time_at_most(
        sink,
        f"bf16, chunk {DEFAULT_CHUNK}: fused IKL time ≤ 1.0× compiled materialised KL",
        ms,
        ("bf16", "fused_linear_ikl", DEFAULT_CHUNK),
        ("bf16", "materialised logits + F.kl_div, compiled", "–"),
    )
    for ours, theirs in (
        (f"fused_linear_jsd, β = {JSD_BETA}", f"Liger fused-linear JSD, β = {JSD_BETA}"),
        ("fused_linear_reverse_kl", "Liger fused-linear JSD, β = 1 (reverse KL)"),
    ):
        _time_at_most(
            sink,
            f"bf16: {ours} time ≤ Liger's",
            ms,
            ("bf16", ours, DEFAULT_CHUNK),
            ("bf16", theirs, "its own"),
        )


def _time_at_most(sink: Sink, what: str, ms: dict, ours: tuple, theirs: tuple) -> None:
    """The target ``ours`` ≤ ``theirs`` in time, when both were measured."""
    if ours in ms and theirs in ms:
        sink.target(
            what, f"{ms[ours]:.1f} vs {ms[theirs]:.1f} ms", ms[ours] / ms[theirs],
            ms[ours] <= ms[theirs],
        )  # fmt: skip


SECTION = Section(
    "llm",
    "5. LLM loss at vocabulary scale",
    share=90,
    run=section_llm,
    full=FULL,
    smoke=SMOKE,
    compile_s=40,
)
