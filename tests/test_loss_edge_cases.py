"""Non-finite logits, empty batches and bad arguments, for the torch losses and the fused kernel.

The oracle computes each row in float64 on its finite target classes alone (the target softmax and
the pairwise wMSE see only them; the student's softmax keeps all C classes), which is what a
``-inf`` target logit means. ``F.kl_div`` is the second, independent reference for KL.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dkl
from dkl import DKLLoss, GKLLoss, IKLLoss, KLLoss, dkl_loss, gkl_loss, ikl_loss, kl_loss

INF = float("inf")
LOSSES = {"kl": kl_loss, "dkl": dkl_loss, "ikl": ikl_loss, "gkl": gkl_loss}
CONFIGS = {
    "kl": ("kl", {"temperature": 2.0}),
    "dkl": ("dkl", {"alpha": 1.5, "beta": 0.7, "temperature": 3.0}),
    "ikl": ("ikl", {"alpha": 1.0, "beta": 4.0, "temperature": 4.0, "weight_temperature": 4.0}),
    "ikl_t2": ("ikl", {"alpha": 2.0, "beta": 0.5, "temperature": 4.0, "weight_temperature": 1.5}),
    "ikl_gi": ("ikl", {"alpha": 1.0, "beta": 2.0, "temperature": 1.0, "class_weights": True}),
}


# --------------------------------------------------------------------------- the oracle
def pairwise_wmse(e, w):
    """¼ Σ_jk w_j w_k (e_j - e_k)² of one row."""
    d = e[:, None] - e[None, :]
    return 0.25 * (w[:, None] * w[None, :] * d**2).sum()


def finite_class_oracle(
    zs,
    zt,
    kind,
    *,
    alpha=1.0,
    beta=1.0,
    temperature=1.0,
    weight_temperature=1.0,
    class_weights=None,
):
    """Per-row loss, each row restricted to the classes where its target logit is finite."""
    T = temperature
    rows = []
    for i in range(zs.shape[0]):
        keep = torch.isfinite(zt[i]).nonzero().squeeze(1)
        s, t = zs[i].double(), zt[i].double()[keep]
        log_q = F.log_softmax(s / T, dim=0)[keep]
        log_p = F.log_softmax(t / T, dim=0)
        p = log_p.exp()
        if kind == "kl":
            rows.append((p * (log_p - log_q)).sum())
            continue
        sce = -(p.detach() * log_q).sum()
        if kind == "dkl":
            w, e = p.detach(), t / T - s[keep].detach() / T
        else:
            if class_weights is not None:
                w = class_weights[i].double()[keep]
            else:
                w = F.softmax(t.detach() / weight_temperature, dim=0)
            e = t - s[keep]
        rows.append(beta * pairwise_wmse(e, w) + alpha * sce)
    return torch.stack(rows)


def ruled_out_logits(dtype=torch.float64, C=9, seed=0):
    """(4, C) logits; the target rules out: row 0 its first class (the student too), row 1 every
    other class, row 2 nothing, row 3 all but two classes."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(4, C, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(4, C, generator=g, dtype=torch.float64) * 3 + 0.5
    zt[0, 0] = zs[0, 0] = -INF
    zt[1, ::2] = -INF
    zt[3, 2:] = -INF
    cw = torch.rand(4, C, generator=g, dtype=torch.float64) * 2
    return zs.to(dtype).requires_grad_(), zt.to(dtype).requires_grad_(), cw.to(dtype)


def _split(config, cw):
    kind, kw = CONFIGS[config]
    kw = dict(kw)
    if kw.pop("class_weights", False):
        kw["class_weights"] = cw
    return kind, kw


def _reduce_ref(per_row, reduction):
    return {"none": per_row, "mean": per_row.mean(), "sum": per_row.sum()}[reduction]


def _grads(out, *xs, upstream=None):
    if upstream is not None:
        out = out * upstream
    return torch.autograd.grad(out.sum(), xs)


def assert_close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- -inf targets
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_neg_inf_target_classes_drop_out(config, reduction):
    zs, zt, cw = ruled_out_logits()
    kind, kw = _split(config, cw)
    got = LOSSES[kind](zs, zt, reduction=reduction, impl="torch", **kw)
    want = _reduce_ref(finite_class_oracle(zs, zt, kind, **kw), reduction)
    assert torch.isfinite(got).all()
    assert_close64(got, want)
    upstream = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)
    up = upstream if reduction == "none" else None
    g_got, g_want = _grads(got, zs, zt, upstream=up), _grads(want, zs, zt, upstream=up)
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        assert_close64(a, b)
    assert torch.all(g_got[1][torch.isneginf(zt)] == 0)  # ruled-out target classes: no gradient


def test_kl_with_neg_inf_target_equals_torch_kl_div():
    zs, zt, _ = ruled_out_logits()
    zs = zs.detach().clone()
    zs[0, 0] = 1.0  # F.kl_div gives NaN where both sides are -inf (it computes 0 * -inf)
    zs.requires_grad_()
    T = 2.0
    got = kl_loss(zs, zt, temperature=T, reduction="sum")
    want = F.kl_div(F.log_softmax(zs / T, 1), F.softmax(zt / T, 1), reduction="sum")
    assert_close64(got, want)
    assert_close64(_grads(got, zs)[0], _grads(want, zs)[0])


def test_theorem1_holds_with_ruled_out_classes():
    zs, zt, _ = ruled_out_logits()
    g_dkl = _grads(dkl_loss(zs, zt, temperature=3.0), zs, zt)
    g_kl = _grads(kl_loss(zs, zt, temperature=3.0), zs, zt)
    for a, b in zip(g_dkl, g_kl):
        assert_close64(a, b)


def test_soft_cross_entropy_skips_zero_probability_classes():
    zs = torch.tensor([[-INF, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.0, 0.25, 0.75]], dtype=torch.float64)
    got = dkl.soft_cross_entropy(zs, p)
    log_q = torch.log_softmax(zs.detach()[:, 1:], dim=1)  # q over the two finite classes
    assert_close64(got, -(p[:, 1:] * log_q).sum(1))
    assert torch.isfinite(_grads(got, zs)[0]).all()


