"""One prepared run that proves dkl's GPU paths on a GPU and writes one Markdown report.

    python benchmarks/gpu_check.py                          # full run on one CUDA GPU (< 8 min)
    python benchmarks/gpu_check.py --results-dir /tmp/r     # write the report elsewhere
    python benchmarks/gpu_check.py --sections kernel,adv    # a subset
    python benchmarks/gpu_check.py --smoke                  # tiny sizes on CPU, report in /tmp

Sections (each guarded: a failure is a row in the report and the next section still runs):

1. ``correctness``: the kernel, loss edge-case and LLM test files run natively on the GPU (pytest
   in a child process), then the kernel at hardware sizes (C up to 256k; float32 / bfloat16 / float16; row
   masks; class weights; ``-inf`` target logits) against float64 oracles, and
   ``dkl.llm.fused_linear_ikl`` against the materialised logits in float64.
2. ``kernel``: forward + backward time and peak extra memory at 4096 × 32,000 and 8192 × 128,000,
   float32 and bfloat16: the fused kernel, the torch path eager and compiled, ``F.kl_div`` eager
   and compiled, Liger-Kernel's KL when installed, and the bandwidth floor (read two (B, C)
   tensors, write one, at the measured device-to-device copy bandwidth).
3. ``kd``, ``adv``, ``ssl``: training steps at the paper shapes on random data of the real shapes:
   resnet32x4 -> resnet8x4 distillation, batch 64 (ce / kd / dkd / ikl); IKL-AT on WRN-34-10,
   batch 128, against the authors' loop (``benchmarks/adv_step.py``); FixMatch(-IKL) on ViT-S/2,
   8 labeled + 8 unlabeled images. Each in float32 and bfloat16 autocast, eager and
   ``torch.compile``d: time per step, peak memory, and the first step's loss against float32.

Targets (the speed and memory goals set for these paths) are printed as met / missed with the ratio.
Each section has a share of the time budget (``--budget``, 440 s by default); on a GPU each runs
in its own child process, killed at its deadline, so a hung compile or a CUDA fault costs only
that section. Whatever did not fit is reported as skipped. Nothing is downloaded.
Exit status: 0 when every section ran and every correctness check passed (targets may be
missed), 1 otherwise, 2 for a full run without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

START = time.time()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if importlib.util.find_spec("dkl") is None:  # a bare checkout (e.g. a GPU box without pip -e .)
    sys.path.insert(0, str(ROOT / "src"))

import torch
import torch.nn.functional as F

import dkl
from dkl import ops
from dkl.llm import fused_linear_ikl

# ---------------------------------------------------------------------------------------------
# Sizes: the full run (one H100) and the smoke run (CPU, a few seconds)
# ---------------------------------------------------------------------------------------------

FULL = {
    "suite": [
        "tests/test_ops_triton.py",
        "tests/test_loss_edge_cases.py",
        "tests/test_llm.py",
        "tests/test_llm_features.py",
    ],
    "case_dtypes": ("fp32", "bf16", "fp16"),
    "big_shapes": [(7, 131073), (4, 262144)],
    "inf_shapes": [(6, 1001), (4, 262144)],
    "kl_div_shape": (5, 32000),
    "linear": {"N": 2048, "H": 512, "Ht": 768, "V": 32003, "Vt": 32064, "chunk": 512},
    "linear_cases": [("fp32", 0.0), ("fp32", 0.5), ("bf16", 0.0), ("bf16", 0.5)],
    "kernel_shapes": [(4096, 32000), (8192, 128000)],
    "kernel_dtypes": ("fp32", "bf16"),
    "copy_mib": 1024,
    "kernel_timer": {"repeats": 10, "budget_s": 1.5, "warmup": 2},
    "kd": {"teacher": "resnet32x4", "student": "resnet8x4", "batch": 64, "warmup": 3, "reps": 10},
    "adv": {
        "depth": 34,
        "widen": 10,
        "batch": 128,
        "warmup": 2,
        "reps": 5,
        "run_steps": 40,
        "run_eval": 1024,
    },
    "ssl": {"model": "vit_small_patch2_32", "kwargs": {}, "batch": 8, "warmup": 3, "reps": 10},
    "modes": None,  # every mode
    # seconds left below which a torch.compile'd variant is not started (a compile still running
    # at the section's deadline is stopped there)
    "compile_s": {"kernel": 10, "kd": 20, "adv": 40, "ssl": 25},
}
# The smoke run checks the script, not the numbers, in a few seconds of CPU: the kernel runs in
# Triton's interpreter; the training sections run float32 and (IKL-AT only) bfloat16 +
# channels_last and time their first step (reps 0); nothing is compiled (importing the compiler
# alone takes seconds).
SMOKE = {
    "suite": None,
    "case_dtypes": ("fp32",),
    "big_shapes": [(3, 37)],
    "inf_shapes": [(3, 37)],
    "kl_div_shape": (4, 37),
    "linear": {"N": 12, "H": 8, "Ht": 12, "V": 50, "Vt": 64, "chunk": 5},
    "linear_cases": [("fp32", 0.5), ("bf16", 0.0)],
    "kernel_shapes": [(8, 1000)],
    "kernel_dtypes": ("fp32",),
    "copy_mib": 4,
    "kernel_timer": {"repeats": 1, "budget_s": 0.0, "warmup": 0},
    "kd": {"teacher": "resnet8", "student": "resnet8", "batch": 4, "warmup": 0, "reps": 0},
    "adv": {
        "depth": 10,
        "widen": 1,
        "batch": 2,
        "warmup": 0,
        "reps": 0,
        "run_steps": 1,
        "run_eval": 8,
    },
    "ssl": {
        "model": "vit_tiny_patch2_32",
        "kwargs": {"depth": 1, "img_size": 8},
        "batch": 2,
        "warmup": 0,
        "reps": 0,
    },
    "modes": ("fp32", "bf16 autocast + channels_last"),
    "compile_s": None,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_CLASSES = 100  # CIFAR-100, the paper's KD / AT / SSL setting

# Loss tolerances relative to the largest magnitude of the float64 reference. The oracle sees the
# same (already rounded) inputs, so the loss differs by float32 accumulation only; gradients are
# rounded to the input dtype on the way out (the kernel test suite's table).
LOSS_TOL, LOSS_ATOL = 2e-5, 5e-7
GRAD_TOL = {"fp32": 2e-5, "bf16": 8e-3, "fp16": 1e-3}
# First training step's loss against float32 eager, relative.
STEP_TOL = {"fp32": 1e-3, "bf16": 5e-2}
STEP_TOLS = ", ".join(f"{k} {v:g}" for k, v in STEP_TOL.items())

# Issue targets
FLOOR_RATIO = 2.5  # kernel fwd+bwd at most this many times the bandwidth floor
IKL_OVER_KD = 0.05  # IKL's step at most 5 % slower than KD's
AT_SPEEDUP_FP32 = 1.2  # dkl's IKL-AT step vs the authors' loop, same maths in float32
AT_SPEEDUP_BF16 = 2.0  # ... with bfloat16 autocast + channels_last


def log(msg: str) -> None:
    print(f"[gpu-check +{time.time() - START:5.0f}s] {msg}", flush=True)


@functools.cache
def sibling(name: str):
    """A module of benchmarks/ by file name (adv_step, kernel_speed, train_step)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# What a section produces: records (text, tables, checks, targets), streamed to a file by a child
