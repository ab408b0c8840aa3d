"""The fused Triton kernel (dkl.ops) against independent float64 oracles and the torch path.

With a GPU the compiled kernel runs on CUDA. Without one it runs in Triton's CPU interpreter, which
must be chosen (``TRITON_INTERPRET=1``) before triton is first imported in a process: the root
``conftest.py`` does that for the whole test session.
The interpreter is slow, so the shapes are the few odd ones the issue lists.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import dkl
from dkl import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    not KERNEL_HERE,
    reason="no GPU and TRITON_INTERPRET is not 1 (the root conftest.py sets it)",
)
SHAPES = [(1, 2), (3, 1001), (17, 4099), (5, 32768)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (loss, grad) tolerances, relative to the largest magnitude of the reference. The oracle sees the
# same (already rounded) inputs, so the loss error is fp32 accumulation only; gradients are
# rounded to the input dtype on the way out.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 8e-3),
    torch.float16: (2e-5, 1e-3),
}
LOSS_ATOL = 5e-7  # float32 accumulation: a few ulps of the O(1) terms a divergence is summed from
# The torch path computes half inputs in fp32 too, so the same table serves that comparison.
CONFIGS = {
    "kl": {"kind": "kl", "temperature": 2.0},
    "dkl": {"kind": "dkl", "alpha": 1.5, "beta": 0.7, "temperature": 3.0},
    "ikl": {
        "kind": "ikl",
        "alpha": 1.0,
        "beta": 4.0,
        "temperature": 4.0,
        "weight_temperature": 4.0,
    },
    "ikl_t2": {
        "kind": "ikl",
        "alpha": 2.0,
        "beta": 0.5,
        "temperature": 4.0,
        "weight_temperature": 1.5,
    },
    "ikl_gi": {"kind": "ikl", "alpha": 1.0, "beta": 2.0, "temperature": 1.0, "class_weights": True},
}
LOSSES = {"kl": dkl.kl_loss, "dkl": dkl.dkl_loss, "ikl": dkl.ikl_loss}


# --------------------------------------------------------------------------- oracles
def _wmse_closed(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """½ W Σ w (e - ē)² in float64 (the centred form; verified against the pairwise one below)."""
    total = w.sum(1, keepdim=True)
    mean = (w * e).sum(1, keepdim=True) / total.clamp_min(1e-300)
    return 0.5 * total.squeeze(1) * (w * (e - mean) ** 2).sum(1)


def _wmse_pairwise(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The paper's pairwise definition: ¼ Σ_jk w_j w_k (e_j - e_k)²."""
    diff = e.unsqueeze(2) - e.unsqueeze(1)
    return 0.25 * (w.unsqueeze(2) * w.unsqueeze(1) * diff**2).sum((1, 2))


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
    wmse=_wmse_closed,
):
    """Per-row loss in float64; DKL's wMSE moves only t, IKL's moves s and t; weights constant."""
    s64, t64 = s.double(), t.double()
    us, ut = s64 / temperature, t64 / temperature
    log_ps, log_pt = F.log_softmax(us, 1), F.log_softmax(ut, 1)
    pt = log_pt.exp()
    if kind == "kl":
        per = (pt * (log_pt - log_ps)).sum(1)
    elif kind == "dkl":
        w = pt.detach()
        per = beta * wmse(ut - us.detach(), w) - alpha * (w * log_ps).sum(1)
    else:
        if class_weights is not None:
            w = class_weights.double()
        else:
            w = F.softmax(t64.detach() / weight_temperature, 1)
        per = beta * wmse(t64 - s64, w) - alpha * (pt.detach() * log_ps).sum(1)
    if mask is not None:
        per = torch.where(mask, per, torch.zeros_like(per))
    return per


