"""The losses against independent oracles: the pairwise B×C×C formula, F.kl_div, Theorem 1."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dkl
from dkl import DKLLoss, IKLLoss, KLLoss, dkl_loss, ikl_loss, kl_loss

RTOL64 = 1e-10


# --------------------------------------------------------------------------- the oracle
def pairwise_wmse(zt, zs, w):
    """The paper's pairwise form: ¼ Σ_j Σ_k w_j w_k ((zt_j - zt_k) - (zs_j - zs_k))²  (B×C×C)."""
    dt = zt[:, :, None] - zt[:, None, :]
    ds = zs[:, :, None] - zs[:, None, :]
    return 0.25 * (w[:, :, None] * w[:, None, :] * (dt - ds) ** 2).sum(dim=(1, 2))


def pairwise_ikl(zs, zt, alpha, beta, T, T2, class_weights=None):
    w = class_weights if class_weights is not None else torch.softmax(zt.detach() / T2, dim=1)
    p = torch.softmax(zt.detach() / T, dim=1)
    sce = -(p * torch.log_softmax(zs / T, dim=1)).sum(dim=1)
    return beta * pairwise_wmse(zt, zs, w.detach()) + alpha * sce


def reduce_ref(x, reduction):
    return {"none": x, "mean": x.sum() / x.shape[0], "sum": x.sum()}[reduction]


def make_logits(B, C, *, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(B, C, generator=g, dtype=dtype)).requires_grad_()
    zt = (scale * torch.randn(B, C, generator=g, dtype=dtype)).requires_grad_()
    return zs, zt


def assert_close64(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL64, atol=1e-12)


def grads(out, *xs):
    return torch.autograd.grad(out.sum(), xs)


# --------------------------------------------------------------------------- IKL == pairwise
GRID = list(
    itertools.product(
        [0.0, 1.0, 3.0],  # alpha
        [0.0, 0.5, 8.0],  # beta
        [1.0, 4.0],  # T
        [1.0, 100.0],  # T2
        ["sample", "class"],  # weights
        ["none", "mean", "sum"],
    )
)


@pytest.mark.parametrize("alpha,beta,T,T2,weights,reduction", GRID)
def test_ikl_matches_pairwise_oracle(alpha, beta, T, T2, weights, reduction):
    zs, zt = make_logits(5, 7, seed=hash((alpha, beta, T, T2)) % 1000)
    cw = None
    if weights == "class":
        g = torch.Generator().manual_seed(1)
        cw = torch.rand(5, 7, generator=g, dtype=torch.float64)
        cw[0, :3] = 0.0  # zeros are legal weights
    got = ikl_loss(
        zs,
        zt,
        alpha=alpha,
        beta=beta,
        temperature=T,
        weight_temperature=T2,
        class_weights=cw,
        reduction=reduction,
    )
    want = reduce_ref(pairwise_ikl(zs, zt, alpha, beta, T, T2, cw), reduction)
    assert_close64(got, want)
    for g_got, g_want in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(g_got, g_want)


@pytest.mark.parametrize("B,C", [(1, 2), (3, 1001), (2, 3), (9, 2)])
def test_ikl_pairwise_odd_shapes(B, C):
    zs, zt = make_logits(B, C, seed=C)
    got = ikl_loss(zs, zt, alpha=1.0, beta=8.0, temperature=4.0, weight_temperature=2.0)
    want = pairwise_ikl(zs, zt, 1.0, 8.0, 4.0, 2.0).mean()
    assert_close64(got, want)
    for g_got, g_want in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(g_got, g_want)


def test_wmse_zero_weight_row_is_zero():
    zs, zt = make_logits(2, 4)
    w = torch.ones(2, 4, dtype=torch.float64)
    w[1] = 0
    out = dkl.weighted_mse(zt, zs, w)
    assert out[1] == 0 and torch.isfinite(out).all()
    g = grads(out, zs)[0]
    assert torch.all(g[1] == 0)