# ---------------------------------------------------------------------------------------------


class Sink:
    """A section's output as records; ``stream`` (a child's JSON-lines file) gets each at once."""

    def __init__(self, stream=None) -> None:
        self.records: list[dict] = []
        self.stream = stream
        self.width = 0  # columns of the current table

    def _add(self, **rec) -> None:
        self.records.append(rec)
        if self.stream is not None:
            self.stream.write(json.dumps(rec) + "\n")
            self.stream.flush()

    def text(self, text: str) -> None:
        self._add(kind="text", text=text)

    def table(self, *columns: str) -> None:
        self.width = len(columns)
        self._add(kind="table", columns=list(columns))

    def row(self, *cells, result: str | None = None) -> None:
        """One row of the current table; ``result`` goes in its last column, the gap is '–'."""
        cells = [str(c) for c in cells]
        if result is not None:
            cells += ["–"] * (self.width - len(cells) - 1) + [result]
        self._add(kind="row", cells=cells)
        log(" | ".join(c for c in cells if c))

    def check(self, ok: bool | None) -> None:
        """A correctness verdict: True passed, False failed, None skipped."""
        self._add(kind="check", ok=ok)

    def target(self, what: str, measured: str, ratio: float | None, met: bool | None) -> None:
        self._add(kind="target", what=what, measured=measured, ratio=ratio, met=met)
        verdict = {True: "met", False: "MISSED", None: "n/a"}[met]
        log(f"target {what}: {measured} -> {verdict}")


@dataclass
class Ctx:
    device: torch.device
    smoke: bool
    until: float  # wall-clock deadline of this section (time.time())
    backend: str  # torch.compile backend

    @property
    def size(self) -> dict:
        return SMOKE if self.smoke else FULL

    def left(self) -> float:
        return self.until - time.time()

    def compile_fits(self, section: str) -> str | None:
        """None when a compiled variant fits in what is left, else the reason to skip it."""
        if self.size["compile_s"] is None:
            return "skipped (smoke run)"
        need = self.size["compile_s"][section]
        if self.left() < need:
            return f"skipped (time budget: {self.left():.0f} s left, too little for a compile)"
        return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


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
        _free(ctx.device)
    return False, reason


def failed(sink: Sink, reason: str) -> None:
    """The check of a cell that did not finish: a failure, unless the time budget stopped it."""
    sink.check(None if reason == STOPPED else False)


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


# ---------------------------------------------------------------------------------------------
# 1. Correctness on hardware
# ---------------------------------------------------------------------------------------------


def kernel_configs() -> dict[str, dict]:
    """The loss settings the benchmarks and recipes run, one per kernel mode (KIND, weights)."""
    ks, kd = sibling("kernel_speed"), sibling("train_step").METHODS["ikl"]
    return {
        "kl, T = 4": {"kind": "kl", "temperature": ks.T},
        "dkl, Theorem 1 (α = β = 1), T = 4": {"kind": "dkl", "temperature": ks.T},
        "ikl, T2 = T": {"kind": "ikl", **ks.IKL},
        "ikl, CIFAR KD preset": {
            "kind": "ikl",
            "alpha": kd.alpha,
            "beta": kd.beta,
            "temperature": kd.temperature,
            "weight_temperature": kd.weight_temperature,
        },
        # the IKL-AT training loss (α = 4, β = 20, T = 1) with GI class-weight rows
        "ikl, GI class weights": {"kind": "ikl", "alpha": 4.0, "beta": 20.0, "class_weights": True},
    }