def _close(actual, expected, rel, what, atol=0.0):
    """max |actual - expected| <= rel * max(|expected|, tiny) + atol, reported with context."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + atol, (
        f"{what}: max error {err:.3g} > {rel:g} x scale {scale:.3g} + {atol:g}"
    )


def _make(shape, dtype, *, seed, cw=False, target_grad=True, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    B, C = shape
    s = (torch.randn(B, C, generator=g) * spread).to(DEVICE, dtype)
    t = (torch.randn(B, C, generator=g) * spread + 0.5).to(DEVICE, dtype)
    s.requires_grad_(True)
    t.requires_grad_(target_grad)
    mask = torch.rand(B, generator=g) > 0.3
    if B > 1:
        mask[0] = False  # at least one masked row ...
        mask[1] = True  # ... and one valid row
    weights = None
    if cw:  # like ClassPrior rows (distributions), scaled so that W = 3 is not 1
        weights = torch.rand(B, C, generator=g)
        weights = (3.0 * weights / weights.sum(1, keepdim=True)).to(DEVICE)
    upstream = torch.randn(B, generator=g).to(DEVICE) * 2.0 + 0.5  # not 1
    return s, t, mask.to(DEVICE), weights, upstream


def _kwargs(cfg, weights):
    kw = {k: v for k, v in cfg.items() if k != "class_weights"}
    if cfg.get("class_weights"):
        kw["class_weights"] = weights
    return kw


# --------------------------------------------------------------------------- oracle check
def test_pairwise_oracle_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 37, generator=g, dtype=torch.float64) * 5
    w = torch.rand(4, 37, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_wmse_pairwise(e, w), _wmse_closed(e, w))


# --------------------------------------------------------------------------- values and grads
@needs_kernel
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_oracle(shape, dtype, config):
    cfg = CONFIGS[config]
    s, t, mask, weights, upstream = _make(
        shape,
        dtype,
        seed=zlib.crc32(repr((shape, config)).encode()),
        cw=bool(cfg.get("class_weights")),
    )
    kw = _kwargs(cfg, weights)
    loss_tol, grad_tol = TOL[dtype]

    out = ops.fused_divergence(s, t, row_mask=mask, **kw)
    assert out.shape == (shape[0],) and out.dtype == torch.float32
    gs, gt = torch.autograd.grad((out * upstream).sum(), (s, t))
    assert gs.dtype == dtype and gt.dtype == dtype

    wmse = _wmse_pairwise if shape[1] <= 1001 else _wmse_closed
    ref = oracle(s, t, mask=mask, wmse=wmse, **kw)
    rs, rt = torch.autograd.grad((ref * upstream.double()).sum(), (s, t))
    # a small divergence is a difference of O(1) float32 terms: allow their rounding too
    _close(out, ref, loss_tol, "loss", atol=LOSS_ATOL)
    _close(gs, rs, grad_tol, "grad input")
    _close(gt, rt, grad_tol, "grad target")
    # masked rows: exactly zero loss and gradient
    assert torch.all(out[~mask] == 0)
    assert torch.all(gs[~mask] == 0) and torch.all(gt[~mask] == 0)


@needs_kernel
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dispatch_matches_torch_path(config, reduction):
    """impl='triton' through dkl's losses == impl='torch', per reduction, with a row mask."""
    cfg = dict(CONFIGS[config])
    s, t, mask, weights, upstream = _make(
        (17, 4099), torch.float32, seed=7, cw=bool(cfg.get("class_weights"))
    )
    kind = cfg.pop("kind")
    kw = _kwargs(cfg, weights)
    fn = LOSSES[kind]
    grad_out = upstream if reduction == "none" else torch.tensor(1.7)
    results = []
    for impl in ("triton", "torch"):
        loss = fn(s, t, reduction=reduction, mask=mask, impl=impl, **kw)
        grads = torch.autograd.grad((loss * grad_out).sum(), (s, t))
        results.append((loss, *grads))
    for a, b, what in zip(results[0], results[1], ("loss", "grad input", "grad target")):
        _close(a, b, 2e-5, what)


