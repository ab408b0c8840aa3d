"""Second derivatives of every loss, against finite differences and independent plain-autograd
references, on masked rows and ``-inf`` targets too; the fast path's row blocks; the fused
kernel's refusal.

The references are written here without the library's code: the pairwise B×C×C wMSE of the
paper, ``F.kl_div``, and a row-by-row oracle that keeps only each row's finite target classes.
Finite differences see through stop-gradients, so the ``gradgradcheck`` cases hold the detached
parts fixed: the target that sets the weights is a constant, or α = 0 with given weights.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import dkl.losses._function as loss_function
from dkl import (
    DKLLoss,
    GKLLoss,
    IKLLoss,
    KLLoss,
    dkl_loss,
    gkl_loss,
    ikl_loss,
    kl_loss,
    soft_cross_entropy,
    weighted_mse,
)

INF = float("inf")


def logits(B=4, C=6, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(B, C, generator=g, dtype=dtype)).requires_grad_()
    zt = (scale * torch.randn(B, C, generator=g, dtype=dtype)).requires_grad_()
    cw = torch.rand(B, C, generator=g, dtype=dtype) + 0.1
    return zs, zt, cw


# --------------------------------------------------------------------------- references
def pairwise_wmse(a, b, w):
    """¼ Σ_jk w_j w_k ((a_j - a_k) - (b_j - b_k))², per row (B×C×C)."""
    da = a[:, :, None] - a[:, None, :]
    db = b[:, :, None] - b[:, None, :]
    return 0.25 * (w[:, :, None] * w[:, None, :] * (da - db) ** 2).sum(dim=(1, 2))


def ref_rows(kind, zs, zt, *, alpha=1.0, beta=1.0, gamma=1.0, T=1.0, T2=1.0, cw=None):
    """Per-row loss from plain autograd, each row restricted to its finite target classes."""
    rows = []
    for i in range(zs.shape[0]):
        keep = torch.isfinite(zt[i]).nonzero().squeeze(1)
        s, t = zs[i], zt[i][keep]
        log_q = F.log_softmax(s / T, dim=0)[keep]
        p = F.softmax(t / T, dim=0)
        if kind == "kl":
            rows.append(
                F.kl_div(log_q, F.log_softmax(t / T, dim=0), log_target=True, reduction="sum")
            )
            continue
        sce = -(p.detach() * log_q).sum()
        if kind == "dkl":
            w, a, b = p.detach(), t / T, s[keep].detach() / T
        else:
            a, b = t, s[keep]
            if cw is not None:
                w = cw[i][keep]
            else:
                w = F.softmax(t.detach() / T2, dim=0)
            if kind == "gkl":
                w = w**gamma
        rows.append(beta * pairwise_wmse(a[None], b[None], w[None])[0] + alpha * sce)
    return torch.stack(rows)


def ref_gkl(zs, zt, *, alpha, beta, gamma, T, cw, mask=None):
    """GKL's mean from the pairwise form, Σ_i ¼ΣΣ p p Δ² / Σ_i (Σ p)² + α mean sCE, each row on
    its finite target classes."""
    num, den, sce = [], [], []
    for i in range(zs.shape[0]):
        if mask is not None and not mask[i]:
            continue
        keep = torch.isfinite(zt[i]).nonzero().squeeze(1)
        s, t, w = zs[i], zt[i][keep], cw[i][keep] ** gamma
        num.append(pairwise_wmse(t[None], s[keep][None], w[None])[0])
        den.append(w.sum() ** 2)
        p = F.softmax(t.detach() / T, dim=0)
        sce.append(-(p * F.log_softmax(s / T, dim=0)[keep]).sum())
    return beta * torch.stack(num).sum() / torch.stack(den).sum() + alpha * torch.stack(sce).mean()


# (name, loss function, keyword arguments, whether the target may vary in gradgradcheck)
CASES = [
    ("kl", kl_loss, {"temperature": 2.0}, True),
    ("dkl", dkl_loss, {"alpha": 1.5, "beta": 0.0, "temperature": 2.0}, False),
    (
        "ikl",
        ikl_loss,
        {"alpha": 1.5, "beta": 3.0, "temperature": 2.0, "weight_temperature": 3.0},
        False,
    ),
    (
        "ikl_same_T",
        ikl_loss,
        {"alpha": 1.0, "beta": 2.0, "temperature": 4.0, "weight_temperature": 4.0},
        False,
    ),
    ("ikl_gi", ikl_loss, {"alpha": 0.0, "beta": 2.0, "class_weights": True}, True),
    ("gkl", gkl_loss, {"alpha": 1.0, "beta": 4.0, "gamma": 0.5, "temperature": 3.0}, False),
    ("gkl_gi", gkl_loss, {"alpha": 0.0, "beta": 4.0, "gamma": 0.5, "class_weights": True}, True),
]


def _kw(kw, cw):
    kw = dict(kw)
    if kw.pop("class_weights", False):
        kw["class_weights"] = cw
    return kw


# --------------------------------------------------------------------------- gradgradcheck
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name,fn,kw,target_varies", CASES, ids=[c[0] for c in CASES])
def test_gradgradcheck_float64(name, fn, kw, target_varies, reduction):
    zs, zt, cw = logits()
    kw = _kw(kw, cw)
    if target_varies:
        inputs = (zs, zt)

        def f(a, b):
            return fn(a, b, reduction=reduction, **kw)
    else:
        inputs, const = (zs,), zt.detach()

        def f(a):
            return fn(a, const, reduction=reduction, **kw)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("name,fn,kw,target_varies", CASES, ids=[c[0] for c in CASES])
def test_gradgradcheck_masked_rows_and_neg_inf_targets(name, fn, kw, target_varies):
    """A masked row full of NaN and a target that rules classes out (-inf): finite differences
    leave the -inf entries where they are, and the masked row is never read."""
    zs, zt, cw = logits(B=5, C=6, seed=1)
    zt = zt.detach().clone()
    zt[1, :2] = -INF
    zt[3, 4] = -INF
    zt[2] = float("nan")
    mask = torch.tensor([True, True, False, True, True])
    kw = _kw(kw, cw)
    if target_varies:
        inputs = (zs, zt.requires_grad_())

        def f(a, b):
            return fn(a, b, mask=mask, reduction="sum", **kw)
    else:
        inputs = (zs,)

        def f(a):
            return fn(a, zt, mask=mask, reduction="sum", **kw)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradgradcheck_parts():
    zs, zt, cw = logits()
    assert torch.autograd.gradgradcheck(lambda a, b: weighted_mse(b, a, cw), (zs, zt))
    assert torch.autograd.gradgradcheck(lambda a: soft_cross_entropy(a, cw, 2.0), (zs,))


# --------------------------------------------------------------------------- against references
def _hvp(out, x, v):
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


HVP_CASES = [
    ("kl", {"temperature": 2.0}),
    ("dkl", {"alpha": 1.5, "beta": 0.7, "temperature": 3.0}),
    ("ikl", {"alpha": 1.0, "beta": 4.0, "temperature": 4.0, "T2": 1.5}),
    ("ikl_gi", {"alpha": 2.0, "beta": 2.0, "temperature": 1.0, "gi": True}),
    ("gkl", {"alpha": 1.0, "beta": 3.0, "gamma": 0.5, "temperature": 2.0, "gi": True}),
]


def _call(kind, zs, zt, cw, reduction="none", mask=None, **kw):
    kw = dict(kw)
    if kw.pop("gi", False):
        kw["class_weights"] = cw
    if "T2" in kw:
        kw["weight_temperature"] = kw.pop("T2")
    fn = {"kl": kl_loss, "dkl": dkl_loss, "ikl": ikl_loss, "gkl": gkl_loss}[kind.split("_")[0]]
    return fn(zs, zt, reduction=reduction, mask=mask, **kw)


def _ref(kind, zs, zt, cw, **kw):
    kind = kind.split("_")[0]
    args = {
        "alpha": kw.get("alpha", 1.0),
        "beta": kw.get("beta", 1.0),
        "gamma": kw.get("gamma", 1.0),
        "T": kw.get("temperature", 1.0),
        "T2": kw.get("T2", 1.0),
        "cw": cw if kw.get("gi") else None,
    }
    return ref_rows(kind, zs, zt, **args)


@pytest.mark.parametrize("side", ["input", "target"])
@pytest.mark.parametrize("kind,kw", [c for c in HVP_CASES if c[0] != "gkl"], ids=lambda c: str(c))
def test_hessian_vector_product_matches_reference_with_neg_inf_targets(kind, kw, side):
    """grad of (grad · v): each row against the plain-autograd oracle on its finite classes."""
    zs, zt, cw = logits(B=4, C=7, seed=2)
    zt = zt.detach().clone()
    zt[0, 0] = zs.detach()[0, 0] = -INF  # both rule it out
    zt[1, ::2] = -INF
    zs = zs.detach().requires_grad_()
    zt.requires_grad_()
    x = zs if side == "input" else zt
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    v = torch.where(torch.isfinite(x.detach()), v, torch.zeros(()))
    upstream = torch.tensor([0.5, -1.0, 2.0, 1.5], dtype=torch.float64)
    got_g, got_h = _hvp((_call(kind, zs, zt, cw, **kw) * upstream).sum(), x, v)
    want_g, want_h = _hvp((_ref(kind, zs, zt, cw, **kw) * upstream).sum(), x, v)
    assert torch.isfinite(got_h).all()
    torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got_h, want_h, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind,kw", HVP_CASES, ids=lambda c: str(c))
def test_gradient_penalty_weight_gradient_matches_reference(kind, kw):
    """The case the hand-written backward used to get ~50 % wrong, silently: a penalty on the
    input gradient of a small model, differentiated with respect to the model's weight, with a
    masked row (garbage in it) and a target that rules classes out."""
    g = torch.Generator().manual_seed(3)
    B, D, C = 5, 4, 6
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, D, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    zt[1, 2:4] = -INF
    zt[3] = float("nan")  # masked out below
    cw = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.1
    mask = torch.tensor([True, True, True, False, True])
    keep = mask.nonzero().squeeze(1)

    def penalty(loss_fn):
        (gx,) = torch.autograd.grad(loss_fn(x @ weight.T), x, create_graph=True)
        return (gx**2).sum()

    def ours(zs):
        return _call(kind, zs, zt, cw, reduction="mean", mask=mask, **kw)

    def reference(zs):
        if kind == "gkl":
            return ref_gkl(
                zs,
                zt,
                alpha=kw["alpha"],
                beta=kw["beta"],
                gamma=kw["gamma"],
                T=kw["temperature"],
                cw=cw,
                mask=mask,
            )
        return _ref(kind, zs[keep], zt[keep], cw[keep], **kw).mean()

    got = torch.autograd.grad(penalty(ours), weight)[0]
    want = torch.autograd.grad(penalty(reference), weight)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "module,fn,kw",
    [
        (KLLoss, kl_loss, {"temperature": 2.0}),
        (DKLLoss, dkl_loss, {"alpha": 1.0, "beta": 2.0, "temperature": 2.0}),
        (
            IKLLoss,
            ikl_loss,
            {"alpha": 1.0, "beta": 2.0, "temperature": 2.0, "weight_temperature": 5.0},
        ),
        (GKLLoss, gkl_loss, {"alpha": 1.0, "beta": 2.0, "gamma": 0.3, "temperature": 2.0}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_modules_give_the_functions_second_derivatives(module, fn, kw):
    zs, zt, _ = logits()
    v = torch.randn_like(zs)
    a = _hvp(module(**kw)(zs, zt), zs, v)
    b = _hvp(fn(zs, zt, **kw), zs, v)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_grad_of_grad_directly():
    """``grad`` of a gradient used to fail with an unrelated message."""
    zs, zt, _ = logits()
    (g,) = torch.autograd.grad(ikl_loss(zs, zt.detach(), beta=2.0), zs, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), zs)
    assert h.shape == zs.shape and torch.isfinite(h).all()


# --------------------------------------------------------------------------- the fast path
@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of one or two rows, so that a small batch runs the block loop."""
    monkeypatch.setattr(loss_function, "BLOCK_ELEMENTS", 10)