def wmse64(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """½ W Σ_j w_j (e_j - ē)² per row, ē the w-weighted mean (= ¼ Σ_jk w_j w_k (e_j - e_k)²)."""
    total = w.sum(1, keepdim=True)
    mean = (w * e).sum(1, keepdim=True) / total.clamp_min(1e-300)
    return 0.5 * total.squeeze(1) * (w * (e - mean) ** 2).sum(1)


def oracle(
    s,
    t,
    *,
    kind,
    alpha=1.0,
    beta=1.0,
    temperature=1.0,
    weight_temperature=1.0,
    class_weights=None,
    mask=None,
):
    """Per-row KL / DKL / IKL in float64. A ``-inf`` target logit is a class of probability 0:
    each row is restricted to its finite target classes (no KL, sCE or wMSE term, whatever the
    class weight), the student's softmax still runs over all classes."""
    s64, t64 = s.double(), t.double()
    finite = torch.isfinite(t64)
    log_q = F.log_softmax(s64 / temperature, 1)
    log_p = torch.where(finite, F.log_softmax(t64 / temperature, 1), 0.0)  # no 0 · (-inf)
    p = torch.where(finite, log_p.exp(), 0.0)
    if kind == "kl":
        per = (p * (log_p - log_q)).sum(1)
    elif kind == "dkl":
        w = p.detach()
        e = torch.where(finite, (t64 - s64.detach()) / temperature, 0.0)
        per = beta * wmse64(e, w) - alpha * (w * log_q).sum(1)
    else:
        if class_weights is not None:
            w = torch.where(finite, class_weights.double(), 0.0)
        else:
            w = F.softmax(t64.detach() / weight_temperature, 1)
        e = torch.where(finite, t64 - s64, 0.0)
        per = beta * wmse64(e, w) - alpha * (p.detach() * log_q).sum(1)
    if mask is not None:
        per = torch.where(mask, per, 0.0)
    return per


def kernel_case(cfg, dtype_name, shape, device, *, neg_inf, seed):
    """``dkl.ops.fused_divergence`` against :func:`oracle`: (cells, passed)."""
    cfg = dict(cfg)
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    B, C = shape
    s = (torch.randn(B, C, generator=g) * 3).to(device, dtype).requires_grad_(True)
    t = torch.randn(B, C, generator=g) * 3 + 0.5
    if neg_inf:  # about 30 % of the classes at -inf, never the first two
        drop = torch.rand(B, C, generator=g) < 0.3
        drop[:, :2] = False
        if B > 2:
            drop[2, 1:] = True  # one row with a single class left
        t = t.masked_fill(drop, float("-inf"))
    t = t.to(device, dtype).requires_grad_(True)
    mask = torch.rand(B, generator=g) > 0.3
    if B > 1:
        mask[0], mask[1] = False, True
    mask = mask.to(device)
    if cfg.pop("class_weights", False):  # like ClassPrior rows, scaled so that W = 3 is not 1
        cw = torch.rand(B, C, generator=g)
        cfg["class_weights"] = (3.0 * cw / cw.sum(1, keepdim=True)).to(device)
    upstream = (torch.randn(B, generator=g) * 2.0 + 0.5).to(device)  # not 1

    out = ops.fused_divergence(s, t, row_mask=mask, **cfg)
    gs, gt = torch.autograd.grad((out * upstream).sum(), (s, t))
    ref = oracle(s, t, mask=mask, **cfg)
    rs, rt = torch.autograd.grad((ref * upstream.double()).sum(), (s, t))
    loss_err = (out.double() - ref).abs().max().item()
    bound = LOSS_TOL * max(ref.abs().max().item(), 1e-12) + LOSS_ATOL
    grad_errs = max_rel_err(gs, rs), max_rel_err(gt, rt)
    # autograd hands the float64 reference gradients back rounded to the inputs' dtype, the kernel
    # rounds its float32 ones: the two may land one unit in the last place apart. At C = 262,144
    # the largest float16 gradient can be ~1e-5, subnormal, where one unit is 6e-8 (5e-3 of it).
    grad_tol = max(GRAD_TOL[dtype_name], *(ulp_rel(r, dtype) for r in (rs, rt)))
    masked_zero = bool(torch.all(out[~mask] == 0) and torch.all(gs[~mask] == 0))
    ok = loss_err <= bound and max(grad_errs) <= grad_tol and masked_zero
    cells = [f"{loss_err:.1e} ({bound:.0e})", *(f"{e:.1e}" for e in grad_errs)]
    return cells, ok


def kl_div_case(dtype_name, shape, device, seed):
    """``dkl.kl_loss`` (fused kernel, mean over rows) with -inf targets against ``F.kl_div``."""
    dtype, T = DTYPES[dtype_name], 2.0
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, generator=g) * 3).to(device, dtype).requires_grad_(True)
    t = torch.randn(*shape, generator=g) * 3
    drop = torch.rand(*shape, generator=g) < 0.3
    drop[:, 0] = False
    t = t.masked_fill(drop, float("-inf")).to(device, dtype)
    loss = dkl.kl_loss(s, t, temperature=T, impl="triton")
    (gs,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_(True)
    ref = F.kl_div(F.log_softmax(s64 / T, 1), F.softmax(t.double() / T, 1), reduction="batchmean")
    (rs,) = torch.autograd.grad(ref, s64)
    loss_err, grad_err = abs(loss.item() - ref.item()), max_rel_err(gs, rs)
    bound = LOSS_TOL * abs(ref.item()) + LOSS_ATOL
    ok = loss_err <= bound and grad_err <= GRAD_TOL[dtype_name]
    return [f"{loss_err:.1e} ({bound:.0e})", f"{grad_err:.1e}"], ok


def linear_case(dtype_name, ce_weight, device, cfg, seed):
    """fused_linear_ikl against float64 materialised logits; the error of materialising in the
    same dtype (logits, then ``ikl_loss``) is the yardstick for the low-precision runs."""
    N, H, Ht, V, Vt = cfg["N"], cfg["H"], cfg["Ht"], cfg["V"], cfg["Vt"]
    g = torch.Generator().manual_seed(seed)
    base = {
        "hs": torch.randn(N, H, generator=g),
        "ws": torch.randn(V, H, generator=g) * H**-0.5,
        "bs": torch.randn(V, generator=g) * 0.1,
        "ht": torch.randn(N, Ht, generator=g),
        "wt": torch.randn(Vt, Ht, generator=g) * Ht**-0.5,
    }
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    labels = labels.to(device)
    kw = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "weight_temperature": 2.0}

    def leaves(dtype):
        grads = ("hs", "ws", "bs")
        return {k: v.to(device, dtype).requires_grad_(k in grads) for k, v in base.items()}

    def materialised(p):
        zs = p["hs"] @ p["ws"].t() + p["bs"]
        zt = (p["ht"] @ p["wt"].t())[:, :V]
        loss = dkl.ikl_loss(zs, zt, mask=labels != -100, impl="torch", **kw)
        if ce_weight:
            z = zs if zs.dtype == torch.float64 else zs.float()
            loss = loss + ce_weight * F.cross_entropy(z, labels, ignore_index=-100)
        return loss, torch.autograd.grad(loss, (p["hs"], p["ws"], p["bs"]))

    def errors(loss, grads):
        errs = [rel_err(loss.item(), ref_loss.item())]
        return errs + [max_rel_err(a, b) for a, b in zip(grads, ref_grads)]

    ref_loss, ref_grads = materialised(leaves(torch.float64))
    p = leaves(DTYPES[dtype_name])
    loss = fused_linear_ikl(
        p["hs"],
        p["ws"],
        p["ht"],
        p["wt"],
        student_bias=p["bs"],
        labels=labels,
        ce_weight=ce_weight,
        chunk_size=cfg["chunk"],
        **kw,
    )
    fused = errors(loss, torch.autograd.grad(loss, (p["hs"], p["ws"], p["bs"])))
    mat = errors(*materialised(leaves(DTYPES[dtype_name])))
    floor = 1e-4 if dtype_name == "fp32" else 1e-2
    ok = all(f <= max(2 * m, floor) for f, m in zip(fused, mat))
    return [" / ".join(f"{e:.1e}" for e in errs) for errs in (fused, mat)], ok


OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
TEST_ID = re.compile(r"(tests/\S+\.py::\S+)")


def pytest_outcomes(output: str) -> dict[str, str]:
    """test id -> outcome, from ``pytest -v`` output (with or without xdist's ``[gwN]``)."""
    outcomes = {}
    for line in output.splitlines():
        outcome, test = OUTCOME.search(line), TEST_ID.search(line)
        if outcome and test:
            outcomes[test.group(1)] = outcome.group(1)
    return outcomes


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


