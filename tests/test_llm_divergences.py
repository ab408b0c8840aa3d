"""The reverse KL and the generalised JSD of dkl.llm (chunked and top-k), and the kind registry.

The oracle is independent of the code under test: materialised float64 logits, the divergences
written out with torch.log_softmax / F.kl_div (the JSD as TRL's GKDTrainer defines it: mixture
m = beta p + (1 - beta) q, beta KL(p || m) + (1 - beta) KL(q || m), with beta = 0 / 1 taken as
forward / reverse KL), plain autograd through all of it, and numerical gradients (gradcheck).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dkl.llm import (
    DIVERGENCE_HYPERPARAMETERS,
    DIVERGENCES,
    fused_linear_divergence,
    fused_linear_ikl,
    fused_linear_jsd,
    fused_linear_kl,
    fused_linear_reverse_kl,
    topk_jsd_loss,
    topk_logprobs,
    topk_reverse_kl_loss,
)

INF = math.inf


# ------------------------------------------------------------------------------- the oracle
def _kl(log_a, log_b):
    """KL(a || b) per row from log-probabilities, through F.kl_div: in log space as TRL has it
    (finite gradients where a probability underflows), or with xlogy (a = 0 classes count 0)
    where ``a`` has zero-probability classes."""
    if torch.isinf(log_a).any():
        return F.kl_div(log_b, log_a.exp(), reduction="none").sum(1)
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(1)


def _kl_rows(zs, zt, T):
    """KL(p || q) per row."""
    return _kl(torch.log_softmax(zt / T, 1), torch.log_softmax(zs / T, 1))


def _rkl_rows(zs, zt, T):
    """KL(q || p) per row."""
    return _kl(torch.log_softmax(zs / T, 1), torch.log_softmax(zt / T, 1))


def _jsd_rows(zs, zt, T, beta):
    """TRL's generalised JSD, written out: beta = 0 / 1 are forward / reverse KL."""
    if beta == 0:
        return _kl_rows(zs, zt, T)
    if beta == 1:
        return _rkl_rows(zs, zt, T)
    log_q, log_p = torch.log_softmax(zs / T, 1), torch.log_softmax(zt / T, 1)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), 0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _rows(kind, zs, zt, T, beta=None):
    if kind == "reverse_kl":
        return _rkl_rows(zs, zt, T)
    if kind == "jsd":
        return _jsd_rows(zs, zt, T, beta)
    return _kl_rows(zs, zt, T)