@pytest.mark.parametrize("name,fn,kw,target_varies", CASES, ids=[c[0] for c in CASES])
def test_blocks_of_rows_change_nothing(tiny_blocks, name, fn, kw, target_varies):
    zs, zt, cw = logits(B=7, C=6, seed=4)
    kw = _kw(kw, cw)
    upstream = torch.linspace(-1.0, 2.0, 7, dtype=torch.float64)
    out = fn(zs, zt, reduction="none", **kw)
    got = torch.autograd.grad((out * upstream).sum(), (zs, zt))
    kind = name.split("_")[0]
    if kind == "gkl":  # rows normalised by the batch: compare the mean with the pairwise form
        ref = ref_gkl(
            zs,
            zt,
            alpha=kw["alpha"],
            beta=kw["beta"],
            gamma=kw["gamma"],
            T=kw.get("temperature", 1.0),
            cw=kw.get("class_weights", F.softmax(zt.detach(), 1)),
        )
        torch.testing.assert_close(out.mean(), ref, rtol=1e-10, atol=1e-12)
        _check_reduced(fn(zs, zt, reduction="mean", **kw), ref, zs)
        return
    ref_kw = {k: v for k, v in kw.items() if k in ("alpha", "beta", "gamma")}
    ref_kw.update(
        T=kw.get("temperature", 1.0),
        T2=kw.get("weight_temperature", 1.0),
        cw=kw.get("class_weights"),
    )
    ref = ref_rows(kind, zs, zt, **ref_kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(
        (ref * upstream).sum(), (zs, zt), allow_unused=True, retain_graph=True
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(
            a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12
        )
    # the mean and the sum are taken inside, block by block
    _check_reduced(fn(zs, zt, reduction="mean", **kw), ref.mean(), zs)
    _check_reduced(fn(zs, zt, reduction="sum", **kw), ref.sum(), zs)


def _check_reduced(got, want, x):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (a,) = torch.autograd.grad(got, x)
    (b,) = torch.autograd.grad(want, x, retain_graph=True)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_grad_computes_no_gradient_and_keeps_no_graph():
    zs, zt, _ = logits()
    with torch.no_grad():
        out = ikl_loss(zs, zt, beta=2.0)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ikl_loss(zs.detach(), zt.detach(), beta=2.0))


def test_retain_graph_backward_twice():
    zs, zt, _ = logits()
    out = ikl_loss(zs, zt, beta=2.0, reduction="sum")
    (a,) = torch.autograd.grad(out, zs, retain_graph=True)
    (b,) = torch.autograd.grad(out, zs)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- the fused kernel
KERNEL_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("fn", [kl_loss, dkl_loss, ikl_loss])
def test_fused_kernel_refuses_double_backward_with_a_clear_message(fn):
    pytest.importorskip("triton")
    if not KERNEL_HERE:
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    zs = torch.randn(3, 8, device=device, requires_grad=True)
    zt = torch.randn(3, 8, device=device)
    out = fn(zs, zt, impl="triton")
    with pytest.raises(RuntimeError, match=r"no second derivative.*impl='torch'") as info:
        torch.autograd.grad(out, zs, create_graph=True)
    assert "\n" not in str(info.value)
    # first order still works, and impl='torch' gives the second
    assert torch.isfinite(torch.autograd.grad(fn(zs, zt, impl="triton"), zs)[0]).all()
    (g,) = torch.autograd.grad(fn(zs, zt, impl="torch"), zs, create_graph=True)
    assert g.requires_grad


# --------------------------------------------------------------------------- torch.func, forward AD
# torch.func's first use imports a module that calls the deprecated torch.jit.script
quiet_functorch = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning"
)


