"""GKL (the authors' DKLv2) against its pairwise B×C×C definition in float64.

The oracle is written the way the authors' code computes it: pair weights
``p_n = p_ij p_ik`` with ``p = w ** gamma``, ``0.25 * ((Δ_t - Δ_s)² p_n).sum() / p_n.sum()`` over the
whole batch, plus the batch mean of the tempered soft-label cross-entropy.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dkl
from dkl import GKLLoss, gkl_loss, ikl_loss


def pairwise_gkl(zs, zt, *, alpha, beta, gamma, T, T2, class_weights=None):
    """The authors' formula, batch-normalised, with B×C×C tensors."""
    if class_weights is not None:
        p = class_weights.detach().pow(gamma)
    else:
        p = F.softmax(zt.detach() / T2, dim=1).pow(gamma)
    p_n = p[:, :, None] * p[:, None, :]
    delta_t = zt[:, :, None] - zt[:, None, :]
    delta_s = zs[:, :, None] - zs[:, None, :]
    wmse = 0.25 * ((delta_t - delta_s) ** 2 * p_n).sum() / p_n.sum()
    sce = -(F.softmax(zt.detach() / T, dim=1) * F.log_softmax(zs / T, dim=1)).sum(1).mean()
    return beta * wmse + alpha * sce


def make(B=5, C=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).requires_grad_()
    zt = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).requires_grad_()
    prior = torch.rand(B, C, generator=g, dtype=torch.float64)
    prior = prior / prior.sum(1, keepdim=True)  # ClassPrior rows are distributions
    return zs, zt, prior