def _transform(z, scale=1.0, cap=None):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _problem(N=13, Hs=6, Ht=8, V=11, Vt=None, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Vt = Vt or V

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    p = {
        "hs": r(N, Hs).requires_grad_(True),
        "ws": r(V, Hs, s=0.7).requires_grad_(True),
        "bs": r(V, s=0.3).requires_grad_(True),
        "ht": r(N, Ht),
        "wt": r(Vt, Ht, s=0.7),
        "bt": r(Vt, s=0.3),
    }
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    p["labels"] = labels
    return p


def _teacher_logits(p, t_tf=(1.0, None)):
    V = p["ws"].shape[0]
    z = F.linear(p["ht"].double(), p["wt"][:V].double(), p["bt"][:V].double())
    return _transform(z, *t_tf)


def _reference(
    p,
    kind,
    *,
    T,
    beta=None,
    zt=None,
    ce_weight=0.0,
    reduction="mean",
    upstream=None,
    s_tf=(1.0, None),
    t_tf=(1.0, None),
    masked=True,
):
    """Loss and grads (hidden, weight, bias) from materialised float64 logits."""
    dbl = [p[k].detach().double().requires_grad_(True) for k in ("hs", "ws", "bs")]
    zs = _transform(F.linear(*dbl), *s_tf)
    zt = _teacher_logits(p, t_tf) if zt is None else zt.double()
    rows = _rows(kind, zs, zt, T, beta)
    if ce_weight:
        rows = rows + ce_weight * F.cross_entropy(zs, p["labels"].clamp_min(0), reduction="none")
    mask = p["labels"] != -100 if masked else torch.ones_like(p["labels"], dtype=torch.bool)
    rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        out, total = rows, (rows * upstream.double()).sum()
    else:
        out = rows.sum() / (mask.sum().clamp_min(1) if reduction == "mean" else 1)
        total = out * (1.0 if upstream is None else upstream)
    return out.detach(), torch.autograd.grad(total, dbl)


def _assert_close(p, loss, ref, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(loss.double(), ref[0], rtol=rtol, atol=atol)
    for name, want in zip(("hs", "ws", "bs"), ref[1]):
        assert p[name].grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(p[name].grad.double(), want, rtol=rtol, atol=atol, msg=name)


def _fn(kind, beta):
    if kind == "jsd":
        return lambda *a, **kw: fused_linear_jsd(*a, beta=beta, **kw)
    return fused_linear_reverse_kl if kind == "reverse_kl" else fused_linear_kl


def _call(kind, p, *, beta=None, masked=True, **kw):
    kw = {"student_bias": p["bs"], "teacher_bias": p["bt"], **kw}
    if masked:
        kw["labels"] = p["labels"]
    return _fn(kind, beta)(p["hs"], p["ws"], p["ht"], p["wt"], **kw)


CASES = [("reverse_kl", None), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9), ("jsd", 1.0)]


# ------------------------------------------------------------------------------- values, gradients
@pytest.mark.parametrize(("kind", "beta"), CASES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_value_and_gradients_match_the_materialised_float64_reference(kind, beta, T):
    p = _problem(seed=1)
    ref = _reference(p, kind, T=T, beta=beta)
    loss = _call(kind, p, beta=beta, temperature=T, chunk_size=5)  # 5 does not divide 13
    loss.backward()
    _assert_close(p, loss, ref)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5)])
def test_float32_inputs_agree_with_the_float64_reference(kind, beta):
    p = _problem(seed=2, dtype=torch.float32)
    ref = _reference(p, kind, T=2.0, beta=beta, ce_weight=0.3)
    loss = _call(kind, p, beta=beta, temperature=2.0, ce_weight=0.3, chunk_size=4)
    assert loss.dtype == torch.float32
    loss.backward()
    _assert_close(p, loss, ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_beta_zero_and_one_are_forward_and_reverse_kl(T):
    p = _problem(seed=3)
    zs, zt = F.linear(p["hs"], p["ws"], p["bs"]).detach(), _teacher_logits(p)
    mask = p["labels"] != -100
    for beta, oracle, sibling in ((0.0, _kl_rows, fused_linear_kl), (1.0, _rkl_rows, None)):
        got = _call("jsd", p, beta=beta, temperature=T, reduction="none")
        torch.testing.assert_close(got, torch.where(mask, oracle(zs, zt, T), 0.0))
        sibling = sibling or fused_linear_reverse_kl
        same = sibling(
            p["hs"],
            p["ws"],
            p["ht"],
            p["wt"],
            temperature=T,
            labels=p["labels"],
            student_bias=p["bs"],
            teacher_bias=p["bt"],
            reduction="none",
        )
        assert torch.equal(got, same), f"beta = {beta} is not the special case exactly"


def test_jsd_vanishes_at_both_ends_of_the_formula_so_beta_0_and_1_are_special_cases():
    """JSD_beta ~ beta KL(p||q) near 0 and ~ (1 - beta) KL(q||p) near 1 (TRL's jump, documented)."""
    p = _problem(seed=4)
    zs, zt = F.linear(p["hs"], p["ws"], p["bs"]).detach(), _teacher_logits(p)
    kl, rkl = _kl_rows(zs, zt, 1.0).mean(), _rkl_rows(zs, zt, 1.0).mean()
    for beta, want in ((1e-6, 1e-6 * kl), (1 - 1e-6, 1e-6 * rkl)):
        got = _call("jsd", p, beta=beta, temperature=1.0, masked=False).detach()
        torch.testing.assert_close(got, want, rtol=1e-3, atol=0.0)


def test_jsd_is_the_entropy_of_the_mixture_minus_the_mixed_entropies():
    """A second, independent form: H(m) - beta H(p) - (1 - beta) H(q)."""
    p = _problem(seed=5)
    zs, zt = F.linear(p["hs"], p["ws"], p["bs"]).detach(), _teacher_logits(p)
    beta, T = 0.3, 1.7
    q, pt = torch.softmax(zs / T, 1), torch.softmax(zt / T, 1)

    def h(x):
        return -(x * x.log()).sum(1)

    want = h(beta * pt + (1 - beta) * q) - beta * h(pt) - (1 - beta) * h(q)
    got = _call("jsd", p, beta=beta, temperature=T, masked=False, reduction="none")
    torch.testing.assert_close(got.detach(), want)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.4)])