@needs_kernel
@pytest.mark.parametrize("config", ["dkl", "ikl_t2", "ikl_gi"])
def test_target_without_grad(config):
    cfg = CONFIGS[config]
    s, t, mask, weights, upstream = _make(
        (3, 1001), torch.bfloat16, seed=3, target_grad=False, cw=bool(cfg.get("class_weights"))
    )
    kw = _kwargs(cfg, weights)
    out = ops.fused_divergence(s, t, row_mask=mask, **kw)
    (out * upstream).sum().backward()
    assert t.grad is None
    ref = oracle(s, t, mask=mask, **kw)
    (rs,) = torch.autograd.grad((ref * upstream.double()).sum(), (s,))
    _close(s.grad, rs, TOL[torch.bfloat16][1], "grad input")


@needs_kernel
def test_theorem1_dkl_gradients_equal_kl():
    s, t, _, _, upstream = _make((3, 1001), torch.float32, seed=11)
    g_dkl = torch.autograd.grad(
        (ops.fused_divergence(s, t, kind="dkl", temperature=2.5) * upstream).sum(), (s, t)
    )
    g_kl = torch.autograd.grad(
        (ops.fused_divergence(s, t, kind="kl", temperature=2.5) * upstream).sum(), (s, t)
    )
    for a, b in zip(g_dkl, g_kl):
        _close(a, b, 1e-5, "Theorem 1")


@needs_kernel
@pytest.mark.parametrize("config", ["kl", "ikl", "ikl_gi"])
def test_small_blocks_and_large_offsets(config):
    """Many online merges (16-wide blocks, short tail) and logits far from 0, where the naive
    E[w e²] - E[w e]² would cancel: the centred running moments must keep fp32 accuracy."""
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, 1001, generator=g) * 4 + 1000.0
    s = (t - 300.0 + torch.randn(3, 1001, generator=g) * 0.5).requires_grad_(True)
    t = t.to(DEVICE).requires_grad_(True)
    s = s.detach().to(DEVICE).requires_grad_(True)
    weights = torch.rand(3, 1001, generator=g).to(DEVICE) if cfg.get("class_weights") else None
    kw = _kwargs(cfg, weights)
    out = ops.fused_divergence(s, t, _block=16, **kw)
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    ref = oracle(s, t, **kw)
    rs, rt = torch.autograd.grad(ref.sum(), (s, t))
    _close(out, ref, 1e-4, "loss")
    _close(gs, rs, 1e-4, "grad input")
    _close(gt, rt, 1e-4, "grad target")