def assert_close64(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def grads(out, *xs):
    return torch.autograd.grad(out.sum(), xs)


GRID = list(
    itertools.product(
        [0.0, 1.0, 4.0],  # alpha
        [0.0, 1.0, 16.0],  # beta
        [0.05, 0.3, 1.0],  # gamma
        [1.0, 4.0],  # T
        ["prior", "sample"],  # weights
    )
)


@pytest.mark.parametrize("alpha,beta,gamma,T,weights", GRID)
def test_gkl_matches_pairwise_formula(alpha, beta, gamma, T, weights):
    zs, zt, prior = make(seed=int(gamma * 100) + int(T))
    kw = {"alpha": alpha, "beta": beta, "gamma": gamma, "temperature": T, "weight_temperature": 2.0}
    cw = prior if weights == "prior" else None
    got = gkl_loss(zs, zt, class_weights=cw, **kw)
    want = pairwise_gkl(zs, zt, alpha=alpha, beta=beta, gamma=gamma, T=T, T2=2.0, class_weights=cw)
    assert_close64(got, want)
    # both gradients: the teacher side requires grad here (adversarial training)
    for a, b in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(a, b)


@pytest.mark.parametrize("B,C", [(1, 2), (2, 3), (9, 2), (3, 101)])
def test_gkl_odd_shapes(B, C):
    zs, zt, prior = make(B, C, seed=C)
    kw = {"alpha": 1.0, "beta": 16.0, "gamma": 0.05, "temperature": 4.0}
    got = gkl_loss(zs, zt, class_weights=prior, **kw)
    want = pairwise_gkl(
        zs, zt, alpha=1.0, beta=16.0, gamma=0.05, T=4.0, T2=1.0, class_weights=prior
    )
    assert_close64(got, want)
    for a, b in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(a, b)


def test_reductions_and_mask():
    zs, zt, prior = make(B=6)
    kw = {"alpha": 2.0, "beta": 3.0, "gamma": 0.3, "temperature": 4.0, "class_weights": prior}
    rows = gkl_loss(zs, zt, reduction="none", **kw)
    assert rows.shape == (6,)
    assert_close64(rows.mean(), gkl_loss(zs, zt, **kw))
    assert_close64(rows.sum(), gkl_loss(zs, zt, reduction="sum", **kw))
    # with a mask: the authors' value on the valid rows alone, normalisation included
    mask = torch.tensor([True, False, True, True, False, True])
    got = gkl_loss(zs, zt, mask=mask, **kw)
    keep = mask.nonzero().squeeze(1)
    want = pairwise_gkl(
        zs[keep], zt[keep], alpha=2.0, beta=3.0, gamma=0.3, T=4.0, T2=1.0, class_weights=prior[keep]
    )
    assert_close64(got, want)
    gs, gt = grads(got, zs, zt)
    ws, wt = grads(want, zs, zt)
    assert_close64(gs, ws)
    assert_close64(gt, wt)
    assert torch.all(gs[~mask] == 0) and torch.all(gt[~mask] == 0)
    none = gkl_loss(zs, zt, mask=mask, reduction="none", **kw)
    assert torch.all(none[~mask] == 0)
    assert_close64(none[mask].mean(), got)


def test_scale_of_the_weights_does_not_matter():
    """The point of the normalisation: c·w gives the same loss for any c > 0."""
    zs, zt, prior = make()
    kw = {"alpha": 1.0, "beta": 4.0, "gamma": 0.5}
    ref = gkl_loss(zs, zt, class_weights=prior, **kw)
    assert_close64(gkl_loss(zs, zt, class_weights=prior * 37.0, **kw), ref)


def test_one_row_is_ikl_over_the_squared_weight_total():
    """B = 1, γ = 1: the normaliser is W² = (Σ_j w_j)², so GKL's wMSE is IKL's divided by it."""
    zs, zt, prior = make(B=1)
    w = prior * 3.0
    gkl = gkl_loss(zs, zt, alpha=0.0, beta=1.0, gamma=1.0, class_weights=w)
    ikl = ikl_loss(zs, zt, alpha=0.0, beta=1.0, class_weights=w)
    assert_close64(gkl, ikl / w.sum() ** 2)


def test_gamma_zero_weighs_the_positive_classes_equally():
    zs, zt, prior = make()
    prior = prior.clone()
    prior[0, :3] = 0.0  # zero weight stays zero at γ = 0 (torch.pow would give 0**0 = 1)
    got = gkl_loss(zs, zt, gamma=0.0, class_weights=prior)
    want = pairwise_gkl(
        zs, zt, alpha=1.0, beta=1.0, gamma=1.0, T=1.0, T2=1.0, class_weights=(prior > 0).double()
    )
    assert_close64(got, want)
    # per-sample weights at γ = 0: every class weighs 1
    got = gkl_loss(zs, zt, gamma=0.0)
    want = pairwise_gkl(
        zs, zt, alpha=1.0, beta=1.0, gamma=1.0, T=1.0, T2=1.0, class_weights=torch.ones_like(prior)
    )
    assert_close64(got, want)


def test_zero_weights_leave_only_the_sce():
    zs, zt, _ = make()
    zero = torch.zeros(5, 7, dtype=torch.float64)
    got = gkl_loss(zs, zt, alpha=2.0, beta=5.0, temperature=3.0, class_weights=zero)
    sce = -(F.softmax(zt.detach() / 3.0, 1) * F.log_softmax(zs / 3.0, 1)).sum(1).mean()
    assert_close64(got, 2.0 * sce)
    assert torch.all(grads(got, zt)[0] == 0)


def test_neg_inf_target_classes_drop_out_of_the_pairs():
    """Ruled-out classes leave numerator and denominator: the formula on the finite classes."""
    zs, zt, prior = make(B=3)
    zt = zt.detach().clone()
    zt[0, 0] = float("-inf")
    zt[2, 3:] = float("-inf")
    zt.requires_grad_()
    kw = {"alpha": 1.0, "beta": 4.0, "gamma": 0.3, "temperature": 2.0}
    got = gkl_loss(zs, zt, class_weights=prior, **kw)
    num, den, sce = 0.0, 0.0, 0.0
    for i in range(3):
        keep = torch.isfinite(zt[i]).nonzero().squeeze(1)
        p = prior[i, keep].pow(0.3)
        p_n = p[:, None] * p[None, :]
        t, s = zt[i, keep], zs[i, keep]
        d = (t[:, None] - t[None, :]) - (s[:, None] - s[None, :])
        num = num + 0.25 * (d**2 * p_n).sum()
        den = den + p_n.sum()
        q = F.log_softmax(zs[i] / 2.0, 0)[keep]
        sce = sce - (F.softmax(t.detach() / 2.0, 0) * q).sum()
    want = 4.0 * num / den + sce / 3
    assert_close64(got, want)
    for a, b in zip(grads(got, zs, zt), grads(want, zs, zt)):
        assert_close64(a, b)


def test_gradcheck_float64():
    zs, zt, prior = make(B=3, C=4, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda a, b: gkl_loss(a, b, alpha=0.0, beta=2.0, gamma=0.3, class_weights=prior),
        (zs, zt),
    )
    zt_const = zt.detach()
    assert torch.autograd.gradcheck(
        lambda a: gkl_loss(
            a, zt_const, alpha=1.5, beta=2.0, gamma=0.5, temperature=2.0, weight_temperature=3.0
        ),
        (zs,),
    )


def test_module_equals_function_and_is_exported():
    zs, zt, prior = make()
    kw = {"alpha": 1.0, "beta": 16.0, "gamma": 0.05, "temperature": 4.0, "weight_temperature": 4.0}
    module = GKLLoss(reduction="sum", **kw)
    assert_close64(
        module(zs, zt, prior), gkl_loss(zs, zt, class_weights=prior, reduction="sum", **kw)
    )
    assert "gamma=0.05" in repr(module)
    assert "gkl_loss" in dkl.__all__ and "GKLLoss" in dkl.__all__


def test_half_inputs_compute_in_float32():
    zs, zt, prior = make(B=8, C=20, scale=2.0)
    ref = gkl_loss(zs.float(), zt.float(), beta=4.0, gamma=0.3, class_weights=prior.float())
    zs_h = zs.detach().to(torch.bfloat16).requires_grad_()
    got = gkl_loss(
        zs_h, zt.detach().to(torch.bfloat16), beta=4.0, gamma=0.3, class_weights=prior.float()
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=0)
    got.backward()
    assert zs_h.grad.dtype == torch.bfloat16


def test_bad_arguments():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"Expected gamma >= 0, got -1"):
        gkl_loss(z, z, gamma=-1)
    with pytest.raises(
        ValueError, match=r"Expected class_weights of shape \(B, C\) = \(2, 3\), got \(3, 3\)"
    ):
        gkl_loss(z, z, class_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"Expected non-negative class_weights"):
        gkl_loss(z, z, class_weights=-torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"Unknown reduction 'batchmean'"):
        GKLLoss(reduction="batchmean")


@pytest.mark.parametrize("scale", [1e20, 1e36])
def test_gradients_at_huge_finite_logits_equal_the_pairwise_form(scale):
    """float32 logits of 1e20 and 1e36 whose loss is finite: value and student gradient equal
    the float64 pairwise form (the gradient was NaN at 1e36 where the loss is 3e36)."""
    zs, zt, _ = make(B=3, C=6, seed=5)
    kw = {"alpha": 1.0, "beta": 1.0, "gamma": 0.5}
    s32 = (zs.detach() * scale).float().requires_grad_()
    t32 = (zt.detach() * scale).float()
    got = gkl_loss(s32, t32, temperature=1.0, **kw)
    s64 = s32.detach().double().requires_grad_()
    want = pairwise_gkl(s64, t32.double(), T=1.0, T2=1.0, **kw)
    assert torch.isfinite(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
    (got_g,) = grads(got, s32)
    (want_g,) = grads(want, s64)
    assert torch.isfinite(got_g).all()
    torch.testing.assert_close(
        got_g.double(), want_g, rtol=1e-5, atol=1e-6 * want_g.abs().max().item()
    )