def test_numerical_gradients(kind, beta):
    p = _problem(N=5, Hs=3, Ht=4, V=6, seed=6)

    def f(hs, ws, bs):
        fn = _fn(kind, beta)
        return fn(hs, ws, p["ht"], p["wt"], temperature=1.5, student_bias=bs, chunk_size=2,
                  reduction="none")  # fmt: skip

    assert torch.autograd.gradcheck(f, (p["hs"], p["ws"], p["bs"]))


# ------------------------------------------------------------------------------- reductions, masks
@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5), ("jsd", 1.0)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions_masks_and_hard_ce(kind, beta, reduction):
    p = _problem(seed=7)
    upstream = torch.linspace(-1.0, 2.0, 13, dtype=torch.float64)
    up = upstream if reduction == "none" else 1.7
    ref = _reference(p, kind, T=2.0, beta=beta, ce_weight=0.4, reduction=reduction, upstream=up)
    loss = _call(kind, p, beta=beta, temperature=2.0, ce_weight=0.4, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (13,) and torch.all(loss[p["labels"] == -100] == 0)
        loss.backward(upstream)
    else:
        (loss * 1.7).backward()
    _assert_close(p, loss, ref)
    ignored = p["labels"] == -100
    assert torch.all(p["hs"].grad[ignored] == 0), "an ignored token got a gradient"


def test_token_shape_is_kept_and_all_ignored_gives_zero():
    p = _problem(N=12, seed=8)
    hs = p["hs"].detach().reshape(3, 4, -1).requires_grad_(True)
    rows = fused_linear_jsd(hs, p["ws"], p["ht"].reshape(3, 4, -1), p["wt"], temperature=1.0,
                            reduction="none")  # fmt: skip
    assert rows.shape == (3, 4)
    labels = torch.full((3, 4), -100)
    loss = fused_linear_reverse_kl(hs, p["ws"], p["ht"].reshape(3, 4, -1), p["wt"],
                                   temperature=1.0, labels=labels)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hs.grad == 0)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5)])
def test_return_parts_are_named_and_reduced_like_the_loss(kind, beta):
    p = _problem(seed=9)
    loss, parts = _call(kind, p, beta=beta, temperature=1.0, ce_weight=0.3, return_parts=True)
    name = "rkl" if kind == "reverse_kl" else "jsd"
    assert set(parts) == {name, "ce"}
    div = _reference(p, kind, T=1.0, beta=beta)[0]
    ce = F.cross_entropy(F.linear(p["hs"], p["ws"], p["bs"]).double(), p["labels"])
    torch.testing.assert_close(parts[name], div)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(loss.detach(), div + 0.3 * ce.detach())