# --------------------------------------------------------------------------- the other rules
@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl", "ikl_gi", "gkl", "wmse"])
def test_student_neg_inf_on_kept_class_gives_inf(loss):
    zs, zt, cw = ruled_out_logits()
    zs = zs.detach().clone()
    zs[2, 4] = -INF  # row 2 keeps every class
    cw[2, 4] = 0.0  # even where that class has no weight
    fns = {
        "kl": lambda: kl_loss(zs, zt, reduction="none"),
        "dkl": lambda: dkl_loss(zs, zt, reduction="none"),
        "ikl": lambda: ikl_loss(zs, zt, reduction="none"),
        "ikl_gi": lambda: ikl_loss(zs, zt, class_weights=cw, reduction="none"),
        "gkl": lambda: gkl_loss(zs, zt, class_weights=cw, reduction="none"),
        "wmse": lambda: dkl.weighted_mse(zt, zs, cw),
    }
    out = fns[loss]()
    assert out[2].item() == INF
    assert torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_all_neg_inf_target_row_is_nan_unless_masked(loss):
    zs, zt, _ = ruled_out_logits()
    zt = zt.detach().clone()
    zt[1] = -INF
    zt.requires_grad_()
    fn = LOSSES[loss]
    per_row = fn(zs, zt, reduction="none")
    assert torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2, 3]]).all()

    mask = torch.tensor([True, False, True, True])
    got = fn(zs, zt, mask=mask)
    gs, gt = _grads(got, zs, zt)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[1] == 0) and torch.all(gt[1] == 0)
    # the masked row is absent: same as the batch without it
    keep = mask.nonzero().squeeze(1)
    zs_k, zt_k = zs.detach()[keep].requires_grad_(), zt.detach()[keep].requires_grad_()
    want = fn(zs_k, zt_k)
    assert_close64(got, want)
    for a, b in zip((gs[keep], gt[keep]), _grads(want, zs_k, zt_k)):
        assert_close64(a, b)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_masked_rows_are_never_read(loss):
    """NaN and +inf in rows outside the mask change nothing, not even the gradient."""
    zs, zt, _ = ruled_out_logits()
    mask = torch.tensor([True, True, False, True])
    clean = LOSSES[loss](zs, zt, mask=mask)
    g_clean = _grads(clean, zs, zt)
    zs2, zt2 = zs.detach().clone(), zt.detach().clone()
    zs2[2, 1], zt2[2, 3], zt2[2, 5] = float("nan"), INF, float("nan")
    zs2.requires_grad_(), zt2.requires_grad_()
    dirty = LOSSES[loss](zs2, zt2, mask=mask)
    assert_close64(dirty, clean)
    for a, b in zip(_grads(dirty, zs2, zt2), g_clean):
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["target", "input"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_nan_logits_give_nan_rows(loss, side):
    """Only the row that holds the NaN: also for GKL, whose normaliser sums over the batch."""
    zs, zt, _ = ruled_out_logits()
    zs, zt = zs.detach().clone(), zt.detach().clone()
    (zt if side == "target" else zs)[2, 3] = float("nan")
    out = LOSSES[loss](zs, zt, reduction="none")
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


# --------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_empty_batch_equals_all_false_mask(loss, reduction):
    fn = LOSSES[loss]
    zs = torch.randn(0, 5, requires_grad=True)
    zt = torch.randn(0, 5, requires_grad=True)
    empty = fn(zs, zt, reduction=reduction)
    ws, wt = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    masked = fn(ws, wt, reduction=reduction, mask=torch.zeros(3, dtype=torch.bool))
    if reduction == "none":
        assert empty.shape == (0,) and torch.all(masked == 0)
    else:
        assert empty.item() == 0.0 == masked.item()
    assert empty.requires_grad
    gs, gt = _grads(empty, zs, zt)
    assert gs.shape == (0, 5) and gt.shape == (0, 5)


def test_empty_batch_with_class_weights_and_modules():
    zs, zt, cw = torch.randn(0, 4), torch.randn(0, 4), torch.rand(0, 4)
    assert ikl_loss(zs, zt, class_weights=cw).item() == 0.0
    assert gkl_loss(zs, zt, class_weights=cw, gamma=0.5).item() == 0.0
    for module in (KLLoss(), DKLLoss(), IKLLoss(), GKLLoss()):
        assert module(zs, zt).item() == 0.0


# --------------------------------------------------------------------------- bad arguments
def _one_line_error(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), INF, -INF])
@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_non_finite_class_weights_raise(loss, bad):
    z = torch.zeros(3, 4)
    cw = torch.ones(3, 4)
    cw[1, 2] = bad
    _one_line_error(
        ValueError,
        "Expected finite class_weights, got NaN or inf",
        LOSSES[loss],
        z,
        z,
        class_weights=cw,
    )
    module = IKLLoss() if loss == "ikl" else GKLLoss()
    _one_line_error(ValueError, "Expected finite class_weights", module, z, z, cw)


BAD_SCALARS = [
    ("alpha", -1.0, r"Expected alpha >= 0, got -1.0"),
    ("beta", -0.5, r"Expected beta >= 0, got -0.5"),
    ("alpha", float("nan"), r"Expected alpha >= 0, got nan"),
    ("beta", INF, r"Expected a finite beta >= 0, got inf"),
    ("temperature", -2.0, r"Expected temperature > 0, got -2.0"),
    ("temperature", INF, r"Expected a finite temperature > 0, got inf"),
    ("weight_temperature", 0.0, r"Expected weight_temperature > 0, got 0.0"),
    ("gamma", -0.3, r"Expected gamma >= 0, got -0.3"),
]
ACCEPTS = {
    "kl": {"temperature"},
    "dkl": {"alpha", "beta", "temperature"},
    "ikl": {"alpha", "beta", "temperature", "weight_temperature"},
    "gkl": {"alpha", "beta", "gamma", "temperature", "weight_temperature"},
}
MODULES = {"kl": KLLoss, "dkl": DKLLoss, "ikl": IKLLoss, "gkl": GKLLoss}


@pytest.mark.parametrize("name,value,match", BAD_SCALARS)
def test_bad_scalars_raise_in_functions_and_modules(name, value, match):
    """Negative α / β are refused: a negative β would reward the wMSE for growing and a negative
    α the student for moving away from the target, which no recipe wants."""
    z = torch.zeros(2, 3)
    for loss, accepted in ACCEPTS.items():
        if name not in accepted:
            continue
        _one_line_error(ValueError, match, LOSSES[loss], z, z, **{name: value})
        _one_line_error(ValueError, match, MODULES[loss], **{name: value})


def test_zero_alpha_beta_gamma_are_accepted():
    z = torch.randn(2, 3)
    assert torch.isfinite(ikl_loss(z, z, alpha=0.0, beta=0.0))
    assert torch.isfinite(gkl_loss(z, z, alpha=0.0, beta=0.0, gamma=0.0))


# --------------------------------------------------------------------------- the fused kernel
KERNEL_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Triton's interpreter runs the kernel in NumPy, which warns about the -inf - -inf that the kernel
# computes and then discards with tl.where (a GPU does the same silently).
quiet_interpreter = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)