def test_ikl_target_without_grad_and_mask():
    zs, zt = make_logits(6, 5)
    zt = zt.detach()
    mask = torch.tensor([True, False, True, True, False, True])
    got = ikl_loss(zs, zt, beta=2.0, mask=mask)
    per_row = pairwise_ikl(zs, zt, 1.0, 2.0, 1.0, 1.0)
    want = per_row[mask].sum() / mask.sum()
    assert_close64(got, want)
    (g,) = grads(got, zs)
    assert torch.all(g[~mask] == 0)
    none = ikl_loss(zs, zt, beta=2.0, mask=mask, reduction="none")
    assert torch.all(none[~mask] == 0)
    # all rows masked: the mean is 0, not NaN
    empty = ikl_loss(zs, zt, mask=torch.zeros(6, dtype=torch.bool))
    assert empty.item() == 0.0


# --------------------------------------------------------------------------- Theorem 1 and KL
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_kl_equals_torch_kl_div(T):
    zs, zt = make_logits(8, 11, seed=3)
    got = kl_loss(zs, zt, temperature=T)
    want = F.kl_div(F.log_softmax(zs / T, dim=1), F.softmax(zt / T, dim=1), reduction="batchmean")
    assert_close64(got, want)
    for g_got, g_want in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(g_got, g_want)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 10.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_theorem1_dkl_gradients_equal_kl(T, reduction):
    zs, zt = make_logits(6, 13, seed=int(T * 10))
    g_dkl = grads(dkl_loss(zs, zt, alpha=1.0, beta=1.0, temperature=T, reduction=reduction), zs, zt)
    g_kl = grads(kl_loss(zs, zt, temperature=T, reduction=reduction), zs, zt)
    for a, b in zip(g_dkl, g_kl):
        assert_close64(a, b)


def test_dkl_is_asymmetric():
    """wMSE moves only z_t and sCE only z_s: with β = 0 the target gets nothing."""
    zs, zt = make_logits(4, 6)
    g_s, g_t = grads(dkl_loss(zs, zt, alpha=1.0, beta=0.0, temperature=2.0), zs, zt)
    assert torch.all(g_t == 0) and g_s.abs().sum() > 0
    g_s, g_t = grads(dkl_loss(zs, zt, alpha=0.0, beta=1.0, temperature=2.0), zs, zt)
    assert torch.all(g_s == 0) and g_t.abs().sum() > 0


def test_dkl_matches_pairwise_value():
    zs, zt = make_logits(4, 9)
    T, alpha, beta = 3.0, 2.0, 0.7
    ut, us = zt / T, zs / T
    w = torch.softmax(ut.detach(), dim=1)
    want = beta * pairwise_wmse(ut, us, w) - alpha * (w * torch.log_softmax(us, dim=1)).sum(1)
    assert_close64(dkl_loss(zs, zt, alpha=alpha, beta=beta, temperature=T, reduction="none"), want)


# --------------------------------------------------------------------------- autograd, modules
def test_gradcheck_float64():
    """Finite differences see through stop-gradients, so each check holds the detached parts fixed:
    the target (which sets the weights) is a constant, or the weights are given and α = 0."""
    zs, zt = make_logits(3, 5, scale=1.0)
    zt_const = zt.detach()
    cw = torch.rand(3, 5, dtype=torch.float64)
    checks = [
        (
            lambda a: ikl_loss(
                a, zt_const, alpha=1.5, beta=3.0, temperature=2.0, weight_temperature=3.0
            ),
            (zs,),
        ),
        (
            lambda a, b: ikl_loss(a, b, alpha=0.0, beta=2.0, class_weights=cw, reduction="none"),
            (zs, zt),
        ),
        (lambda a: dkl_loss(a, zt_const, beta=0.0, temperature=2.0), (zs,)),
        (lambda a, b: kl_loss(a, b, temperature=3.0), (zs, zt)),
        (lambda a, b: dkl.weighted_mse(b, a, cw), (zs, zt)),
    ]
    for f, inputs in checks:
        assert torch.autograd.gradcheck(f, inputs)