# ------------------------------------------------------------------------------- heads, transforms
@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.0)])
def test_softcap_and_logit_scale(kind, beta):
    p = _problem(seed=10)
    with torch.no_grad():
        p["ws"].mul_(4)  # logits of a few tens: the cap bites
    s_tf, t_tf = (0.8, 5.0), (1.25, 7.0)
    ref = _reference(p, kind, T=2.0, beta=beta, s_tf=s_tf, t_tf=t_tf)
    loss = _call(
        kind,
        p,
        beta=beta,
        temperature=2.0,
        chunk_size=6,
        student_logit_scale=s_tf[0],
        student_softcap=s_tf[1],
        teacher_logit_scale=t_tf[0],
        teacher_softcap=t_tf[1],
    )
    loss.backward()
    _assert_close(p, loss, ref)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.7)])
def test_a_larger_teacher_vocabulary_is_cut_to_the_students(kind, beta):
    p = _problem(V=11, Vt=16, seed=11)
    ref = _reference(p, kind, T=1.5, beta=beta)  # the oracle uses the teacher's first 11 rows
    loss = _call(kind, p, beta=beta, temperature=1.5, chunk_size=4)
    loss.backward()
    _assert_close(p, loss, ref)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5)])
def test_peaked_logits_stay_finite_and_exact(kind, beta):
    """Logits in the hundreds: probabilities underflow, the log-space maths does not."""
    p = _problem(seed=12)
    with torch.no_grad():
        p["ws"].mul_(60)
        p["wt"].mul_(60)
    ref = _reference(p, kind, T=1.0, beta=beta)
    loss = _call(kind, p, beta=beta, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_close(p, loss, ref, rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------------------- zero probabilities
def test_jsd_takes_minus_inf_teacher_logits():
    p = _problem(seed=13)
    with torch.no_grad():
        p["bt"][[2, 7]] = -INF  # classes the teacher masks
    for beta in (0.0, 0.5):
        for k in ("hs", "ws", "bs"):
            p[k].grad = None
        ref = _reference(p, "jsd", T=1.3, beta=beta)
        loss = _call("jsd", p, beta=beta, temperature=1.3, chunk_size=4)
        loss.backward()
        assert torch.isfinite(loss)
        _assert_close(p, loss, ref)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 1.0)])
def test_reverse_kl_refuses_a_zero_probability_teacher_class(kind, beta):
    p = _problem(seed=14)
    with torch.no_grad():
        p["bt"][3] = -INF
    with pytest.raises(ValueError, match=r"reverse KL is \+inf there.*topk_tail='uniform'"):
        _call(kind, p, beta=beta, temperature=1.0)


def test_reverse_kl_where_both_mask_a_class_leaves_it_out():
    """Student and teacher both -inf on a class: q = p = 0 there, the class drops out."""
    p = _problem(seed=15)
    with torch.no_grad():
        p["bt"][4] = -INF
        p["bs"][4] = -INF
    keep = [j for j in range(11) if j != 4]
    zs = F.linear(p["hs"], p["ws"][keep], p["bs"][keep]).detach()
    zt = _teacher_logits(p)[:, keep]
    mask = p["labels"] != -100
    for kind, beta in (("reverse_kl", None), ("jsd", 0.5)):
        got = _call(kind, p, beta=beta, temperature=1.0, reduction="none").detach()
        torch.testing.assert_close(got, torch.where(mask, _rows(kind, zs, zt, 1.0, beta), 0.0))