@needs_kernel
def test_class_weighted_gaps_keep_float32_precision_at_different_levels():
    """IKL with class weights (GI), teacher logits 1,000 above the student's by a different
    amount in each row: the wMSE's gaps are taken around the row's first gap, not as z_t - z_s
    (which keeps only ulp(1000) = 6e-5 of each), so the gradients stay within float32's
    precision of the float64 oracle."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(8, 300, generator=g) * 3
    t = s + torch.randn(8, 300, generator=g) + 1000.0 * torch.rand(8, 1, generator=g)
    weights = torch.rand(8, 300, generator=g).to(DEVICE)
    s, t = s.to(DEVICE).requires_grad_(True), t.to(DEVICE).requires_grad_(True)
    kw = {"kind": "ikl", "alpha": 1.0, "beta": 4.0, "temperature": 1.0, "class_weights": weights}
    got = torch.autograd.grad(ops.fused_divergence(s, t, _block=64, **kw).sum(), (s, t))
    want = torch.autograd.grad(oracle(s, t, **kw).sum(), (s, t))
    for a, b, what in zip(got, want, ("grad input", "grad target")):
        _close(a, b, 1e-6, what)


@needs_kernel
@pytest.mark.parametrize("side", ["target", "both"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_masked_leading_classes_round_no_other(config, side):
    """Classes masked with a finite -1e9 (``masked_fill``'s usual value) in the first columns, at
    T = 1, 3 and 20: the kernel's reference column is the first block's largest target, so no
    other class's gap is rounded to ulp(1e9) = 64 (taken from the first column, IKL rows were
    off by 1e4 and DKL rows by 2e3)."""
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(21)
    s = torch.randn(4, 100, generator=g) * 2
    t = torch.randn(4, 100, generator=g) * 2 + 0.5
    t[:, :3] = -1e9
    if side == "both":
        s[:, :3] = -1e9
    weights = None
    if cfg.get("class_weights"):  # 0 where only the teacher masks, as in a prior from it
        w = torch.rand(4, 100, generator=g) + 0.05
        weights = torch.where((t > -1e8) | (s < -1e8), w, 0.0).to(DEVICE)
    for temperature in (1.0, 3.0, 20.0):
        kw = {**_kwargs(cfg, weights), "temperature": temperature}
        if cfg["kind"] == "ikl" and "class_weights" not in kw:
            kw["weight_temperature"] = temperature
        si = s.to(DEVICE).requires_grad_(True)
        ti = t.to(DEVICE).requires_grad_(True)
        out = ops.fused_divergence(si, ti, _block=16, **kw)
        got = torch.autograd.grad(out.sum(), (si, ti))
        ref = oracle(si, ti, **kw)
        want = torch.autograd.grad(ref.sum(), (si, ti))
        _close(out, ref, 2e-6, f"loss at T={temperature}", atol=LOSS_ATOL)
        for a, b, what in zip(got, want, ("grad input", "grad target")):
            _close(a, b, 2e-6, f"{what} at T={temperature}", atol=1e-8)


@needs_kernel
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("ce", [False, True])
def test_many_blocks_large_offsets_and_the_hard_ce_against_the_oracle(config, ce):
    """Every configuration through many blocks with logits far from 0, a ``-inf`` target class
    and a ``-inf`` input logit on a kept class (that row: +inf, finite gradients), in the
    autograd form and in the LLM path's one launch with the hard-label CE."""
    from dkl.ops.divergence import loss_and_grad_one_launch

    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(11)
    t = torch.randn(3, 200, generator=g) * 4 + 600.0
    s = t - 200.0 + torch.randn(3, 200, generator=g) * 0.5
    t[2, 7] = -math.inf  # a ruled-out class, and
    s[2, 9] = -math.inf  # a kept one the input rules out: row 2's loss is +inf, its gradient finite
    weights = torch.rand(3, 200, generator=g).to(DEVICE) if cfg.get("class_weights") else None
    kw = _kwargs(cfg, weights)
    s, t = s.to(DEVICE).requires_grad_(True), t.to(DEVICE)
    labels = torch.tensor([3, 150, 199], device=DEVICE)
    ref = oracle(
        s[:2], t[:2], **{**kw, "class_weights": weights[:2] if weights is not None else None}
    )
    if ce:
        ref = ref + 0.4 * F.cross_entropy(s[:2].double(), labels[:2], reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), s)
    if ce:
        loss, grad, _, _ = loss_and_grad_one_launch(
            s.detach(), t, labels=labels, ce_weight=0.4, _block=64, **kw
        )
    else:
        loss = ops.fused_divergence(s, t, _block=64, **kw)
        (grad,) = torch.autograd.grad(loss[:2].sum(), s)
    assert torch.isposinf(loss[2]) and torch.isfinite(grad).all()
    # logits near 600 are rounded to 3e-5 in float32 (their u = z / T to half that): the
    # probabilities, and so the gradients, carry that much absolute error on any float32 path
    _close(loss[:2], ref, 1e-4, "loss")
    _close(grad[:2], ref_grad[:2], 1e-4, "grad input", atol=5e-6)


@needs_kernel
def test_all_rows_masked_and_zero_class_weights():
    s, t, _, _, _ = _make((3, 1001), torch.float32, seed=2)
    out = ops.fused_divergence(
        s, t, kind="ikl", row_mask=torch.zeros(3, dtype=torch.bool, device=DEVICE)
    )
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    assert torch.all(out == 0) and torch.all(gs == 0) and torch.all(gt == 0)
    # W = 0: the wMSE is 0 and only the sCE remains
    zeros = torch.zeros(3, 1001, device=DEVICE)
    out = ops.fused_divergence(s, t, kind="ikl", beta=3.0, class_weights=zeros, temperature=2.0)
    ref = oracle(s, t, kind="ikl", beta=3.0, class_weights=zeros, temperature=2.0)
    _close(out, ref, 1e-5, "loss with W = 0")