def test_module_equals_function():
    zs, zt = make_logits(4, 6)
    cw = torch.rand(4, 6, dtype=torch.float64)
    kw = {
        "alpha": 2.0,
        "beta": 5.0,
        "temperature": 4.0,
        "weight_temperature": 100.0,
        "reduction": "sum",
    }
    assert_close64(IKLLoss(**kw)(zs, zt, cw), ikl_loss(zs, zt, class_weights=cw, **kw))
    assert_close64(
        DKLLoss(alpha=2.0, beta=3.0, temperature=2.0)(zs, zt),
        dkl_loss(zs, zt, alpha=2.0, beta=3.0, temperature=2.0),
    )
    assert_close64(
        KLLoss(temperature=2.0, reduction="none")(zs, zt),
        kl_loss(zs, zt, temperature=2.0, reduction="none"),
    )
    assert "beta=5.0" in repr(IKLLoss(**kw))


def test_compile_equals_eager():
    zs, zt = make_logits(8, 10, dtype=torch.float32)

    def step(a, b):
        return ikl_loss(a, b, alpha=1.0, beta=4.0, temperature=4.0, weight_temperature=2.0)

    compiled = torch.compile(step, fullgraph=False)
    eager_val = step(zs, zt)
    comp_val = compiled(zs, zt)
    torch.testing.assert_close(comp_val, eager_val, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(comp_val, zs, zt), grads(eager_val, zs, zt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dtypes and range
# Half inputs are computed in float32: the only error left is the rounding of the logits
# themselves to the half format (bf16 keeps 8 bits of mantissa, fp16 11).
HALF_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_tolerance_of_float32(dtype):
    zs, zt = make_logits(16, 100, dtype=torch.float32, scale=2.0)
    ref = ikl_loss(zs, zt, beta=2.0, temperature=4.0)
    zs_h = zs.detach().to(dtype).requires_grad_()
    zt_h = zt.detach().to(dtype).requires_grad_()
    got = ikl_loss(zs_h, zt_h, beta=2.0, temperature=4.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=HALF_TOL[dtype], atol=0)
    g_got = grads(got, zs_h)[0]
    assert g_got.dtype == dtype
    torch.testing.assert_close(
        g_got.float(), grads(ref, zs)[0], rtol=HALF_TOL[dtype] * 4, atol=1e-3
    )


def test_float32_and_float64_keep_their_dtype():
    for dtype in (torch.float32, torch.float64):
        zs, zt = make_logits(2, 3, dtype=dtype)
        assert ikl_loss(zs, zt).dtype == dtype
        assert kl_loss(zs, zt).dtype == dtype


def test_under_autocast_matches_float32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    zt = torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = ikl_loss(logits, zt, beta=2.0)
    assert loss.dtype == torch.float32
    want = ikl_loss(logits.detach().float(), zt, beta=2.0)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_large_logits_stay_finite():
    g = torch.Generator().manual_seed(0)
    zs = (1e4 * torch.randn(4, 50, generator=g)).requires_grad_()
    zt = (1e4 * torch.randn(4, 50, generator=g)).requires_grad_()
    for loss in (
        ikl_loss(zs, zt, beta=1.0, temperature=4.0),
        kl_loss(zs, zt),
        dkl_loss(zs, zt, temperature=4.0),
    ):
        assert torch.isfinite(loss)
        gs, gt = grads(loss, zs, zt)
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    # the closed form stays accurate against the float64 pairwise oracle at that scale
    z64s, z64t = zs.detach().double(), zt.detach().double()
    want = pairwise_ikl(z64s, z64t, 1.0, 1.0, 4.0, 1.0).mean()
    got = ikl_loss(z64s, z64t, temperature=4.0)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-9)


@pytest.mark.parametrize(
    "kind,T",
    [(k, T) for k in ("ikl", "ikl_gi") for T in (1.0, 3.0, 4.0, 16.0, 20.0, 100.0)]
    # DKL at T = 100: its gradients (q - p) / T cancel to 1e-5 of p, beyond float32's reach
    + [("dkl", T) for T in (1.0, 3.0, 4.0, 16.0, 20.0)],
)
def test_float32_keeps_its_precision_with_logits_at_different_levels(kind, T):
    """Teacher logits hundreds of units above the student's, by a different amount in each row:
    the wMSE is shift-invariant, and the float32 loss, gradients and second derivatives (a
    Hessian-vector product) stay within float32's precision of the float64 pairwise oracle, with
    softmax weights or class weights (GI), below and above the temperature where the raw gaps
    replace the log-softmax ones, at temperatures that are not powers of 2 (a closed form on
    uncentred gaps loses it all; z_t - z_s or z / T taken directly keep only ulp(500) = 3e-5 of
    each gap)."""
    g = torch.Generator().manual_seed(1)
    zs = 3.0 * torch.randn(16, 40, generator=g)
    zt = zs + torch.randn(16, 40, generator=g) + 500.0 * torch.rand(16, 1, generator=g)
    cw = torch.rand(16, 40, generator=g) if kind == "ikl_gi" else None
    kw = {"alpha": 1.0, "beta": 8.0, "temperature": T}
    if kind != "dkl":
        kw.update(weight_temperature=100.0, class_weights=cw)
    fn = dkl_loss if kind == "dkl" else ikl_loss
    v = torch.randn(16, 40, generator=g)

    def gradients_and_hvp(loss, s, t):
        gs, gt = torch.autograd.grad(loss, (s, t), create_graph=True)
        (hv,) = torch.autograd.grad((gs * v.to(gs.dtype)).sum(), s)
        return gs.detach(), gt.detach(), hv

    s32, t32 = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    got = fn(s32, t32, **kw)
    got_grads = torch.autograd.grad(got, (s32, t32))  # the fast path (no second derivative)
    got_hv = gradients_and_hvp(fn(s32, t32, **kw), s32, t32)[2]
    s64, t64 = zs.double().requires_grad_(), zt.double().requires_grad_()
    if kind == "dkl":
        ut, us = t64 / T, s64 / T
        w = torch.softmax(ut.detach(), dim=1)
        wmse = pairwise_wmse(ut, us.detach(), w)
        want = (8.0 * wmse - (w * torch.log_softmax(us, dim=1)).sum(1)).mean()
    else:
        want = pairwise_ikl(s64, t64, 1.0, 8.0, T, 100.0, None if cw is None else cw.double())
        want = want.mean()
    *want_grads, want_hv = gradients_and_hvp(want, s64, t64)
    assert math.isclose(got.item(), want.item(), rel_tol=2e-6)
    for a, b in (*zip(got_grads, want_grads), (got_hv, want_hv)):
        assert (a.double() - b).abs().max() <= 4e-6 * b.abs().max()


@pytest.mark.parametrize("loss", ["kl", "ikl", "dkl", "gkl"])
def test_second_backward_with_retain_graph_gives_the_same_gradient(loss):
    """A graph kept with ``retain_graph`` and differentiated again gives the same gradient (the
    first backward hands its buffers to autograd; the second recomputes them)."""
    g = torch.Generator().manual_seed(2)
    zs = (3 * torch.randn(6, 11, generator=g)).requires_grad_()
    zt = 3 * torch.randn(6, 11, generator=g)
    fn = {"kl": kl_loss, "ikl": ikl_loss, "dkl": dkl_loss, "gkl": dkl.gkl_loss}[loss]
    out = fn(zs, zt, temperature=4.0)
    first = torch.autograd.grad(out, zs, retain_graph=True)[0]
    second = torch.autograd.grad(out, zs)[0]
    assert torch.equal(first, second)
    if loss == "kl":  # against torch's own KL
        ref = F.kl_div(
            F.log_softmax(zs / 4, 1),
            F.log_softmax(zt / 4, 1),
            log_target=True,
            reduction="batchmean",
        )
        torch.testing.assert_close(first, torch.autograd.grad(ref, zs)[0])


@pytest.mark.parametrize("loss", ["kl", "ikl", "dkl", "gkl"])
def test_batched_vector_jacobian_products_match_the_oracle(loss):
    """Jacobians through batched upstream gradients (``jacobian(vectorize=True)``, which uses
    ``is_grads_batched``, and ``torch.func.vmap`` over ``autograd.grad``) against a plain-autograd
    reference: the backward must not scale its buffers in place then."""
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(3, 5, generator=g, dtype=torch.float64)
    zt = torch.randn(3, 5, generator=g, dtype=torch.float64)
    T = 2.0
    p = torch.softmax(zt / T, dim=1)
    if loss == "kl":
        fn = kl_loss

        def ref(x):
            return (p * (torch.log_softmax(zt / T, 1) - torch.log_softmax(x / T, 1))).sum(1)
    elif loss == "ikl":
        fn = ikl_loss

        def ref(x):
            return pairwise_ikl(x, zt, 1.0, 1.0, T, 1.0)
    elif loss == "dkl":  # the input gets the sCE alone (Theorem 1)
        fn = dkl_loss

        def ref(x):
            return -(p * torch.log_softmax(x / T, 1)).sum(1)
    else:  # softmax weights sum to 1 in every row: GKL's batch normaliser is 1
        fn = dkl.gkl_loss
        w = torch.softmax(zt, 1)

        def ref(x):
            return pairwise_wmse(zt, x, w) - (p * torch.log_softmax(x / T, 1)).sum(1)

    def f(x):
        return fn(x, zt, temperature=T, reduction="none")

    want = torch.autograd.functional.jacobian(ref, zs)
    for vectorize in (False, True):
        got = torch.autograd.functional.jacobian(f, zs, vectorize=vectorize)
        assert_close64(got, want)
    x = zs.clone().requires_grad_()
    out = f(x)
    eye = torch.eye(3, dtype=torch.float64)
    got = torch.func.vmap(lambda v: torch.autograd.grad(out, x, v, retain_graph=True)[0])(eye)
    assert_close64(got, want)


def test_remembered_hyperparameters_still_refuse_a_bool():
    """Numbers that passed once are remembered; ``True`` equals 1 as a key, and is refused all
    the same."""
    z = torch.zeros(2, 3)
    ikl_loss(z, z, beta=1)
    with pytest.raises(TypeError, match="beta"):
        ikl_loss(z, z, beta=True)


# --------------------------------------------------------------------------- errors
def _err(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_errors_name_what_was_expected():
    z = torch.zeros(8, 100)
    _err(
        ValueError,
        r"Expected target of shape \(B, C\) = \(8, 100\) like input, got \(8, 10\)",
        ikl_loss,
        z,
        torch.zeros(8, 10),
    )
    _err(
        ValueError,
        r"Expected input of shape \(B, C\), got \(8,\)",
        kl_loss,
        torch.zeros(8),
        torch.zeros(8),
    )
    _err(
        TypeError,
        r"Expected floating-point input logits, got torch.int64",
        dkl_loss,
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
    )
    _err(TypeError, r"Expected target to be a torch.Tensor", ikl_loss, z, [[0.0]])
    _err(ValueError, r"Unknown reduction 'avg'", ikl_loss, z, z, reduction="avg")
    _err(ValueError, r"Unknown reduction 'avg'", IKLLoss, reduction="avg")
    _err(
        ValueError,
        r"Expected at least 2 classes \(C >= 2\), got C = 1",
        ikl_loss,
        torch.zeros(3, 1),
        torch.zeros(3, 1),
    )
    _err(ValueError, r"Expected temperature > 0, got 0", ikl_loss, z, z, temperature=0)
    _err(
        ValueError,
        r"Expected weight_temperature > 0, got -1",
        ikl_loss,
        z,
        z,
        weight_temperature=-1,
    )
    _err(
        ValueError,
        r"Expected class_weights of shape \(B, C\) = \(8, 100\), got \(100, 100\)",
        ikl_loss,
        z,
        z,
        class_weights=torch.ones(100, 100),
    )
    bad = torch.ones(8, 100)
    bad[0, 0] = -0.1
    _err(ValueError, r"Expected non-negative class_weights", ikl_loss, z, z, class_weights=bad)
    _err(
        ValueError,
        r"Expected mask of shape \(B,\) = \(8,\), got \(7,\)",
        ikl_loss,
        z,
        z,
        mask=torch.ones(7, dtype=torch.bool),
    )
    _err(TypeError, r"Expected mask to be a bool tensor", ikl_loss, z, z, mask=torch.ones(8))
    _err(ValueError, r"Unknown impl 'cuda'", ikl_loss, z, z, impl="cuda")
    for module in (KLLoss, DKLLoss, IKLLoss):  # refused when the module is built, not at its call
        _err(ValueError, r"Unknown impl 'cuda'", module, impl="cuda")


def test_error_different_devices():
    meta = torch.zeros(8, 100, device="meta")
    _err(
        ValueError,
        r"Expected input and target on the same device, got cpu and meta",
        ikl_loss,
        torch.zeros(8, 100),
        meta,
    )