def test_jsd_where_only_the_student_masks_a_class():
    """q = 0 < p on a class: m = beta p there, KL(p || m) gets p log(1 / beta), finite. The
    oracle takes the limit: a student logit of -1e4, whose probability is 0 in float64."""
    p = _problem(seed=23)
    with torch.no_grad():
        p["bs"][5] = -1e4
    ref = _reference(p, "jsd", T=1.0, beta=0.5)
    with torch.no_grad():
        p["bs"][5] = -INF
    loss = _call("jsd", p, beta=0.5, temperature=1.0, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_close(p, loss, ref)
    assert torch.all(p["ws"].grad[5] == 0)


# ------------------------------------------------------------------------------- top-k teachers
def _topk_problem(k, seed=16):
    p = _problem(seed=seed)
    idx, val = topk_logprobs(_teacher_logits(p), k)
    return p, idx, val.double()


def _dense(idx, val, V, tail):
    """The teacher top-k implies, written out: renormalised (-inf outside) or uniform tail."""
    out = torch.full((idx.shape[0], V), -INF, dtype=torch.float64)
    if tail == "uniform":
        mass = 1 - val.exp().sum(1, keepdim=True)
        out[:] = torch.log(mass / (V - idx.shape[1]))
    return out.scatter(1, idx, val)


@pytest.mark.parametrize(
    ("kind", "beta", "tail"),
    [
        ("jsd", 0.5, "renormalize"),
        ("jsd", 0.5, "uniform"),
        ("jsd", 0.0, "renormalize"),
        ("jsd", 1.0, "uniform"),
        ("reverse_kl", None, "uniform"),
    ],
)
def test_topk_teacher_in_the_fused_path(kind, beta, tail):
    p, idx, val = _topk_problem(4)
    ref = _reference(p, kind, T=2.0, beta=beta, zt=_dense(idx, val, 11, tail))
    fn = _fn(kind, beta)
    loss = fn(p["hs"], p["ws"], temperature=2.0, labels=p["labels"], student_bias=p["bs"],
              teacher_topk=(idx, val), topk_tail=tail, chunk_size=5)  # fmt: skip
    loss.backward()
    _assert_close(p, loss, ref)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 1.0)])
def test_topk_renormalized_tail_is_refused_by_the_reverse_kl_unless_k_is_V(kind, beta):
    p, idx, val = _topk_problem(4)
    fn = _fn(kind, beta)
    with pytest.raises(ValueError, match=r"topk_tail='uniform'.*k = 4 < V = 11"):
        fn(p["hs"], p["ws"], temperature=1.0, teacher_topk=(idx, val))
    p, idx, val = _topk_problem(11)  # k = V: the full teacher
    ref = _reference(p, kind, T=1.0, beta=beta, masked=False)
    loss = fn(p["hs"], p["ws"], temperature=1.0, student_bias=p["bs"], teacher_topk=(idx, val))
    loss.backward()
    _assert_close(p, loss, ref, rtol=1e-6, atol=1e-7)  # top-k values went through float32


def test_reverse_kl_refuses_only_the_counted_tokens_without_full_support():
    """k = V but an index past the student's vocabulary (a larger teacher's, dropped) leaves a
    class out: an error on a counted token only."""
    p, idx, val = _topk_problem(11)
    idx = idx.clone()
    idx[0, -1] = 11  # token 0 misses a class
    labels = p["labels"].clone()
    labels[0] = -100
    loss = fused_linear_reverse_kl(p["hs"], p["ws"], temperature=1.0, labels=labels,
                                   teacher_topk=(idx, val))  # fmt: skip
    assert torch.isfinite(loss)
    labels[0] = 1
    with pytest.raises(ValueError, match=r"got 1 token\(s\) with a -inf teacher logit"):
        fused_linear_reverse_kl(p["hs"], p["ws"], temperature=1.0, labels=labels,
                                teacher_topk=(idx, val))  # fmt: skip


def test_reverse_kl_refuses_a_uniform_tail_without_missing_mass():
    """Top-k log-probabilities that already sum to 1 leave the tail probability 0."""
    p, idx, val = _topk_problem(4)
    val = val.log_softmax(1)  # the teacher renormalised to its top-4: no mass left
    with pytest.raises(ValueError, match=r"got \d+ token\(s\) with a -inf teacher logit"):
        fused_linear_reverse_kl(p["hs"], p["ws"], temperature=1.0, teacher_topk=(idx, val),
                                topk_tail="uniform")  # fmt: skip
    loss = fused_linear_jsd(p["hs"], p["ws"], beta=0.5, temperature=1.0,
                            teacher_topk=(idx, val), topk_tail="uniform")  # fmt: skip
    assert torch.isfinite(loss)