def _kernel_or_skip():
    pytest.importorskip("triton")
    if not KERNEL_HERE:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (the root conftest.py sets it)")
    from dkl import ops

    return ops


def _kernel_logits(C=37, dtype=torch.float32):
    """On the kernel's device; with 16-wide blocks row 1 has whole blocks ruled out."""
    zs, zt, cw = ruled_out_logits(torch.float32, C=C, seed=3)
    zt = zt.detach().clone()
    zt[1, :20] = -INF  # a first block entirely -inf, then a partly ruled-out one
    return (
        zs.detach().to(DEVICE, dtype).requires_grad_(),
        zt.to(DEVICE, dtype).requires_grad_(),
        cw.to(DEVICE),
    )


def _close(actual, expected, rel, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + 1e-6, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


# (config, dtype): every config in float32, two in bfloat16 (its gradients are rounded on output)
KERNEL_CASES = [(c, torch.float32) for c in CONFIGS] + [
    ("kl", torch.bfloat16),
    ("ikl_gi", torch.bfloat16),
]
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3}


@quiet_interpreter
@pytest.mark.parametrize("config,dtype", KERNEL_CASES, ids=lambda v: str(v).split(".")[-1])
def test_kernel_neg_inf_targets_match_oracle(config, dtype):
    ops = _kernel_or_skip()
    zs, zt, cw = _kernel_logits(dtype=dtype)
    kind, kw = _split(config, cw)
    out = ops.fused_divergence(zs, zt, kind=kind, _block=16, **kw)
    upstream = torch.tensor([0.5, -1.0, 2.0, 1.5], device=DEVICE)
    gs, gt = _grads(out, zs, zt, upstream=upstream)
    ref = finite_class_oracle(zs, zt, kind, **kw)
    rs, rt = _grads(ref, zs, zt, upstream=upstream.double())
    _close(out, ref, 2e-5, "loss")  # the oracle sees the same rounded logits
    _close(gs, rs, GRAD_TOL[dtype], "grad input")
    _close(gt, rt, GRAD_TOL[dtype], "grad target")
    assert torch.all(gt[torch.isneginf(zt)] == 0)


@quiet_interpreter
def test_kernel_follows_the_row_rules():
    ops = _kernel_or_skip()
    zs, zt, cw = _kernel_logits()
    zs, zt = zs.detach().clone(), zt.detach().clone()
    zs[2, 30] = -INF  # kept class: +inf
    zt[3] = -INF  # no target: NaN
    for kind, kw in (
        ("kl", {}),
        ("dkl", {}),
        ("ikl", {"weight_temperature": 2.0}),
        ("ikl", {"class_weights": cw}),
    ):
        out = ops.fused_divergence(zs, zt, kind=kind, _block=16, **kw)
        want = LOSSES[kind](zs, zt, reduction="none", impl="torch", **kw)
        assert out[2].item() == INF and torch.isnan(out[3]), (kind, out)
        _close(out[:2], want[:2], 2e-5, kind)
    # rows outside the mask are not read: garbage there gives 0 loss and 0 gradient
    zs[3, 0] = float("nan")
    zs.requires_grad_(), zt.requires_grad_()
    mask = torch.tensor([True, True, False, False], device=DEVICE)
    out = ops.fused_divergence(zs, zt, kind="ikl", row_mask=mask, _block=16)
    gs, gt = _grads(out, zs, zt)
    assert torch.all(out[2:] == 0) and torch.all(gs[2:] == 0) and torch.all(gt[2:] == 0)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kernel_empty_batch_equals_all_false_mask(reduction):
    _kernel_or_skip()
    zs = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    zt = torch.randn(0, 7, device=DEVICE)
    for fn in (kl_loss, dkl_loss, ikl_loss):
        empty = fn(zs, zt, reduction=reduction, impl="triton")
        masked = fn(
            torch.randn(2, 7, device=DEVICE),
            torch.randn(2, 7, device=DEVICE),
            reduction=reduction,
            mask=torch.zeros(2, dtype=torch.bool, device=DEVICE),
            impl="triton",
        )
        if reduction == "none":
            assert empty.shape == (0,) and torch.all(masked == 0)
        else:
            assert empty.item() == 0.0 == masked.item()
        (g,) = _grads(empty, zs)
        assert g.shape == (0, 7)


def test_kernel_refuses_bad_scalars_and_weights():
    ops = _kernel_or_skip()
    z = torch.zeros(2, 5, device=DEVICE)
    _one_line_error(
        ValueError, r"Expected alpha >= 0", ops.fused_divergence, z, z, kind="ikl", alpha=-1.0
    )
    _one_line_error(
        ValueError, r"Expected beta >= 0", ops.divergence_loss_and_grad, z, z, kind="dkl", beta=-2.0
    )
    cw = torch.ones(2, 5, device=DEVICE)
    cw[0, 0] = float("nan")
    _one_line_error(
        ValueError,
        "Expected finite class_weights",
        ops.fused_divergence,
        z,
        z,
        kind="ikl",
        class_weights=cw,
    )
    # through the loss, dispatched to the kernel: the same check, once
    _one_line_error(
        ValueError, "Expected finite class_weights", ikl_loss, z, z, class_weights=cw, impl="triton"
    )


# --------------------------------------------------------------------------- hostile arguments
NUMBERS = {
    "kl": ("temperature",),
    "dkl": ("alpha", "beta", "temperature"),
    "ikl": ("alpha", "beta", "temperature", "weight_temperature"),
    "gkl": ("alpha", "beta", "gamma", "temperature", "weight_temperature"),
}
WRONG_TYPES = [
    ("4", r"got '4' \(str\)"),
    (None, r"got None \(NoneType\)"),
    (True, r"got True \(bool\)"),
    ([4.0], r"got \[4.0\] \(list\)"),
    (torch.tensor([4.0, 2.0]), r"got a tensor of shape \(2,\)"),
    (torch.tensor(4.0, requires_grad=True), r"got a tensor of shape \(\) that requires grad"),
]