@needs_kernel
def test_strided_inputs_and_double_backward():
    g = torch.Generator().manual_seed(4)
    big = (torch.randn(6, 2100, generator=g) * 3).to(DEVICE).requires_grad_(True)
    s_view = big[::2, 50:1051]  # row stride 4200, unit column stride: read in place
    t_cols = (torch.randn(1001, 3, generator=g) * 3).to(DEVICE).t()  # column stride 3: copied
    kw = {"kind": "ikl", "beta": 2.0, "temperature": 3.0, "weight_temperature": 1.0}
    out = ops.fused_divergence(s_view, t_cols, **kw)
    g1 = torch.autograd.grad(out.sum(), big, retain_graph=True)[0]
    g2 = torch.autograd.grad(out.sum(), big)[0]  # the graph can be walked twice
    s = big.detach()[::2, 50:1051].clone().requires_grad_(True)
    ref = oracle(s, t_cols, **kw)
    (rs,) = torch.autograd.grad(ref.sum(), s)
    _close(out, ref, 1e-5, "loss")
    _close(g1[::2, 50:1051], rs, 1e-5, "grad input")
    outside = torch.ones_like(g1, dtype=torch.bool)
    outside[::2, 50:1051] = False
    assert torch.all(g1[outside] == 0)  # nothing outside the view
    assert torch.equal(g1, g2)


@needs_kernel
def test_loss_and_grad_in_one_launch():
    s, t, mask, weights, upstream = _make((17, 4099), torch.bfloat16, seed=9, cw=True)
    kw = _kwargs(CONFIGS["ikl_gi"], weights)
    loss, gs, gt = ops.divergence_loss_and_grad(
        s, t, row_mask=mask, grad_scale=upstream, grad_target=True, **kw
    )
    ref = oracle(s, t, mask=mask, **kw)
    rs, rt = torch.autograd.grad((ref * upstream.double()).sum(), (s, t))
    _close(loss, ref, 2e-5, "loss")
    _close(gs, rs, TOL[torch.bfloat16][1], "grad input")
    _close(gt, rt, TOL[torch.bfloat16][1], "grad target")
    _, _, none = ops.divergence_loss_and_grad(s, t, **kw)
    assert none is None


@needs_kernel
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_fused_linear_kernel_path_matches_torch_path(ce_weight):
    """dkl.llm.fused_linear_ikl with the kernel per chunk == with the torch path per chunk."""
    from dkl.llm import fused_linear_ikl

    g = torch.Generator().manual_seed(12)
    N, H, V = 21, 16, 300
    labels = torch.randint(0, V, (N,), generator=g)
    labels[5:13] = -100  # with chunk 8: one chunk fully ignored, others partly
    base = {
        "hs": torch.randn(N, H, generator=g),
        "ws": torch.randn(V, H, generator=g) * 0.5,
        "bs": torch.randn(V, generator=g),
        "ht": torch.randn(N, H + 4, generator=g),
        "wt": torch.randn(V + 9, H + 4, generator=g) * 0.5,
    }
    results = []
    for impl in ("triton", "torch"):
        p = {k: v.to(DEVICE).requires_grad_(k in ("hs", "ws", "bs")) for k, v in base.items()}
        loss = fused_linear_ikl(
            p["hs"],
            p["ws"],
            p["ht"],
            p["wt"],
            student_bias=p["bs"],
            labels=labels.to(DEVICE),
            ce_weight=ce_weight,
            chunk_size=8,
            impl=impl,
            **{k: v for k, v in CONFIGS["ikl_t2"].items() if k != "kind"},
        )
        (loss * 0.7).backward()
        results.append((loss, p["hs"].grad, p["ws"].grad, p["bs"].grad))
    for a, b, what in zip(*results, ("loss", "grad hidden", "grad weight", "grad bias")):
        _close(a, b, 1e-5, what)