def test_a_confident_teachers_missing_mass_keeps_its_digits():
    """float32 top-k log-probabilities of a confident teacher, whose missing mass is 1e-5 to
    1e-9: formed in float32 as 1 - Σ e^v it was up to 3x off (reverse KL 1.2 nats off per
    token) or 0 (the reverse KL refused the teacher). The oracle takes the mass in float64."""
    g = torch.Generator().manual_seed(0)
    V, N, k = 64, 7, 4
    hs, ws = torch.randn(N, 16, generator=g) * 0.3, torch.randn(V, 16, generator=g)
    zt = torch.randn(N, V, generator=g)
    zt[:, 0] += torch.tensor([16.0, 18.0, 19.0, 20.0, 21.0, 23.0, 27.0])
    val, idx = torch.log_softmax(zt.double(), 1).topk(k, 1)
    val = val.float()  # as a float32 cache holds them
    mass = -torch.expm1(torch.logsumexp(val.double(), 1))
    assert float(mass.min()) < 1e-9 and float(mass.max()) > 1e-6
    dense = torch.log(mass / (V - k)).unsqueeze(1).expand(N, V).clone()
    dense.scatter_(1, idx, val.double())
    zs = hs.double() @ ws.double().T
    for kind, beta in (("reverse_kl", None), ("kl", None), ("jsd", 0.5)):
        kw = {"beta": beta} if beta is not None else {}
        got = fused_linear_divergence(kind, hs, ws, temperature=1.0, teacher_topk=(idx, val),
                                      topk_tail="uniform", reduction="none", **kw)  # fmt: skip
        want = _rows(kind, zs, dense, 1.0, beta)
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "beta", "tail"),
    [("jsd", 0.5, "renormalize"), ("jsd", 0.25, "uniform"), ("reverse_kl", None, "uniform")],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_losses_on_logits(kind, beta, tail, reduction):
    g = torch.Generator().manual_seed(17)
    zs = torch.randn(7, 12, generator=g, dtype=torch.float64).requires_grad_(True)
    idx, val = topk_logprobs(torch.randn(7, 12, generator=g) * 2, 5)
    val = val.double()
    mask = torch.tensor([True, True, False, True, True, False, True])
    if kind == "jsd":
        got = topk_jsd_loss(zs, idx, val, beta=beta, temperature=1.5, tail=tail,
                            reduction=reduction, mask=mask)  # fmt: skip
    else:
        got = topk_reverse_kl_loss(zs, idx, val, temperature=1.5, tail=tail,
                                   reduction=reduction, mask=mask)  # fmt: skip
    z = zs.detach().requires_grad_(True)
    rows = torch.where(mask, _rows(kind, z, _dense(idx, val, 12, tail), 1.5, beta), 0.0)
    want = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / mask.sum()}[reduction]
    torch.testing.assert_close(got, want)
    up = torch.linspace(0.5, 2.0, 7, dtype=torch.float64) if reduction == "none" else None
    (g_got,) = torch.autograd.grad(got, zs, up)
    (g_want,) = torch.autograd.grad(want, z, up)
    torch.testing.assert_close(g_got, g_want)


def test_topk_reverse_kl_on_logits_refuses_a_renormalized_tail():
    zs = torch.randn(3, 8)
    idx, val = topk_logprobs(torch.randn(3, 8), 3)
    with pytest.raises(ValueError, match=r"reverse KL is \+inf"):
        topk_reverse_kl_loss(zs, idx, val, tail="renormalize")
    with pytest.raises(ValueError, match=r"reverse KL is \+inf"):
        topk_jsd_loss(zs, idx, val, beta=1.0)
    assert torch.isfinite(topk_jsd_loss(zs, idx, val, beta=0.999))
    mask = torch.tensor([False, False, False])  # no counted token: nothing is infinite
    assert topk_reverse_kl_loss(zs, idx, val, tail="renormalize", mask=mask).item() == 0.0