@pytest.mark.parametrize("value,shown", WRONG_TYPES, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("loss", list(NUMBERS))
def test_hyperparameters_of_the_wrong_type_name_the_parameter(loss, value, shown):
    z = torch.zeros(2, 3)
    for name in NUMBERS[loss]:
        kind = "positive" if name.endswith("temperature") else "non-negative"
        match = rf"Expected {name} a {kind} finite number, {shown}"
        _one_line_error(TypeError, match, LOSSES[loss], z, z, **{name: value})
        _one_line_error(TypeError, match, MODULES[loss], **{name: value})
    _one_line_error(
        TypeError, r"Expected temperature a positive", dkl.soft_cross_entropy, z, z, value
    )


def test_number_like_hyperparameters_are_accepted():
    np = pytest.importorskip("numpy")
    zs, zt, _ = ruled_out_logits()
    want = ikl_loss(zs, zt, alpha=2.0, beta=3.0, temperature=4.0, reduction="none")
    for kw in (
        {"alpha": 2, "beta": np.float32(3.0), "temperature": np.float64(4.0)},
        {"alpha": np.int64(2), "beta": 3, "temperature": torch.tensor(4.0)},
        {"alpha": np.array(2), "beta": np.array(3.0), "temperature": 4},
    ):
        assert_close64(ikl_loss(zs, zt, reduction="none", **kw), want)
        module = IKLLoss(reduction="none", **kw)
        assert isinstance(module.temperature, float)
        assert_close64(module(zs, zt), want)


def test_numbers_numpy_arrays_and_huge_ints():
    np = pytest.importorskip("numpy")
    z = torch.zeros(2, 3)
    match = r"Expected beta a non-negative finite number, got array\(\[1., 2.\]\) \(ndarray\)"
    _one_line_error(TypeError, match, ikl_loss, z, z, beta=np.array([1.0, 2.0]))
    _one_line_error(
        TypeError,
        r"got array\(True\) \(ndarray of bool\)",
        kl_loss,
        z,
        z,
        temperature=np.array(True),
    )
    _one_line_error(
        ValueError, r"got an int too large for a float", kl_loss, z, z, temperature=10**400
    )


@pytest.mark.parametrize("bad", [None, 3, "avg"])
def test_reduction_and_impl_of_the_wrong_type(bad):
    z = torch.zeros(2, 3)
    for fn in LOSSES.values():
        _one_line_error(ValueError, r"Unknown reduction", fn, z, z, reduction=bad)
    _one_line_error(ValueError, r"Unknown impl", kl_loss, z, z, impl=bad)
    _one_line_error(ValueError, r"Unknown impl", IKLLoss, impl=bad)


@pytest.mark.parametrize("name", ["temperature", "weight_temperature"])
def test_temperatures_too_small_for_float32_are_refused(name):
    """1e-39 made 1/T overflow float32 (inf · 0 = NaN); the floor is the smallest normal."""
    z = torch.zeros(2, 3)
    match = rf"Expected {name} >= 1.18e-38 \(smaller values make 1/{name} overflow float32\)"
    for loss, accepted in NUMBERS.items():
        if name in accepted:
            _one_line_error(ValueError, match + ", got 1e-39", LOSSES[loss], z, z, **{name: 1e-39})
            _one_line_error(ValueError, match, MODULES[loss], **{name: 1e-39})


@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl"])
def test_small_temperatures_give_the_correctly_rounded_value(loss):
    """T = 1e-37 with logits up to ~40 overflows z / T in float32: the rows are recomputed with
    the row maximum taken out first, and equal the float64 value rounded to float32 (+inf where
    it exceeds float32, never NaN)."""
    g = torch.Generator().manual_seed(7)
    zs = (torch.randn(6, 5, generator=g) * 12).requires_grad_()
    zt = torch.randn(6, 5, generator=g) * 12
    zt[0] = zs.detach()[0] + 1.0  # same argmax: a finite value
    T = 1e-37
    got = LOSSES[loss](zs, zt, temperature=T, reduction="none")
    want = LOSSES[loss](zs.detach().double(), zt.double(), temperature=T, reduction="none")
    assert not torch.isnan(got).any()
    # (row 0's wMSE is rounding noise of the float32 logits, ~1e-14)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    got.sum().backward()  # the gradient exists (it is huge where the value is)


def test_class_weights_near_the_float32_limit():
    """Weights of 3e38 made every total overflow (NaN). GKL does not depend on the weights'
    scale and gives the finite value; IKL's wMSE grows with their square and gives the float64
    value rounded to float32."""
    zs, zt, cw = ruled_out_logits(torch.float32)
    huge = cw * 1.5e38
    got = gkl_loss(zs, zt, class_weights=huge, gamma=1.0, reduction="none")
    want = gkl_loss(zs, zt, class_weights=cw, gamma=1.0, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    tiny = cw * 1e-30  # W² underflows float32: the same value too
    torch.testing.assert_close(
        gkl_loss(zs, zt, class_weights=tiny, reduction="none"), want, rtol=1e-5, atol=1e-6
    )
    got = ikl_loss(zs, zt, class_weights=huge, reduction="none")
    want = ikl_loss(zs.double(), zt.double(), class_weights=huge.double(), reduction="none")
    assert not torch.isnan(got).any()
    assert torch.equal(got, want.float())  # +inf: above float32's range, as in float64


# --------------------------------------------------------------------------- mixed dtypes
PAIRS = [
    (torch.float32, torch.float64, torch.float64),
    (torch.float64, torch.float32, torch.float64),
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.float16, torch.float32),
]


@pytest.mark.parametrize("di,dt,want_dtype", PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("loss", list(LOSSES) + ["wmse", "sce"])
def test_mixed_float_dtypes_compute_in_the_wider(loss, di, dt, want_dtype):
    zs, zt, cw = ruled_out_logits()
    zs = zs.detach().to(di).requires_grad_()
    zt = zt.detach().to(dt).requires_grad_()
    p = F.softmax(zt.detach().float(), 1).to(dt)  # the sCE's constant target probabilities

    def fn(a, b):
        if loss == "wmse":
            return dkl.weighted_mse(b, a, cw)
        if loss == "sce":
            return dkl.soft_cross_entropy(a, p.to(b.dtype))
        return LOSSES[loss](a, b, reduction="none")

    got = fn(zs, zt)
    assert got.dtype == want_dtype
    ref = fn(zs.detach().to(want_dtype), zt.detach().to(want_dtype))
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    got[torch.isfinite(got)].sum().backward()
    assert zs.grad.dtype == di
    assert zt.grad is None or zt.grad.dtype == dt


def test_class_prior_refuses_bad_numbers():
    _one_line_error(
        ValueError,
        r"Expected a finite temperature > 0, got inf",
        dkl.ClassPrior,
        3,
        temperature=INF,
    )
    _one_line_error(
        TypeError,
        r"Expected temperature a positive finite number, got '2'",
        dkl.ClassPrior,
        3,
        temperature="2",
    )
    _one_line_error(
        ValueError, r"Expected temperature >= 1.18e-38", dkl.ClassPrior, 3, temperature=1e-39
    )
    _one_line_error(
        TypeError,
        r"Expected momentum a number in \(0, 1\], got None",
        dkl.ClassPrior,
        3,
        momentum=None,
    )
    _one_line_error(
        ValueError, r"Expected momentum in \(0, 1\], got 1.5", dkl.ClassPrior, 3, momentum=1.5
    )


@pytest.mark.parametrize("alpha,beta", [(1e-40, 8.0), (1e30, 1e-30), (0.0, 1e20), (1e-6, 0.0)])
@pytest.mark.parametrize("loss", ["dkl", "ikl", "ikl_gi", "gkl"])
def test_extreme_loss_weights_keep_float32_gradients_exact(loss, alpha, beta):
    """Constant factors are applied to the gradient in backward; an extreme α or β must not
    overflow what the forward stored (the float64 computation is the reference)."""
    zs, zt, cw = ruled_out_logits(torch.float32)
    zs = zs.detach().clone()
    zs[torch.isneginf(zs)] = 0.0
    zs.requires_grad_()
    zt = zt.detach().clone()
    zt[torch.isneginf(zt)] = 0.0
    kw = {"alpha": alpha, "beta": beta, "temperature": 4.0}
    if loss == "ikl_gi":
        kw["class_weights"] = cw
    fn = LOSSES[loss.split("_")[0]]
    (got,) = _grads(fn(zs, zt, **kw), zs)
    z64 = zs.detach().double().requires_grad_()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    (want,) = _grads(fn(z64, zt.double(), **kw64), z64)
    assert torch.isfinite(got).all()
    scale = want.abs().max().item()
    f32 = torch.finfo(torch.float32)
    ulp_of_subnormals = f32.tiny * f32.eps  # α = 1e-40 makes DKL's gradient ~1e-42
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale + ulp_of_subnormals


def test_float64_weights_that_do_not_fit_float32_logits_are_refused():
    z = torch.randn(2, 3)
    cw = torch.full((2, 3), 1e300, dtype=torch.float64)
    match = r"Expected class_weights that fit torch.float32 \(the logits' dtype\), got entries up to 1e\+300"
    _one_line_error(ValueError, match, ikl_loss, z, z, class_weights=cw)
    # (GKL does not depend on the weights' scale: it takes them, see below)
    _one_line_error(ValueError, r"Expected weights that fit", dkl.weighted_mse, z, z, cw)
    # weights that fit are cast, and the loss keeps the logits' dtype
    assert ikl_loss(z, z, class_weights=cw / 1e300).dtype == torch.float32


@pytest.mark.parametrize("loss", list(LOSSES))
def test_transposed_logits_and_meta_tensors(loss):
    """Non-contiguous logits give the contiguous result (also across blocks of rows); meta
    tensors give a meta loss (shape inference) with a backward; sparse logits are refused."""
    import dkl.losses._function as loss_function

    g = torch.Generator().manual_seed(8)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64).t().requires_grad_()
    b = torch.randn(7, 5, generator=g, dtype=torch.float64).t().requires_grad_()
    a2 = a.detach().contiguous().requires_grad_()
    b2 = b.detach().contiguous().requires_grad_()
    saved = loss_function.BLOCK_ELEMENTS
    try:
        loss_function.BLOCK_ELEMENTS = 10
        got = LOSSES[loss](a, b, reduction="none")
        g_got = _grads(got, a, b)
    finally:
        loss_function.BLOCK_ELEMENTS = saved
    want = LOSSES[loss](a2, b2, reduction="none")
    assert_close64(got, want)
    for x, y in zip(g_got, _grads(want, a2, b2)):
        assert_close64(x, y)
    meta = torch.empty(4, 6, device="meta", requires_grad=True)
    out = LOSSES[loss](meta, torch.empty(4, 6, device="meta"))
    assert out.device.type == "meta"
    out.backward()
    sparse = torch.randn(4, 6).to_sparse()
    _one_line_error(
        TypeError, r"Expected dense \(strided\) input logits", LOSSES[loss], sparse, sparse
    )


def test_soft_cross_entropy_refuses_negative_or_non_finite_probabilities():
    z = torch.zeros(2, 3)
    p = torch.full((2, 3), 1 / 3)
    p[1, 2] = -0.1
    _one_line_error(ValueError, r"Expected non-negative target_probs", dkl.soft_cross_entropy, z, p)
    p[1, 2] = float("nan")
    _one_line_error(ValueError, r"Expected finite target_probs", dkl.soft_cross_entropy, z, p)


@quiet_interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl"])
def test_nan_wins_over_a_ruled_out_kept_class(loss, impl):
    """A -inf input logit on a kept class makes a row +inf, unless the row is NaN anyway (a NaN
    or +inf logit elsewhere in it): NaN, on the torch path and in the kernel alike (the kernel
    gave +inf for all three rows)."""
    if impl == "triton":
        _kernel_or_skip()
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    zs[:, 2] = -INF
    zs[1, 4], zs[2, 5] = INF, float("nan")
    fn = {"kl": kl_loss, "dkl": dkl_loss, "ikl": ikl_loss}[loss]
    out = fn(zs.to(DEVICE), zt.to(DEVICE), reduction="none", impl=impl)
    assert out[0].item() == INF and torch.isnan(out[1:]).all(), out


@quiet_interpreter
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl"])
def test_an_input_row_of_neg_inf_is_nan(loss, impl):
    """Input logits all -inf are no distribution: NaN, as for a target row of -inf (the kernel
    gave +inf, by the rule for one ruled-out kept class)."""
    if impl == "triton":
        _kernel_or_skip()
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    zs[1] = -INF
    fn = {"kl": kl_loss, "dkl": dkl_loss, "ikl": ikl_loss}[loss]
    out = fn(zs.to(DEVICE), zt.to(DEVICE), reduction="none", impl=impl)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), out