# --------------------------------------------------------------------------- dispatch, errors
def test_auto_picks_torch_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the fused kernel must not run for impl='auto' on CPU")

    monkeypatch.setattr(ops, "fused_divergence", boom)
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    for fn in LOSSES.values():
        fn(s, t, impl="auto").backward()
    if KERNEL_HERE:  # the guard above really intercepts the kernel (on the kernel's device)
        with pytest.raises(AssertionError, match="must not run"):
            dkl.ikl_loss(s.to(DEVICE), t.to(DEVICE), impl="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_impl_without_device_raises_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ops.triton_available()
    assert "CUDA" in ops.triton_unavailable_reason()
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    for fn in LOSSES.values():
        with pytest.raises(RuntimeError, match="impl='triton' cannot run.*CUDA"):
            fn(s, t, impl="triton")
    with pytest.raises(RuntimeError, match="fused kernel cannot run.*CUDA"):
        ops.fused_divergence(s, t, kind="kl")


@needs_kernel
def test_bad_inputs_raise_clearly():
    s, t = torch.randn(4, 10, device=DEVICE), torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="kind in"):
        ops.fused_divergence(s, t, kind="js")
    with pytest.raises(ValueError, match=r"shape \(B, C\) = \(4, 10\) like input, got \(4, 9\)"):
        ops.fused_divergence(s, t[:, :9], kind="kl")
    with pytest.raises(ValueError, match="at least 2 classes"):
        ops.fused_divergence(s[:, :1], t[:, :1], kind="kl")
    with pytest.raises(RuntimeError, match="float32, bfloat16 and float16.*float64"):
        ops.fused_divergence(s.double(), t.double(), kind="kl")
    with pytest.raises(ValueError, match="class_weights apply to kind='ikl'"):
        ops.fused_divergence(s, t, kind="dkl", class_weights=torch.ones_like(s))
    with pytest.raises(TypeError, match=r"row_mask to be a bool tensor of shape \(B,\)"):
        ops.fused_divergence(s, t, kind="kl", row_mask=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="temperature > 0"):
        ops.fused_divergence(s, t, kind="kl", temperature=0.0)
    with pytest.raises(ValueError, match=r"grad_scale of shape \(B,\) = \(4,\)"):
        ops.divergence_loss_and_grad(s, t, kind="kl", grad_scale=torch.ones(3, device=DEVICE))


# --------------------------------------------------------------------------- benchmark smoke
@needs_kernel
def test_benchmark_smoke(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("kernel_speed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_speed"] = module
    try:
        spec.loader.exec_module(module)
        module.main(["--smoke"])
    finally:
        sys.modules.pop("kernel_speed", None)
    out = capsys.readouterr().out
    assert "| method |" in out and "fused kernel" in out


# --------------------------------------------------------------------------- GPU compilation
def _gpu_compiler_reason() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (no NVIDIA backend on this platform)
        return f"triton's NVIDIA backend is not here ({type(exc).__name__})"
    return None


@pytest.mark.skipif(_gpu_compiler_reason() is not None, reason=str(_gpu_compiler_reason()))
def test_every_launch_compiles_for_hopper_and_ampere(tmp_path):
    """The interpreter runs Python; the GPU compiler types every value. Each launch dkl makes,
    lowered to a cubin for sm_90 and sm_80 with Triton's own ptxas (no GPU needed), catches a
    kernel only the interpreter accepts. A fresh cache directory makes it compile, not look up."""
    from dkl.ops._aot import launches

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "dkl.ops._aot", "--arch", "90", "80"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rows) == 2 * len(launches()) and all("cubin" in row for row in rows), proc.stdout