# ------------------------------------------------------------------------------- the registry
def test_registry_names_every_kind_and_dispatches_to_it():
    assert DIVERGENCES == ("ikl", "kl", "reverse_kl", "jsd")
    assert set(DIVERGENCE_HYPERPARAMETERS) == set(DIVERGENCES)
    p = _problem(seed=18)
    args = (p["hs"], p["ws"], p["ht"], p["wt"])
    zs, zt = F.linear(p["hs"], p["ws"]).detach(), F.linear(p["ht"], p["wt"])
    for kind, hyper, oracle in (
        ("kl", {"temperature": 2.0}, _kl_rows(zs, zt, 2.0)),
        ("reverse_kl", {"temperature": 2.0}, _rkl_rows(zs, zt, 2.0)),
        ("jsd", {"beta": 0.2, "temperature": 2.0}, _jsd_rows(zs, zt, 2.0, 0.2)),
    ):
        got = fused_linear_divergence(kind, *args, **hyper, chunk_size=3)
        torch.testing.assert_close(got, oracle.mean(), msg=kind)
    ikl = {"alpha": 1.0, "beta": 2.0, "temperature": 1.5, "weight_temperature": 1.0}
    torch.testing.assert_close(
        fused_linear_divergence("ikl", *args, **ikl, reduction="sum"),
        fused_linear_ikl(*args, **ikl, reduction="sum"),
    )


def test_registry_errors_name_the_kind_and_the_allowed_keys():
    p = _problem(seed=19)
    args = (p["hs"], p["ws"], p["ht"], p["wt"])
    with pytest.raises(ValueError, match=r"Unknown divergence 'js'.*'reverse_kl', 'jsd'"):
        fused_linear_divergence("js", *args, temperature=1.0)
    with pytest.raises(TypeError, match=r"\['alpha'\] for divergence 'jsd'.*\('beta', 'temp"):
        fused_linear_divergence("jsd", *args, alpha=1.0, temperature=1.0)
    with pytest.raises(TypeError, match="temperature"):
        fused_linear_divergence("reverse_kl", *args)
    for bad in (None, "JSD", "reverse-kl"):
        with pytest.raises(ValueError, match="Unknown divergence"):
            fused_linear_divergence(bad, *args, temperature=1.0)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, math.inf, -math.inf])
def test_beta_outside_the_unit_interval_is_refused(beta):
    p = _problem(seed=20)
    with pytest.raises(ValueError, match=r"Expected beta in \[0, 1\].*got"):
        _call("jsd", p, beta=beta, temperature=1.0)
    with pytest.raises(ValueError, match=r"Expected beta in \[0, 1\]"):
        topk_jsd_loss(torch.randn(2, 5), *topk_logprobs(torch.randn(2, 5), 2), beta=beta)


def test_bad_beta_type_and_temperature_are_refused():
    p = _problem(seed=21)
    with pytest.raises(TypeError, match="Expected beta a number, got str"):
        _call("jsd", p, beta="half", temperature=1.0)
    for T in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="Expected temperature > 0 and finite"):
            _call("reverse_kl", p, temperature=T)


@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", None), ("jsd", 0.5)])
def test_triton_is_refused_and_auto_runs_torch(kind, beta):
    p = _problem(seed=22)
    with pytest.raises(ValueError, match=r"impl='triton' computes ikl and kl only.*'torch'"):
        _call(kind, p, beta=beta, temperature=1.0, impl="triton")
    ref = _reference(p, kind, T=1.0, beta=beta)
    loss = _call(kind, p, beta=beta, temperature=1.0, impl="auto")
    loss.backward()
    _assert_close(p, loss, ref)
