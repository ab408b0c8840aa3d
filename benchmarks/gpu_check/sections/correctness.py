"""1. Correctness on hardware: the kernel, loss edge-case and LLM test files run natively on the
GPU (pytest in a child process), then the kernel at hardware sizes (C up to 256k; float32 /
bfloat16 / float16; row masks; class weights; ``-inf`` target logits) against float64 oracles,
and ``dkl.llm.fused_linear_ikl`` against the materialised logits in float64."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import dkl
from dkl import ops
from dkl.llm import fused_linear_ikl

from ..core import ROOT, Ctx, Section, child_env, run_cases, run_in_session, sibling
from ..measure import DTYPES, max_rel_err, rel_err, ulp_rel
from ..oracles import oracle
from ..report import Sink

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
}
# the kernel in Triton's interpreter; the test files are left to CI
SMOKE = {
    "suite": None,
    "case_dtypes": ("fp32",),
    "big_shapes": [(3, 37)],
    "inf_shapes": [(3, 37)],
    "kl_div_shape": (4, 37),
    "linear": {"N": 12, "H": 8, "Ht": 12, "V": 50, "Vt": 64, "chunk": 5},
    "linear_cases": [("fp32", 0.5), ("bf16", 0.0)],
}

# Loss tolerances relative to the largest magnitude of the float64 reference. The oracle sees the
# same (already rounded) inputs, so the loss differs by float32 accumulation only; gradients are
# rounded to the input dtype on the way out (the kernel test suite's table).
LOSS_TOL, LOSS_ATOL = 2e-5, 5e-7
GRAD_TOL = {"fp32": 2e-5, "bf16": 8e-3, "fp16": 1e-3}


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


def run_suite(
    sink: Sink,
    ctx: Ctx,
    files: list[str] | None,
    *,
    env: dict | None = None,
    parallel: bool = True,
    skipped: str = "Skipped in the smoke run (CI runs these files under Triton's interpreter).",
) -> None:
    """Test files in a child pytest, natively on this device (``parallel``: under xdist)."""
    if not files:
        sink.text(skipped)
        return
    args = ["-v", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short", "-rfE", *files]
    if parallel and ctx.device.type == "cuda" and importlib.util.find_spec("xdist") is not None:
        args += ["-n", "8"]  # each worker compiles its share of the kernel variants
    src = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**child_env(ctx.device), "PYTHONPATH": src, **(env or {})}
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


def section_correctness(sink: Sink, ctx: Ctx) -> None:
    size, dev = ctx.size, ctx.device
    sink.text("### Test files on this device")
    run_suite(sink, ctx, ctx.size["suite"])

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


SECTION = Section(
    "correctness",
    "1. Correctness on hardware",
    share=90,
    run=section_correctness,
    full=FULL,
    smoke=SMOKE,
)