@pytest.mark.skipif(_gpu_compiler_reason() is not None, reason=str(_gpu_compiler_reason()))
def test_instruction_count_table(tmp_path):
    """benchmarks/kernel_sass.py disassembles the compiled launches and counts per element."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"
    proc = subprocess.run(
        [sys.executable, str(script)], check=False, capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ikl")]
    assert rows, proc.stdout
    for cells in rows:  # every loop reads its inputs and runs the exponentials
        counts = [float(c) for c in cells[3:]]
        assert counts[0] > counts[1] > 0 and counts[2] >= 2 and counts[5] > 0, cells


def test_compiling_inside_the_interpreter_is_refused_in_one_line():
    from dkl.ops._aot import compile_kernel, constexprs_for

    with pytest.raises(ValueError, match="logits dtype"):
        compile_kernel(constexprs_for("ikl", "forward"), dtype=torch.float64)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=0 python -m dkl.ops._aot"):
            compile_kernel(constexprs_for("ikl", "forward"))
    else:
        with pytest.raises(ValueError, match=r"missing \['BLOCK'\]"):
            compile_kernel(
                {k: v for k, v in constexprs_for("ikl", "forward").items() if k != "BLOCK"}
            )


@needs_kernel
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_launch_adds_the_hard_ce_and_can_overwrite_its_input(temperature):
    """The LLM path's launch: divergence + ``ce_weight`` · hard-label CE per row and the gradient
    of ``sum(scale · rows)``, written over the input logits, against float64 autograd."""
    from dkl.ops.divergence import loss_and_grad_one_launch

    gen = torch.Generator().manual_seed(5)
    s = (torch.randn(6, 41, generator=gen) * 3).to(DEVICE)
    t = (torch.randn(6, 41, generator=gen) * 3).to(DEVICE)
    y = torch.randint(0, 41, (6,), generator=gen).to(DEVICE)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    scale = torch.rand(6, generator=gen).to(DEVICE) + 0.5
    sd = s.double().requires_grad_(True)
    p, log_q = F.softmax(t.double() / temperature, 1), F.log_softmax(sd / temperature, 1)
    kl = (p * (p.log() - log_q)).sum(1)
    ce = F.cross_entropy(sd, y, reduction="none")
    rows = torch.where(mask, kl + 0.3 * ce, 0.0)
    (want_grad,) = torch.autograd.grad((rows * scale.double()).sum(), sd)
    buf = s.clone()
    loss, grad, _, ce_rows = loss_and_grad_one_launch(
        buf,
        t,
        kind="kl",
        temperature=temperature,
        row_mask=mask,
        grad_scale=scale,
        labels=y,
        ce_weight=0.3,
        overwrite_input=True,
    )
    assert grad.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(loss.double(), rows.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_rows[mask].double(), ce[mask].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"integer labels of shape \(B,\) = \(6,\)"):
        loss_and_grad_one_launch(s, t, kind="kl", labels=y.float(), ce_weight=0.3)
    with pytest.raises(ValueError, match="overwrite_input needs input logits with contiguous"):
        loss_and_grad_one_launch(s.t().contiguous().t(), t, kind="kl", overwrite_input=True)


@needs_kernel
def test_kl_with_huge_logits_keeps_float32_accuracy():
    """Teacher logits of ±30,000 put nearly all of p on one class; the KL around each row's first
    entry cancelled against the log-sum-exps (2.6 % off a KL of 0.02). Around the running
    maxima it keeps float32's accuracy; the oracle is float64."""
    s = torch.tensor([[-1.2, 0.7], [0.3, -0.4]], device=DEVICE)
    t = torch.tensor([[-31000.0, 28000.0], [25000.0, -20000.0]], device=DEVICE)
    got = ops.fused_divergence(s, t, kind="kl")
    want = oracle(s, t, kind="kl")
    _close(got, want, 1e-5, "KL at huge logits", atol=1e-6)


@needs_kernel
def test_a_target_made_under_inference_mode():
    """The kernel's autograd function saves its inputs for backward: an inference tensor (a
    teacher run under ``torch.inference_mode()``) is copied, not refused."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 50, generator=g) * 2).to(DEVICE).requires_grad_()
    with torch.inference_mode():
        t = (torch.randn(3, 50, generator=g) * 2).to(DEVICE)
    kw = CONFIGS["ikl"]
    got = torch.autograd.grad(ops.fused_divergence(s, t, **kw).sum(), s)[0]
    want = torch.autograd.grad(oracle(s, t.clone(), **kw).sum(), s)[0]
    _close(got, want, 1e-5, "grad input")