@quiet_functorch
@pytest.mark.parametrize("kind,kw", HVP_CASES, ids=lambda c: str(c))
def test_torch_func_hessian_and_vmap_match_the_reference(kind, kw):
    zs, zt, cw = logits(B=3, C=5, seed=6)
    zs, zt = zs.detach(), zt.detach()
    zt[1, 0] = -INF

    def ours(x):
        return _call(kind, x, zt, cw, reduction="sum", **kw)

    def ref(x):
        if kind == "gkl":
            return 3 * ref_gkl(
                x,
                zt,
                alpha=kw["alpha"],
                beta=kw["beta"],
                gamma=kw["gamma"],
                T=kw["temperature"],
                cw=cw,
            )
        return _ref(kind, x, zt, cw, **kw).sum()

    torch.testing.assert_close(
        torch.func.hessian(ours)(zs), torch.func.hessian(ref)(zs), rtol=1e-9, atol=1e-11
    )
    batch = torch.stack([zs, zs.flip(1)])
    torch.testing.assert_close(
        torch.func.vmap(ours)(batch),
        torch.stack([ref(zs), ref(zs.flip(1))]),
        rtol=1e-10,
        atol=1e-12,
    )


@quiet_functorch
def test_forward_mode_ad():
    import torch.autograd.forward_ad as fwAD

    zs, zt, _ = logits()
    v = torch.randn_like(zs)
    want = torch.func.jvp(
        lambda x: ref_rows("ikl", x, zt.detach(), beta=2.0).sum(), (zs.detach(),), (v,)
    )[1]
    with fwAD.dual_level():
        out = ikl_loss(fwAD.make_dual(zs, v), zt.detach(), beta=2.0, reduction="sum")
        got = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _hvp_of(loss, x, other, v):
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad((g * v).sum(), other)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["identical", "shifted", "zeros"])
@pytest.mark.parametrize("kind", ["dkl", "ikl", "gkl_cw", "weighted_mse"])
def test_hessians_where_every_gap_of_a_row_is_equal(kind, case, dtype):
    """A student equal to its teacher (an EMA teacher at step 0, self-distillation), or off by a
    constant, has equal gaps in a row: the wMSE is 0 there but its Hessian is not. The exact
    form scaled the gaps by their largest (then 1e-38) and the backward multiplied by that
    square first: the block came out 0, and NaN for all-zero logits."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 5, generator=g, dtype=torch.float64)
    if case == "zeros":
        base = torch.zeros_like(base)
    offset = 1.0 if case == "shifted" else 0.0
    cw = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.1
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    kw = {"alpha": 1.0, "beta": 2.0, "temperature": 2.0}

    def library(zs, zt):
        if kind == "weighted_mse":
            return weighted_mse(zt, zs, cw.to(dtype)).sum()
        if kind == "gkl_cw":
            return gkl_loss(zs, zt, class_weights=cw.to(dtype), gamma=0.5, **kw)
        return {"dkl": dkl_loss, "ikl": ikl_loss}[kind](zs, zt, **kw, reduction="sum")

    def reference(zs, zt):
        if kind == "weighted_mse":
            return pairwise_wmse(zt, zs, cw).sum()
        if kind == "gkl_cw":
            return ref_gkl(zs, zt, gamma=0.5, T=2.0, cw=cw, alpha=1.0, beta=2.0)
        return ref_rows(kind, zs, zt, alpha=1.0, beta=2.0, T=2.0).sum()

    for wrt in ("student", "teacher"):
        zs = base.clone().to(dtype).requires_grad_()
        zt = (base + offset).to(dtype).requires_grad_()
        s64, t64 = base.clone().requires_grad_(), (base + offset).requires_grad_()
        x, x64 = (zs, s64) if wrt == "student" else (zt, t64)
        got = _hvp_of(library(zs, zt), x, x, v.to(dtype))
        want = _hvp_of(reference(s64, t64), x64, x64, v)
        assert torch.isfinite(got).all(), (wrt, got)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=wrt)


@pytest.mark.parametrize("loss", ["ikl", "gkl"])
def test_torch_func_gradients_at_logits_of_1e20_in_float32(loss):
    """torch.func runs the exact form in the input's dtype: its scales (logits of 1e20 squared)
    overflowed float32 in the backward, and the gradient was NaN where eager's is right."""
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(2, 5, generator=g, dtype=torch.float64) * 1e20
    zt = torch.randn(2, 5, generator=g, dtype=torch.float64) * 1e20
    cw = torch.full((2, 5), 0.2, dtype=torch.float64)
    fn = {"ikl": ikl_loss, "gkl": gkl_loss}[loss]
    got = torch.func.grad(lambda t: fn(zs.float(), t, class_weights=cw.float()))(zt.float())
    want = torch.func.grad(lambda t: fn(zs, t, class_weights=cw))(zt)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