def run_suite(sink: Sink, ctx: Ctx) -> None:
    """The kernel and LLM test files in a child pytest, natively on this device."""
    files = ctx.size["suite"]
    if not files:
        sink.text("Skipped in the smoke run (CI runs these files under Triton's interpreter).")
        return
    args = ["-v", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short", "-rfE", *files]
    if ctx.device.type == "cuda" and importlib.util.find_spec("xdist") is not None:
        args += ["-n", "8"]  # each worker compiles its share of the kernel variants
    src = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**child_env(ctx.device), "PYTHONPATH": src}
    timeout = max(10.0, ctx.left() * 0.7)
    sink.text(f"`pytest {' '.join(args)}` (timeout {timeout:.0f} s):")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out:
        cmd = [sys.executable, "-m", "pytest", *args]
        note = run_in_session(cmd, timeout, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        out.seek(0)
        output = out.read()
    outcomes = pytest_outcomes(output)
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or "no test ran"
    sink.table("test files", "result", "time (s)", "note")
    sink.row(", ".join(files), summary, f"{time.time() - t0:.0f}", note)
    for test, outcome in outcomes.items():
        if outcome in ("PASSED", "XFAIL"):
            sink.check(True)
        elif outcome in ("FAILED", "ERROR", "XPASS"):
            sink.check(False)
            sink.text(f"- {outcome.lower()}: `{test}`")
    if note.startswith("timed out"):
        sink.check(None)  # the rest did not run: not a failure of the code under test
    elif note not in ("exit 0", "exit 1") or not outcomes:
        sink.check(False)  # pytest itself failed (collection, crash, usage)
    if note != "exit 0":
        tail = "\n".join(output.strip().splitlines()[-40:])
        sink.text(f"pytest output (tail):\n\n```\n{tail}\n```")


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


def section_correctness(sink: Sink, ctx: Ctx) -> None:
    size, dev = ctx.size, ctx.device
    sink.text("### Test files on this device")
    run_suite(sink, ctx)

    tols = ", ".join(f"{k} {v:g}" for k, v in GRAD_TOL.items())
    sink.text(
        "### Kernel at hardware sizes against float64 oracles\n\n"
        "`dkl.ops.fused_divergence` with a row mask (one row masked at least) and a per-row "
        "upstream gradient that is not 1. Loss error: max absolute, bound "
        f"{LOSS_TOL:g} × max |loss| + {LOSS_ATOL:g}. Gradient errors relative to the largest "
        f"reference entry, bound {tols}, or one unit in the last place of the input dtype at the "
        "largest entry where that is larger (the reference comes back rounded to that dtype). "
        "`-inf` targets: about 30 % of the target logits (one row with a single finite class); "
        "those classes must add nothing, as in `F.kl_div`."
    )
    sink.table("case", "dtype", "B × C", "loss err (bound)", "grad input", "grad target", "result")
    dtypes = size["case_dtypes"]
    configs = kernel_configs()
    grid = [(sh, False) for sh in size["big_shapes"]] + [(sh, True) for sh in size["inf_shapes"]]
    cases = []
    for (B, C), neg_inf in grid:
        for dname in size["case_dtypes"]:
            for name, cfg in configs.items():
                label = name + (", -inf targets" if neg_inf else "")
                case = functools.partial(
                    kernel_case, cfg, dname, (B, C), dev, neg_inf=neg_inf, seed=len(cases)
                )
                cases.append(([label, dname, f"{B} × {C}"], case))
    run_cases(sink, ctx, cases)

    sink.text(
        "### `dkl.kl_loss` with `-inf` targets against `F.kl_div`\n\n"
        "The fused kernel through the public loss (`impl='triton'`, T = 2, mean over rows) "
        "against `F.kl_div(..., reduction='batchmean')` in float64."
    )
    sink.table("dtype", "B × C", "loss err (bound)", "grad input", "result")
    B, C = size["kl_div_shape"]
    cases = [
        ([d, f"{B} × {C}"], functools.partial(kl_div_case, d, (B, C), dev, 100 + i))
        for i, d in enumerate(dtypes)
    ]
    run_cases(sink, ctx, cases)

    lin = size["linear"]
    sink.text(
        "### `dkl.llm.fused_linear_ikl` against materialised logits\n\n"
        f"N = {lin['N']} tokens (every 5th ignored), student H = {lin['H']}, V = {lin['V']}; "
        f"teacher H = {lin['Ht']}, V = {lin['Vt']} (cut to the student's); chunks of "
        f"{lin['chunk']}; student bias. Relative errors of the loss and of the gradients of "
        "hidden states, head weight and bias against float64, for the chunked path and for "
        "materialising the logits in the same dtype; pass when the chunked path is within twice "
        "the materialised one's error (or under 1e-4 in float32, 1e-2 in bfloat16)."
    )
    sink.table(
        "dtype", "ce_weight", "chunked: loss / hidden / weight / bias", "materialised", "result"
    )
    cases = [
        ([d, w], functools.partial(linear_case, d, w, dev, lin, 200 + i))
        for i, (d, w) in enumerate(size["linear_cases"])
    ]
    run_cases(sink, ctx, cases, needs_kernel=False)


# ---------------------------------------------------------------------------------------------
# 2. Kernel speed and memory
# ---------------------------------------------------------------------------------------------


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
    if ctx.size["compile_s"] is None:
        return methods | dict.fromkeys(names, "skipped (smoke run)")
    compile_ = functools.partial(torch.compile, backend=ctx.backend, dynamic=False)
    return methods | dict(zip(names, (compile_(ikl_torch), compile_(ks.kl_div))))


def section_kernel(sink: Sink, ctx: Ctx) -> None:
    size, dev = ctx.size, ctx.device
    ks = sibling("kernel_speed")
    bw = ks.copy_bandwidth(dev, size["copy_mib"])
    timer = ks.Timer(dev, **size["kernel_timer"])
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
    combos = [(B, C, d) for B, C in size["kernel_shapes"] for d in size["kernel_dtypes"]]
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
                    skip = ctx.compile_fits("kernel")
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
            _free(dev)

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


# ---------------------------------------------------------------------------------------------
# 3. Training steps
# ---------------------------------------------------------------------------------------------


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


def mode_skip(ctx: Ctx, mode: Mode, section: str, need_s: float = 5.0) -> str | None:
    """Why ``mode`` is not run (``None``: run it)."""
    allowed = ctx.size["modes"]
    if allowed is not None and str(mode) not in allowed:
        return "skipped (smoke run)"
    if mode.compiled:
        reason = ctx.compile_fits(section)
        if reason:
            return reason
    if ctx.left() < need_s:
        return "skipped (time budget)"
    return None


def timed(step: Callable, device: torch.device):
    """(milliseconds, step's result), synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    out = step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


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


def section_kd(sink: Sink, ctx: Ctx) -> None:
    from dkl.models import create_model
    from dkl.recipes.distill import DistillLoss

    methods = sibling("train_step").METHODS  # ce / kd / dkd / ikl as the CIFAR-100 presets
    cfg, dev = ctx.size["kd"], ctx.device
    B = cfg["batch"]
    sink.text(
        f"{cfg['teacher']} -> {cfg['student']}, batch {B}, 3×32×32, {NUM_CLASSES} classes, random "
        "weights and images. One step: teacher forward (no grad; none for ce), student forward, "
        "`DistillLoss`, backward, SGD. Methods interleaved round by round; median of "
        f"{cfg['reps']} rounds after {cfg['warmup']}; peak memory of one more step. First-step "
        f"loss from the same weights, against float32 eager (relative tolerance {STEP_TOLS})."
    )
    torch.manual_seed(0)
    teacher = create_model(cfg["teacher"], NUM_CLASSES).to(dev).eval().requires_grad_(False)
    student = create_model(cfg["student"], NUM_CLASSES).to(dev).train()
    init = copy.deepcopy(student.state_dict())
    x = torch.rand(B, 3, 32, 32, device=dev)
    y = torch.randint(0, NUM_CLASSES, (B,), device=dev)
    crits = {m: DistillLoss(c) for m, c in methods.items()}
    sink.table("mode", "method", "step (ms)", "vs kd", "peak (GiB)", "first-step loss", "check")
    ref: dict[str, float] = {}
    for mode in MODES:
        skip = mode_skip(ctx, mode, "kd")
        if skip:
            sink.row(mode, "all", result=skip)
            continue
        s_net = torch.compile(student, backend=ctx.backend) if mode.compiled else student
        t_net = torch.compile(teacher, backend=ctx.backend) if mode.compiled else teacher
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step(method, s_net=s_net, t_net=t_net, opt=opt, mode=mode):
            with autocast(dev, mode.amp):
                z_t = None
                if method != "ce":
                    with torch.no_grad():
                        z_t = t_net(x)
                loss = crits[method](s_net(x), z_t, y, epoch=30)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach().float().item()

        def run(step=step, opt=opt):
            first, first_ms, times = {}, {}, {m: [] for m in methods}
            for m in methods:  # the same weights for each method's first step
                student.load_state_dict(init)
                opt.state.clear()
                first_ms[m], first[m] = timed(lambda m=m: step(m), dev)
            for r in range(cfg["warmup"] + cfg["reps"]):
                for m in methods:
                    ms, _ = timed(lambda m=m: step(m), dev)
                    if r >= cfg["warmup"]:
                        times[m].append(ms)
                if ctx.left() < 3:
                    break
            peaks = {}
            for m in methods:
                reset_peak(dev)
                if dev.type == "cuda":
                    step(m)
                peaks[m] = peak_gib(dev)
            med = {m: statistics.median(times[m] or [first_ms[m]]) for m in methods}
            return first, med, peaks

        done, out = attempt(run, ctx)
        if not done:
            sink.row(mode, "all", result=out)
            failed(sink, out)
            continue
        first, med, peaks = out
        for m in methods:
            vs = "–" if m == "ce" else f"{(med[m] / med['kd'] - 1) * 100:+.1f} %"
            verdict = loss_check(sink, mode, first[m], ref.get(m), mode == MODES[0])
            sink.row(mode, m, f"{med[m]:.2f}", vs, peaks[m], f"{first[m]:.5f}", verdict)
        if mode == MODES[0]:
            ref = dict(first)
        over = med["ikl"] / med["kd"] - 1
        sink.target(
            f"KD {mode}: IKL step overhead over KD < {IKL_OVER_KD:.0%}",
            f"{med['ikl']:.2f} vs {med['kd']:.2f} ms ({over:+.1%})",
            med["ikl"] / med["kd"],
            over < IKL_OVER_KD,
        )


def synthetic_images(n: int, gen: torch.Generator, protos: torch.Tensor, noise: float):
    """Class prototypes (smooth random images) plus noise, in [0, 1]: learnable in a few steps."""
    y = torch.randint(0, protos.shape[0], (n,), generator=gen)
    x = protos[y] + noise * torch.randn(n, *protos.shape[1:], generator=gen)
    return x.clamp(0, 1), y


class AdversarialBench:
    """IKL-AT steps on one WRN: dkl's loop and the authors' (``benchmarks/adv_step.py``)."""

    BASE = "authors' loop fp32"
    epochs = 200  # the last epoch: the full ε = 8/255
    alpha, beta = 4.0, 20.0  # the CIFAR-100 IKL-AT preset

    def __init__(self, ctx: Ctx) -> None:
        from dkl.attacks import TrainAttack
        from dkl.models import with_normalization
        from dkl.models.wrn import WideResNet
        from dkl.recipes.adversarial import AdversarialLoss

        self.adv = sibling("adv_step")
        self.ctx, self.cfg, self.dev = ctx, ctx.size["adv"], ctx.device
        cfg, dev = self.cfg, self.dev
        torch.manual_seed(0)
        net = WideResNet(cfg["depth"], cfg["widen"], NUM_CLASSES)
        self.model = with_normalization(net, self.adv.CIFAR100_MEAN, self.adv.CIFAR100_STD)
        self.model = self.model.to(dev).train()
        self.init = copy.deepcopy(self.model.state_dict())
        self.attack = TrainAttack(loss="ikl", budget="high", max_eps=8 / 255)
        self.criterion = AdversarialLoss("ikl_at", alpha=self.alpha, beta=self.beta)
        self.steps, self.step_size, self.eps = self.attack.schedule(self.epochs, self.epochs)
        self.x = torch.rand(cfg["batch"], 3, 32, 32, device=dev)
        self.y = torch.randint(0, NUM_CLASSES, (cfg["batch"],), device=dev)
        prior = torch.rand(NUM_CLASSES, NUM_CLASSES, device=dev) + 0.1
        self.prior = prior / prior.sum(1, keepdim=True)  # GI rows, picked by label
        self.ms: dict[str, float] = {}  # median step time per variant
        self.first_loss: dict[str, float] = {}  # the authors' first-step loss: the reference

    def dkl_loss(self, net, x, y):
        from dkl.attacks import eval_mode

        w = self.prior[y]
        with torch.no_grad(), eval_mode(net):
            z_nat = net(x)
        E = self.epochs
        x_adv = self.attack(net, x, epoch=E, epochs=E, labels=y, z_nat=z_nat, class_weights=w)
        return self.criterion(net(x), net(x_adv), y, class_weights=w)["loss"]

    def authors_loss(self, net, x, y):
        w = self.prior[y]
        x_adv = self.adv.authors_attack(net, x, w, self.eps, self.steps, self.step_size)
        return self.adv.authors_loss(net, x, x_adv, y, w, self.alpha, self.beta)

    def prepare(self, mode: Mode):
        """Initial weights in ``mode``'s memory format, the (compiled) net and a fresh SGD."""
        self.model.load_state_dict(self.init)
        fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        net = torch.compile(self.model, backend=self.ctx.backend) if mode.compiled else self.model
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return net, opt, fmt

    def step(self, loss_fn, net, opt, mode, x, y) -> float:
        with autocast(self.dev, mode.amp):
            loss = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().float().item()

    def same_maths(self, sink: Sink) -> None:
        """dkl's training loss and gradients against the authors' on the same adversarial batch,
        in full float32 and with torch's default TF32 convolutions, and how many adversarial
        pixels the two attacks share."""
        with full_float32():
            loss_err, grad_err, same = self.compare()
        _, tf32_err, _ = self.compare()
        ok = loss_err <= 1e-4 and grad_err <= 1e-4
        sink.check(ok)
        sink.text(
            "Same maths, on the same adversarial batch, in full float32 (TF32 off): dkl's training "
            f"loss (closed form) and the authors' (pairwise) differ by {loss_err:.1e}, their "
            f"parameter gradients by {grad_err:.1e} (relative; tolerance 1e-4: "
            f"{'ok' if ok else 'FAIL'}). With torch's default TF32 cuDNN convolutions the "
            f"gradients differ by {tf32_err:.1e}: TF32's 10-bit mantissa rounds the two losses' "
            "slightly different input gradients apart. The two attacks share "
            f"{100 * same:.1f} % of the adversarial pixels (sign steps on near-zero input "
            "gradients may flip between two float orderings)."
        )

    def compare(self) -> tuple[float, float, float]:
        """(loss error, parameter-gradient error, share of equal adversarial pixels)."""
        self.model.load_state_dict(self.init)
        self.model.to(memory_format=torch.contiguous_format)
        x, y, w = self.x, self.y, self.prior[self.y]
        torch.manual_seed(1)
        x_adv = self.attack(
            self.model, x, epoch=self.epochs, epochs=self.epochs, labels=y, class_weights=w
        )
        torch.manual_seed(1)
        x_ref = self.adv.authors_attack(self.model, x, w, self.eps, self.steps, self.step_size)
        params = list(self.model.parameters())
        self.model.train()  # the training forwards: BatchNorm on batch statistics
        loss = self.criterion(self.model(x), self.model(x_adv), y, class_weights=w)["loss"]
        grads = torch.autograd.grad(loss, params)
        ref = self.adv.authors_loss(self.model, x, x_adv, y, w, self.alpha, self.beta)
        ref_grads = torch.autograd.grad(ref, params)
        loss_err = rel_err(loss.item(), ref.item())
        flat = torch.cat([g.flatten() for g in grads])
        flat_ref = torch.cat([g.flatten() for g in ref_grads])
        grad_err = ((flat - flat_ref).norm() / flat_ref.norm()).item()
        return loss_err, grad_err, (x_adv == x_ref).float().mean().item()

    def variant(self, sink: Sink, name: str, mode: Mode) -> None:
        """One table row: ``name`` ("dkl" or "authors' loop") in ``mode``."""
        ctx, cfg, dev = self.ctx, self.cfg, self.dev
        label = f"{name} {mode}"
        skip = mode_skip(ctx, mode, "adv", need_s=10.0)
        if skip:
            sink.row(name, mode, result=skip)
            return
        loss_fn = self.dkl_loss if name == "dkl" else self.authors_loss

        def run():
            net, opt, fmt = self.prepare(mode)
            x = self.x.contiguous(memory_format=fmt)
            torch.manual_seed(1)  # the same random start in every loop
            ms0, first = timed(lambda: self.step(loss_fn, net, opt, mode, x, self.y), dev)
            times, peak = repeat_steps(
                lambda: self.step(loss_fn, net, opt, mode, x, self.y), cfg, ctx
            )
            return first, statistics.median(times or [ms0]), peak

        done, out = attempt(run, ctx)
        if not done:
            sink.row(name, mode, result=out)
            failed(sink, out)
            return
        first, med, peak = out
        self.ms[label] = med
        base = self.ms.get(self.BASE)
        if label == self.BASE:  # it runs first
            self.first_loss[label] = first
        ref = self.first_loss.get(self.BASE)
        verdict = loss_check(sink, mode, first, ref, label == self.BASE)
        speed = f"{base / med:.2f}×" if base else "–"
        sink.row(name, mode, f"{med:.1f}", speed, peak, f"{first:.5f}", verdict)


ADV_VARIANTS = [("authors' loop", Mode("fp32"))] + [
    ("dkl", m)
    for m in (
        Mode("fp32"),
        Mode("bf16"),
        Mode("bf16", channels_last=True),
        Mode("bf16", compiled=True, channels_last=True),
        Mode("fp32", compiled=True),
    )
]
ADV_COLUMNS = ("loop", "mode", "step (ms)", "vs authors", "peak (GiB)", "first-step loss", "check")


def section_adv(sink: Sink, ctx: Ctx) -> None:
    bench = AdversarialBench(ctx)
    cfg = bench.cfg
    sink.text(
        f"IKL-AT, WRN-{cfg['depth']}-{cfg['widen']}, batch {cfg['batch']}, CIFAR-100 shapes, "
        f"random images and GI class-weight rows; attack: {bench.steps} steps of "
        f"{bench.step_size * 255:.0f}/255 at ε = {bench.eps * 255:.0f}/255 on IKL (α = β = 1); "
        f"loss CE + IKL (α = {bench.alpha:g}, β = {bench.beta:g}); SGD step included. The "
        "authors' loop (`benchmarks/adv_step.py`) recomputes the natural logits in every attack "
        "step and sums the wMSE over B×C×C pairs; dkl computes them once (eval mode, no grad) and "
        f"uses the O(B·C) closed form. Median of {cfg['reps']} steps after {cfg['warmup']}; "
        "peak memory over those steps. First-step loss from the same weights and random start, "
        "against the authors' float32 one."
    )
    sink.table(*ADV_COLUMNS)
    for name, mode in ADV_VARIANTS:
        if not mode.compiled:
            bench.variant(sink, name, mode)
    if ctx.left() > 10:
        done, out = attempt(lambda: bench.same_maths(sink), ctx)
        if not done:
            sink.text(f"Same maths: {out}")
            failed(sink, out)
    base = bench.ms.get(bench.BASE)
    for label, goal in (
        ("dkl fp32", AT_SPEEDUP_FP32),
        ("dkl bf16 autocast + channels_last", AT_SPEEDUP_BF16),
    ):
        what = f"IKL-AT {label}: ≥ {goal}× the authors' loop"
        if base and label in bench.ms:
            sp = base / bench.ms[label]
            sink.target(what, f"{bench.ms[label]:.1f} vs {base:.1f} ms", sp, sp >= goal)
        else:
            sink.target(what, "not measured", None, None)
    short_run(sink, bench)
    sink.text(
        "`torch.compile`d model (after the short run, so that a long compile cannot crowd it out):"
    )
    sink.table(*ADV_COLUMNS)
    for name, mode in ADV_VARIANTS:
        if mode.compiled:
            bench.variant(sink, name, mode)


EVAL_NOISE = (0.15, 0.5, 1.0)  # held-out noise levels: the training one, then harder ones


def short_run(sink: Sink, bench: AdversarialBench) -> None:
    """float32 vs bfloat16 + channels_last over a short IKL-AT run on a learnable synthetic task;
    the noise is a second float32 run with other data and attack draws."""
    from dkl.attacks import eval_mode

    ctx, cfg, dev = bench.ctx, bench.cfg, bench.dev
    n_steps, n_eval, B = cfg["run_steps"], cfg["run_eval"], cfg["batch"]
    grid = torch.rand(NUM_CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    protos = F.interpolate(grid, size=32, mode="nearest")
    gen = torch.Generator().manual_seed(6)
    evals = [synthetic_images(n_eval, gen, protos, noise) for noise in EVAL_NOISE]
    evals = [(x.to(dev), y) for x, y in evals]
    n_all = n_eval * len(EVAL_NOISE)
    levels = ", ".join(f"{n:g}" for n in EVAL_NOISE)
    sink.text(
        f"Short run: {n_steps} IKL-AT steps (batch {B}) from the same weights on a synthetic task "
        f"(100 class prototypes + noise 0.15), then clean top-1 on {n_eval} held-out images at "
        f"each noise level {levels} (the harder levels keep the accuracy off its ceiling): "
        "float32 twice (other data and attack draws give the noise) and bfloat16 + channels_last. "
        f"Same accuracy within noise, on all {n_all} images: |Δ| ≤ max(2 × the float32 runs' "
        "difference, 2 standard errors of a difference of two binomial proportions, 3 images)."
    )
    sink.table(
        "run", "final loss (mean of last 5 steps)", *(f"top-1 at {n:g} (%)" for n in EVAL_NOISE)
    )
    runs = {
        "fp32, draws 0": (Mode("fp32"), 0),
        "fp32, draws 1": (Mode("fp32"), 1),
        "bf16 + channels_last, draws 0": (Mode("bf16", channels_last=True), 0),
    }
    results = {}
    for label, (mode, seed) in runs.items():
        if ctx.left() < 15:
            sink.row(label, result="skipped (time budget)")
            continue

        def run(mode=mode, seed=seed):
            net, opt, fmt = bench.prepare(mode)
            gen = torch.Generator().manual_seed(100 + seed)
            torch.manual_seed(100 + seed)
            losses = []
            for _ in range(n_steps):
                x, y = synthetic_images(B, gen, protos, 0.15)
                x = x.to(dev).contiguous(memory_format=fmt)
                losses.append(bench.step(bench.dkl_loss, net, opt, mode, x, y.to(dev)))
                if ctx.left() < 5:
                    raise BudgetSpent
            correct = []
            with torch.no_grad(), eval_mode(bench.model), autocast(dev, mode.amp):
                for x_eval, y_eval in evals:
                    pred = bench.model(x_eval.contiguous(memory_format=fmt)).argmax(1).cpu()
                    correct.append(int((pred == y_eval).sum()))
            return statistics.mean(losses[-5:]), correct

        done, out = attempt(run, ctx)
        if not done:
            sink.row(label, result=out)
            continue
        results[label] = out
        sink.row(label, f"{out[0]:.4f}", *(f"{100 * c / n_eval:.1f}" for c in out[1]))
    what = "IKL-AT bf16 + channels_last: clean accuracy as fp32's within noise"
    a, b, h = (results.get(k) for k in runs)
    if not (a and b and h):
        sink.target(what, "not measured", None, None)
        return
    acc_a, acc_b, acc_h = (100 * sum(r[1]) / n_all for r in (a, b, h))
    p = acc_a / 100
    se = 100 * math.sqrt(2 * p * (1 - p) / n_all)
    tol = max(2 * abs(acc_a - acc_b), 2 * se, 300 / n_all)
    diff = abs(acc_h - acc_a)
    sink.target(
        what,
        f"{acc_h:.1f} vs {acc_a:.1f} % (all levels): Δ {diff:.1f} pp, noise {tol:.1f} pp",
        diff / tol,
        diff <= tol,
    )


def section_ssl(sink: Sink, ctx: Ctx) -> None:
    from dkl.models import create_model
    from dkl.recipes.semisup import fixmatch_loss, ikl_consistency, param_groups

    cfg, dev = ctx.size["ssl"], ctx.device
    n = cfg["batch"]
    side = cfg["kwargs"].get("img_size", 32)
    sink.text(
        f"{cfg['model']} (drop-path off, so that the variants' losses compare), {n} labeled + "
        f"{n} unlabeled images ({side}×{side}); labeled, weak and strong views in one forward of "
        f"{3 * n} (USB's use_cat); CE + λ_u · unsupervised term (λ_u = 1, confidence threshold 0 "
        "so that the term is in the loss); AdamW with layer decay 0.5. FixMatch-IKL: α = 1, "
        f"β = 0.1, T = T2 = 1 (the preset). Median of {cfg['reps']} steps after {cfg['warmup']}; "
        "peak memory over those steps."
    )
    torch.manual_seed(0)
    model = create_model(cfg["model"], NUM_CLASSES, drop_path_rate=0.0, **cfg["kwargs"])
    model = model.to(dev).train()
    init = copy.deepcopy(model.state_dict())
    x = torch.rand(3 * n, 3, side, side, device=dev)
    y = torch.randint(0, NUM_CLASSES, (n,), device=dev)
    unsup = {
        "fixmatch": lambda zi, zt: fixmatch_loss(zi, zt, threshold=0.0)[0],
        "fixmatch_ikl": lambda zi, zt: ikl_consistency(zi, zt, threshold=0.0, beta=0.1)[0],
    }
    sink.table(
        "mode", "method", "step (ms)", "vs fixmatch", "peak (GiB)", "first-step loss", "check"
    )
    ref: dict[str, float] = {}
    for mode in MODES:
        skip = mode_skip(ctx, mode, "ssl")
        if skip:
            sink.row(mode, "all", result=skip)
            continue
        net = torch.compile(model, backend=ctx.backend) if mode.compiled else model

        def run(net=net, mode=mode):
            out = {}
            for method, u in unsup.items():
                model.load_state_dict(init)
                groups = param_groups(model, lr=5e-4, weight_decay=5e-4, layer_decay=0.5)
                for g in groups:
                    g.pop("param_names")
                opt = torch.optim.AdamW(groups, lr=5e-4, weight_decay=5e-4)

                def step(u=u, opt=opt):
                    with autocast(dev, mode.amp):
                        logits = net(x)
                        target, inp = logits[n:].chunk(2)
                        loss = F.cross_entropy(logits[:n], y) + u(inp, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return loss.detach().float().item()

                ms0, first = timed(step, dev)
                times, peak = repeat_steps(step, cfg, ctx)
                out[method] = (first, statistics.median(times or [ms0]), peak)
            return out

        done, out = attempt(run, ctx)
        if not done:
            sink.row(mode, "all", result=out)
            failed(sink, out)
            continue
        for method, (first, med, peak) in out.items():
            vs = "–" if method == "fixmatch" else f"{(med / out['fixmatch'][1] - 1) * 100:+.1f} %"
            verdict = loss_check(sink, mode, first, ref.get(method), mode == MODES[0])
            sink.row(mode, method, f"{med:.2f}", vs, peak, f"{first:.5f}", verdict)
        if mode == MODES[0]:
            ref = {m: v[0] for m, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Orchestration: budgets, child processes, the report
# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, tuple[str, float, Callable]] = {
    # name: (title, share of the budget, function)
    "correctness": ("1. Correctness on hardware", 90, section_correctness),
    "kernel": ("2. Kernel speed and memory", 120, section_kernel),
    "kd": ("3a. Training step: knowledge distillation", 60, section_kd),
    "adv": ("3b. Training step: IKL adversarial training", 100, section_adv),
    "ssl": ("3c. Training step: semi-supervised ViT", 70, section_ssl),
}


def run_child_section(name: str, out_path: str, until: float, smoke: bool, backend: str) -> int:
    """Entry of a child process: one section, its records streamed to ``out_path``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(out_path, "a") as stream:
        sink = Sink(stream)
        try:
            SECTIONS[name][2](sink, Ctx(device, smoke, until, backend))
            return 0
        except Exception:  # noqa: BLE001  (the parent reports it)
            traceback.print_exc()
            return 3  # "the section raised" to the parent


@dataclass
class SectionResult:
    name: str
    records: list[dict]
    status: str
    seconds: float
    budget: float


def run_section(name: str, budget: float, args, device: torch.device) -> SectionResult:
    title = SECTIONS[name][0]
    log(f"section {title}: budget {budget:.0f} s")
    until = time.time() + budget
    t0 = time.time()
    if not args.isolate:
        sink = Sink()
        try:
            SECTIONS[name][2](sink, Ctx(device, args.smoke, until, args.backend))
            status = "ok"
        except Exception as exc:  # noqa: BLE001  (the section's failure is a report line)
            tb = traceback.format_exc().strip().splitlines()[-6:]
            sink.text("```\n" + "\n".join(tb) + "\n```")
            status = f"error: {first_line(exc)}"
        return SectionResult(name, sink.records, status, time.time() - t0, budget)

    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = Path(tmp) / "records.jsonl", Path(tmp) / "stderr.txt"
        out_path.touch()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            name,
            "--child-out",
            str(out_path),
            "--until",
            repr(until),
            "--backend",
            args.backend,
        ]
        if args.smoke:
            cmd.append("--smoke")
        grace = 10.0  # a child stops itself at its deadline; this is for one that hangs
        with open(err_path, "w") as err:
            note = run_in_session(cmd, budget + grace, stderr=err, env=child_env(device))
        if note == "exit 0":
            status = "ok"
        elif note.startswith("timed out"):
            status = f"killed at its time budget ({budget:.0f} s + {grace:.0f} s)"
        elif note == "exit 3":
            status = "error: the section raised (traceback below)"
        else:
            status = f"crashed ({note})"
        records = []
        for line in out_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                records.append(json.loads(line))
        if status != "ok":
            tail = err_path.read_text(errors="replace").strip().splitlines()[-12:]
            if tail:
                records.append(
                    {"kind": "text", "text": "stderr (tail):\n\n```\n" + "\n".join(tail) + "\n```"}
                )
    return SectionResult(name, records, status, time.time() - t0, budget)


def child_env(device: torch.device) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)  # the interpreter would time the CPU, not the GPU
    return env


def environment(device: torch.device, args) -> list[tuple[str, str]]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rows = [("device", sibling("kernel_speed").device_name(device))]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
        rows.append(
            ("GPU", gpu + f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    command = " ".join(["python", "benchmarks/gpu_check.py", *args.argv])
    rows += [
        ("date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("torch", torch.__version__),
        ("triton", version("triton")),
        ("liger-kernel", version("liger-kernel")),
        ("timm", version("timm")),
        ("dkl", dkl.__version__),
        ("python", platform.python_version()),
        ("TF32", f"matmul {tf32[0]}, cuDNN {tf32[1]} (the torch defaults)"),
        ("run", f"`{command}`, budget {args.budget:.0f} s, compile backend {args.backend}"),
    ]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("Triton", "CPU interpreter (TRITON_INTERPRET=1)"))
    return rows


def md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def md_table(columns: list[str], rows: list[list]) -> list[str]:
    return [md_row(columns), "|" + "---|" * len(columns), *(md_row(r) for r in rows), ""]


def count_checks(records: list[dict]) -> str:
    oks = [r["ok"] for r in records if r["kind"] == "check"]
    counts = (sum(ok is True for ok in oks), sum(ok is False for ok in oks), oks.count(None))
    return "{} passed, {} failed, {} skipped".format(*counts)


def target_cells(t: dict) -> list[str]:
    verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
    ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}"
    return [t["what"], t["measured"], ratio, verdict]


def render_section(res: SectionResult) -> list[str]:
    lines = [f"## {SECTIONS[res.name][0]}", ""]
    spent = f"{res.seconds:.0f} s of a {res.budget:.0f} s budget"
    lines += [f"Status: {res.status}; {spent}; checks: {count_checks(res.records)}.", ""]
    table: tuple[list, list] | None = None  # (columns, rows) being collected
    for r in res.records:
        if r["kind"] == "row" and table is not None:
            table[1].append(r["cells"])
        elif r["kind"] in ("text", "table"):
            if table is not None:
                lines += md_table(*table)
            table = (r["columns"], []) if r["kind"] == "table" else None
            if r["kind"] == "text":
                lines += [r["text"], ""]
    if table is not None:
        lines += md_table(*table)
    targets = [target_cells(r) for r in res.records if r["kind"] == "target"]
    if targets:
        lines += ["Targets:", ""] + md_table(["target", "measured", "ratio", "verdict"], targets)
    return lines


def render_summary(results: list[SectionResult]) -> list[str]:
    """Each section's status and checks, then every target."""
    rows = [
        [SECTIONS[r.name][0], r.status, f"{r.seconds:.0f}", count_checks(r.records)]
        for r in results
    ]
    lines = md_table(["section", "status", "time (s)", "checks"], rows)
    targets = [
        [r.name, *target_cells(t)] for r in results for t in r.records if t["kind"] == "target"
    ]
    if targets:
        lines += md_table(["section", "target", "measured", "ratio", "verdict"], targets)
    return lines


def render(env: list[tuple[str, str]], results: list[SectionResult], smoke: bool) -> str:
    title = "dkl GPU check" + (" (smoke run: tiny sizes, not a measurement)" if smoke else "")
    lines = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in env] + ["", "## Summary", ""]
    lines += render_summary(results)
    for r in results:
        lines += render_section(r)
    return "\n".join(lines)


def device_slug(device: torch.device, smoke: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"smoke_{slug}" if smoke else slug


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (seconds)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=440.0,
        help="seconds for the whole run, shared by the sections (default 440)",
    )
    p.add_argument(
        "--results-dir",
        help="where gpu_check_<device>.md is written (default benchmarks/results; with --smoke "
        "the system's temporary folder)",
    )
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="each section in a child process (default on a GPU)",
    )
    iso.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        p.error(f"--sections: expected names from {','.join(SECTIONS)}, got {args.sections!r}")
    args.sections = names
    if not args.budget > 0:
        p.error(f"--budget: expected seconds > 0, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        code = run_child_section(args.child, args.child_out, args.until, args.smoke, args.backend)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: it can wait on compile workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print(
            "No CUDA device: the full check needs a GPU. Run with --smoke for the tiny CPU "
            "version (it checks the script, measures nothing).",
            flush=True,
        )
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel at tiny sizes: cheap
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if args.isolate is None:
        args.isolate = device.type == "cuda"

    env = environment(device, args)
    results_dir = args.results_dir or (
        Path(tempfile.gettempdir()) if args.smoke else HERE / "results"
    )
    path = Path(results_dir) / f"gpu_check_{device_slug(device, args.smoke)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{env[0][1]}; report -> {path}")
    results: list[SectionResult] = []
    end = START + args.budget
    for i, name in enumerate(args.sections):
        shares = [SECTIONS[n][1] for n in args.sections[i:]]
        budget = (end - time.time()) * shares[0] / sum(shares)
        if budget < 10:
            results.append(SectionResult(name, [], "skipped: the time budget is spent", 0, 0))
            continue
        results.append(run_section(name, budget, args, device))
        path.write_text(render(env, results, args.smoke))  # after each section: a partial report
    report = render(env, results, args.smoke)
    path.write_text(report)
    print("\n" + report, flush=True)
    # the summary once more: a log's tail is often all that is read
    print("\n".join(["", f"## Summary ({env[0][1]})", "", *render_summary(results)]), flush=True)
    log(f"done in {time.time() - START:.0f} s; report: {path}")
    failed = any(r.status != "ok" for r in results) or any(
        x["kind"] == "check" and x["ok"] is False for r in results for x in r.records
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