def _hostile(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    if kind == "neg_inf_some":
        x[torch.rand(x.shape, generator=g) < 0.3] = -INF
    elif kind == "neg_inf_row":
        x[0] = -INF
    elif kind == "one_finite":
        x[0] = -INF
        x[0, x.shape[1] // 2] = 1.0
    elif kind == "nan":
        x[0, 0] = float("nan")
    elif kind == "pos_inf":
        x[0, -1] = INF
    return x


@quiet_interpreter
def test_kernel_and_torch_path_agree_on_hostile_rows():
    """Differential check over 60 seeded random cases: ``-inf`` here and there, whole ``-inf``
    rows, a single finite class, NaN and ``+inf`` logits, on either side, with masks and every
    loss and reduction: the kernel and the torch path give the same non-finite pattern, and the
    same finite values and gradients."""
    ops = _kernel_or_skip()
    del ops
    g = torch.Generator().manual_seed(2026)
    rng = __import__("random").Random(2026)
    patterns = ["none", "neg_inf_some", "neg_inf_row", "one_finite", "nan", "pos_inf"]
    for case in range(60):
        B, C = rng.choice([1, 3, 5]), rng.choice([2, 3, 17, 130])
        name = rng.choice(["kl", "dkl", "ikl", "ikl_t2", "ikl_gi"])
        T = rng.choice([1.0, 0.5, 4.0, 3.0])
        zs = _hostile(
            torch.randn(B, C, generator=g) * 3, rng.choice(patterns[:2] + patterns[4:]), g
        )
        zt = _hostile(torch.randn(B, C, generator=g) * 3, rng.choice(patterns), g)
        kw = {"reduction": rng.choice(["none", "sum"]), "temperature": T}
        if rng.random() < 0.3:
            kw["mask"] = torch.rand(B, generator=g) < 0.6
        if name == "kl":
            fn = kl_loss
        else:
            fn = dkl_loss if name == "dkl" else ikl_loss
            kw.update(alpha=rng.choice([0.0, 1.0, 2.5]), beta=rng.choice([0.0, 1.0, 8.0]))
        if name == "ikl_t2":
            kw["weight_temperature"] = 7.0
        if name == "ikl_gi":
            kw["class_weights"] = torch.rand(B, C, generator=g)
        got = {}
        for impl in ("torch", "triton"):
            s = zs.to(DEVICE).requires_grad_(True)
            t = zt.to(DEVICE).requires_grad_(True)
            kw_dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            out = fn(s, t, impl=impl, **kw_dev)
            grads = torch.autograd.grad(out.sum(), (s, t), allow_unused=True)
            got[impl] = (out.detach().double().cpu(), [gr.double().cpu() for gr in grads])
        (a, ga), (b, gb) = got["torch"], got["triton"]
        where = f"case {case}: {name} {B}x{C} {kw}"
        assert torch.equal(torch.isnan(a), torch.isnan(b)), where
        assert torch.equal(torch.isinf(a), torch.isinf(b)), where
        fin = torch.isfinite(a)
        torch.testing.assert_close(b[fin], a[fin], rtol=1e-4, atol=1e-5, msg=where)
        if torch.isfinite(a).all():  # gradients of a +inf or NaN loss mean nothing
            for x, y in zip(ga, gb):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=where)


# --------------------------------------------------------------------------- numeric extremes
def _pairwise_gkl64(zs, zt, cw, gamma, beta, T):
    """GKL in float64 from its definition: the batch's pairwise wMSE over Σ_i Σ_jk p_ij p_ik,
    p = w^γ, plus the mean soft-label CE."""
    zs, zt, p = zs.double(), zt.double(), cw.double().pow(gamma)
    pn = p[:, :, None] * p[:, None, :]
    d = (zt[:, :, None] - zt[:, None, :]) - (zs[:, :, None] - zs[:, None, :])
    wmse = 0.25 * (pn * d**2).sum() / pn.sum()
    sce = -(F.softmax(zt / T, 1) * F.log_softmax(zs / T, 1)).sum(1).mean()
    return beta * wmse + sce


@pytest.mark.parametrize("scale", [1e30, 1e-25, 1.0])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_gkl_does_not_depend_on_the_class_weights_scale(scale, gamma):
    """GKL's wMSE is normalised over the batch, so any common factor of the class weights drops
    out; float32 weights of 1e30 (whose square overflows) or 1e-25 (whose square underflows)
    give the float64 value of the unscaled ones."""
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(4, 6, generator=g) * 2, torch.randn(4, 6, generator=g) * 2
    cw = torch.rand(4, 6, generator=g) + 0.1
    got = gkl_loss(zs, zt, beta=2.0, gamma=gamma, temperature=2.0, class_weights=cw * scale)
    want = _pairwise_gkl64(zs, zt, cw, gamma, 2.0, 2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("scale", [1e-50, 1e300])
def test_gkl_float64_class_weights_beyond_float32_with_float32_logits(scale):
    """float64 weights of 1e-50 (or 1e300) with float32 logits: cast to float32 first they were
    all 0 and GKL silently dropped its wMSE (2.26 for 5.05); GKL does not depend on their
    scale, so they give the unscaled weights' float64 value."""
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g) * 2
    cw = torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.1
    got = gkl_loss(zs, zt, beta=2.0, temperature=2.0, class_weights=cw * scale)
    assert got.dtype == torch.float32
    want = _pairwise_gkl64(zs, zt, cw, 1.0, 2.0, 2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_losses_at_a_tiny_temperature_take_underflowed_classes_as_probability_zero():
    """At T = 1e-37 the target's finite log-probability of a class can underflow to p = 0 while
    the student's, far below, overflows to -inf: the class adds 0 (float64 gives 0 for these
    rows), not +inf, and the gradients are 0, not NaN."""
    s = torch.tensor([[0.0, -3.0, -40.0], [0.17, 0.87, -0.14]])
    t = torch.tensor([[0.0, -30.0, -1.0], [-1.48, 2.57, -0.47]])
    for fn, T in ((kl_loss, 1e-37), (dkl_loss, 1e-37), (dkl_loss, 1.2e-38)):
        zs, zt = s.clone().requires_grad_(), t.clone().requires_grad_()
        rows = fn(zs, zt, temperature=T, reduction="none")
        want = fn(s.double(), t.double(), temperature=T, reduction="none")
        assert torch.isfinite(rows).all(), (fn.__name__, T, rows)
        torch.testing.assert_close(rows.double(), want, rtol=1e-6, atol=0.0)
        for grad in torch.autograd.grad(rows[0], (zs, zt)):
            assert torch.isfinite(grad).all() and not grad.any()


@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_finite_logits_whose_gap_overflows_give_the_float64_value(loss):
    """Logits of ±2e38 are finite in float32, their difference is not: the wMSE is taken on
    both rows divided by a power of 2 first, so the loss is the float64 one (2e38), not NaN."""
    s = torch.tensor([[-2e38, 0.0, 1.0], [0.5, 0.0, 1.0]])
    t = torch.tensor([[2e38, 0.0, 1.0], [0.0, 2.0, 1.0]])
    fn = LOSSES[loss]
    got = fn(s, t, reduction="none")
    want = fn(s.double(), t.double(), reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0)
    # a value that itself overflows is +inf
    assert torch.isposinf(dkl.weighted_mse(t, s, torch.ones(2, 3))[0])


def test_class_prior_takes_uint8_labels_as_classes_not_as_a_mask():
    prior = dkl.ClassPrior(4)
    prior.update(torch.eye(4) * 5, torch.arange(4, dtype=torch.uint8))
    prior.step()
    labels = torch.tensor([3, 2, 1, 3], dtype=torch.uint8)
    torch.testing.assert_close(prior.weights(labels), prior.weights(labels.long()))
    assert prior.weights(labels).argmax(1).tolist() == [3, 2, 1, 3]


def test_invalid_class_weights_under_compile_give_nan_rows():
    """A compiled graph cannot raise on the weights' values (no host sync): the rows with a
    NaN or negative weight come out NaN, and so does the mean, never a finite number."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    cw = torch.rand(3, 5, generator=g)
    cw[0, 1], cw[2, 3] = float("nan"), -0.5
    torch._dynamo.reset()
    for fn in (ikl_loss, gkl_loss):
        rows = torch.compile(lambda a, b, w, f=fn: f(a, b, class_weights=w, reduction="none"))
        assert torch.isnan(rows(s, t, cw)[[0, 2]]).all()
        assert torch.isfinite(rows(s, t, cw.abs().nan_to_num(0.5))).all()
        mean = torch.compile(lambda a, b, w, f=fn: f(a, b, class_weights=w))
        assert torch.isnan(mean(s, t, cw))


@quiet_interpreter
def test_the_kernel_refuses_what_its_float32_sums_cannot_hold():
    """Temperatures below 1e-6 and class weights summing past float32 are refused by the
    kernel with one line (``impl="auto"`` takes the torch path for them), where it gave NaN."""
    ops = _kernel_or_skip()
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    _one_line_error(
        ValueError,
        r"temperature >= 1e-06 on the fused kernel",
        dkl_loss,
        s,
        t,
        temperature=1e-19,
        impl="triton",
    )
    _one_line_error(
        ValueError,
        r"temperature >= 1e-06",
        ops.fused_divergence,
        s,
        t,
        kind="kl",
        temperature=1e-39,
    )
    huge = torch.full((2, 5), 3e38)
    _one_line_error(
        ValueError,
        r"class_weights whose sum stays within float32",
        ikl_loss,
        s,
        t,
        class_weights=huge,
        impl="triton",
    )
    assert torch.isposinf(ikl_loss(s, t, class_weights=huge))  # the torch path: +inf, exact


@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_class_weights_in_rows_outside_the_mask_are_not_read(loss):
    """Rows outside ``mask`` may hold anything, their class weights too (a NaN weight there
    was refused): the loss is that of the masked-in rows alone."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    cw = torch.rand(3, 4, generator=g)
    cw[1] = float("nan")
    cw[1, 0] = -1.0
    mask = torch.tensor([True, False, True])
    fn = LOSSES[loss]
    got = fn(s, t, class_weights=cw, mask=mask)
    want = fn(s[mask].double(), t[mask].double(), class_weights=cw[mask].double())
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_kl_gradients_at_logits_near_the_float_limit_are_the_float64_ones():
    """A loss of 2e38 is finite, but the fast form's target gradient p (log p - log q - KL)
    overflowed to inf · 0 = NaN there: a loss that near overflow takes the exact form."""
    s = torch.tensor([[-2e38, 0.0, 1.0]])
    t = torch.tensor([[2e38, 0.0, 1.0]])
    zs, zt = s.clone().requires_grad_(), t.clone().requires_grad_()
    got = torch.autograd.grad(kl_loss(zs, zt), (zs, zt))
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    want = torch.autograd.grad(kl_loss(s64, t64), (s64, t64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e20, 1e36])
@pytest.mark.parametrize("config", ["kl", "dkl", "ikl", "ikl_t2"])
def test_gradients_and_hessian_products_at_huge_finite_logits(config, scale):
    """Finite float32 logits of 1e20 and 1e36 whose loss is finite: value, both gradients and a
    Hessian-vector product equal the float64 pairwise oracle. The exact form scales rows down and
    multiplies the scales back last, and its backward multiplied by them first: in float32 that
    overflowed (IKL's gradient was NaN at 1e36 where the loss is 1.2e36). (With given class
    weights the loss grows as the logits squared and overflows first.)"""
    g = torch.Generator().manual_seed(4)
    base_s = torch.randn(3, 6, generator=g, dtype=torch.float64) * scale
    base_t = torch.randn(3, 6, generator=g, dtype=torch.float64) * scale
    cw = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.1
    kind, kw = _split(config, cw)
    zs, zt = base_s.float().requires_grad_(), base_t.float().requires_grad_()
    kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    got = LOSSES[kind](zs, zt, **kw32, reduction="sum")
    s64, t64 = zs.detach().double().requires_grad_(), zt.detach().double().requires_grad_()
    want = finite_class_oracle(s64, t64, kind, **kw).sum()
    assert torch.isfinite(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
    got_g = torch.autograd.grad(got, (zs, zt), create_graph=True)
    want_g = torch.autograd.grad(want, (s64, t64), create_graph=True)
    for a, b in zip(got_g, want_g):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got_h = torch.autograd.grad((got_g[0] * v.float()).sum(), zs)[0]
    want_h = torch.autograd.grad((want_g[0] * v).sum(), s64)[0]
    assert torch.isfinite(got_h).all()
    tol = 1e-6 * want_h.abs().max().item()
    torch.testing.assert_close(got_h.double(), want_h, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("loss", ["kl", "dkl", "ikl", "gkl"])
def test_fullgraph_compile_takes_a_changing_temperature(loss):
    """A temperature schedule under torch.compile(fullgraph=True): the hyper-parameter check
    called math.isfinite, which Dynamo refuses on the second temperature (a symbolic float)."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    fn = LOSSES[loss]
    torch._dynamo.reset()
    step = torch.compile(lambda a, b, T: fn(a, b, temperature=T), fullgraph=True)
    for T in (3.0, 4.0, 5.5):
        torch.testing.assert_close(step(s, t, T), fn(s, t, temperature=T), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_vmap_over_class_weights_equals_a_loop_and_marks_bad_rows(loss):
    """vmap over per-task class weights raised functorch's data-dependent-control-flow error
    from the weights' value check; inside a transform a bad weight makes its row NaN, as under
    torch.compile."""
    g = torch.Generator().manual_seed(4)
    S, T = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    W = torch.rand(3, 2, 5, generator=g) + 0.1
    fn = LOSSES[loss]
    got = torch.func.vmap(lambda s, t, w: fn(s, t, class_weights=w, reduction="none"))(S, T, W)
    want = torch.stack([fn(S[i], T[i], class_weights=W[i], reduction="none") for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    W[1, 0, 2] = -1.0
    got = torch.func.vmap(lambda s, t, w: fn(s, t, class_weights=w, reduction="none"))(S, T, W)
    assert (
        torch.isnan(got[1, 0]) and torch.isfinite(got[[0, 2]]).all() and torch.isfinite(got[1, 1])
    )


@quiet_interpreter
def test_the_kernel_under_torch_func_is_refused_in_one_line():
    """impl="triton" under torch.func or forward-mode AD gave PyTorch's "must override the
    setup_context staticmethod" / "implement the jvp function" from deep inside."""
    _kernel_or_skip()
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    message = r"impl='triton' cannot run under torch.func transforms"
    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(lambda a: ikl_loss(a, t, impl="triton"))(s)
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(lambda a, b: kl_loss(a[None], b[None], impl="triton"))(s, t)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(s, torch.ones_like(s))
        with pytest.raises(RuntimeError, match=message):
            dkl_loss(dual, t, impl="triton")


def test_a_mean_of_finite_rows_whose_sum_overflows_is_finite():
    """Rows of 2.3e38 and 1.5e38: their mean fits float32, their sum does not (it was inf: the
    exact form summed the rows before dividing by B)."""
    s = torch.tensor([[-2.3e38, 0.0, 1.0], [-1.5e38, 0.0, 1.0]])
    t = torch.tensor([[2e37, 0.0, 1.0], [1e37, 0.0, 1.0]])
    rows = kl_loss(s, t, reduction="none")
    assert torch.isfinite(rows).all() and rows.double().sum() > torch.finfo(torch.float32).max
    want = kl_loss(s.double(), t.double())
    torch.testing.assert_close(kl_loss(s, t).double(), want, rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------- masked classes
MASKED_CONFIGS = {
    "kl T=3": ("kl", {"temperature": 3.0}),
    "dkl T=3": ("dkl", {"alpha": 1.0, "beta": 2.0, "temperature": 3.0}),
    "ikl T=3": ("ikl", {"alpha": 1.0, "beta": 4.0, "temperature": 3.0, "weight_temperature": 3.0}),
    "ikl T=20": (
        "ikl",
        {"alpha": 1.0, "beta": 4.0, "temperature": 20.0, "weight_temperature": 1.0},
    ),
    "ikl GI": ("ikl", {"alpha": 1.0, "beta": 2.0, "temperature": 3.0, "class_weights": True}),
    "gkl T=3": ("gkl", {"alpha": 1.0, "beta": 1.0, "temperature": 3.0}),
}


def _masked_oracle(zs, zt, kind, kw):
    """The loss of float64 logits, written out with the pairwise wMSE (GKL: its batch value,
    with weights σ(z_t) and the sCE's target detached)."""
    if kind != "gkl":
        return finite_class_oracle(zs, zt, kind, **kw)
    T, p = kw["temperature"], F.softmax(zt.detach(), dim=1)
    pn = p[:, :, None] * p[:, None, :]
    d = (zt[:, :, None] - zt[:, None, :]) - (zs[:, :, None] - zs[:, None, :])
    wmse = 0.25 * (pn * d**2).sum() / pn.sum()
    sce = -(F.softmax(zt.detach() / T, 1) * F.log_softmax(zs / T, 1)).sum(1).mean()
    return kw["beta"] * wmse + kw["alpha"] * sce


# a student logit of -3.4e38 on a kept class makes the float32 loss inf: not among the cases
MASKED_CASES = [
    (config, side, fill)
    for config in MASKED_CONFIGS
    for side in ("target", "both", "input")
    for fill in (-1e9, torch.finfo(torch.float32).min)
    if not (side == "input" and fill < -1e30)
]


@pytest.mark.parametrize(("config", "side", "fill"), MASKED_CASES)
def test_a_masked_first_class_rounds_no_other(config, side, fill):
    """A class masked with a large finite logit (``masked_fill(-1e9)`` or the float's minimum)
    in column 0, in float32: the fast forms took each row relative to its first entry, so every
    other entry was rounded to ulp(1e9) = 64 (KL rows of 0 for 0.1 to 0.35, IKL rows of 3e10
    for 3). Each row now leans on its largest entry and its largest weight, and with class
    weights (GI) each gap subtracts the nearer of the two first."""
    kind, kw = MASKED_CONFIGS[config]
    kw = dict(kw)
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(4, 10, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(4, 10, generator=g, dtype=torch.float64) * 2 + 0.5
    if side in ("target", "both"):
        zt[:, 0] = fill
    if side in ("input", "both"):
        zs[:, 0] = fill
    if kw.pop("class_weights", False):  # a class only the teacher masks weighs 0, as in a
        # prior from its softmax; one both sides mask keeps a weight (its gap 0 must stay 0)
        cw = torch.rand(4, 10, generator=g, dtype=torch.float64) + 0.05
        kw["class_weights"] = torch.where((zt > -1e8) | (zs < -1e8), cw, 0.0)
    zs32 = zs.float().requires_grad_()
    zt32 = zt.float().requires_grad_()
    kw32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kw.items()}
    reduction = "mean" if kind == "gkl" else "none"
    got = LOSSES[kind](zs32, zt32, reduction=reduction, **kw32)
    zs64 = zs32.detach().double().requires_grad_()
    zt64 = zt32.detach().double().requires_grad_()
    want = _masked_oracle(zs64, zt64, kind, kw)
    torch.testing.assert_close(got.double(), want.detach(), rtol=3e-6, atol=1e-6)
    g_got, g_want = _grads(got, zs32, zt32), _grads(want, zs64, zt64)
    for a, b in zip(g_got, g_want):
        scale = b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= 3e-6 * scale + 1e-7


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_target_made_under_inference_mode_trains_the_input(config):
    """Teacher logits made under ``torch.inference_mode()`` (a common way to run a frozen
    teacher), the student trained outside it: autograd refuses to save an inference tensor, so
    the losses copy it; the gradient is the float64 oracle's (``F.kl_div`` accepts such a target
    too)."""
    g = torch.Generator().manual_seed(9)
    zs = (torch.randn(4, 7, generator=g) * 2).requires_grad_()
    cw = torch.rand(4, 7, generator=g)
    with torch.inference_mode():
        zt = torch.randn(4, 7, generator=g) * 2
        cw_inf = cw.clone()
    kind, kw = _split(config, cw_inf)
    got = torch.autograd.grad(LOSSES[kind](zs, zt, **kw), zs)[0]
    zs64 = zs.detach().double().requires_grad_()
    kw64 = {k: (cw.double() if k == "class_weights" else v) for k, v in kw.items()}
    want = finite_class_oracle(zs64, zt.clone().double(), kind, **kw64).mean()
    torch.testing.assert_close(
        got.double(), torch.autograd.grad(want, zs64)[0], rtol=1e-5, atol=1e-7
    )
