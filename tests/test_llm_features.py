"""dkl.llm beyond the plain chunked IKL: per-token losses, logit transforms, -inf teacher logits,
top-k teachers (and their disk cache), forward KL, parts, empty batches and argument checks.

The oracle is independent of the code under test: materialised float64 logits, IKL's wMSE in the
paper's pairwise form restricted to the classes the teacher gives a probability > 0, the soft CE
and the KL written out, F.kl_div, and autograd through all of it.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from dkl.llm import (
    FusedLinearIKLLoss,
    TopKCache,
    fused_linear_ikl,
    fused_linear_kl,
    gathered_output_head,
    topk_ikl_loss,
    topk_kl_loss,
    topk_logprobs,
)

if os.environ.get("TRITON_INTERPRET") == "1":  # triton picks its mode at import: the interpreter
    with contextlib.suppress(ImportError):
        import triton.language  # noqa: F401


# the fused kernel: compiled on a GPU, or Triton's CPU interpreter (the root conftest.py sets it)
needs_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a GPU or TRITON_INTERPRET=1",
)
HP = {"alpha": 1.5, "beta": 0.5, "temperature": 2.0, "weight_temperature": 1.0}


def _problem(N=13, Hs=6, Ht=8, V=11, *, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    p = {
        "hs": torch.randn(N, Hs, generator=g).requires_grad_(True),
        "ws": (torch.randn(V, Hs, generator=g) * 0.7).requires_grad_(True),
        "bs": (torch.randn(V, generator=g) * 0.3).requires_grad_(True) if bias else None,
        "ht": torch.randn(N, Ht, generator=g),
        "wt": torch.randn(V, Ht, generator=g) * 0.7,
        "bt": torch.randn(V, generator=g) * 0.3,
    }
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    p["labels"] = labels
    return p


def _pairwise_ikl_rows(zs, zt, alpha, beta, temperature, weight_temperature):
    """Per-row IKL in float64: the paper's pairwise wMSE over classes with p > 0, plus sCE."""
    rows = []
    for s, t in zip(zs, zt):
        keep = torch.isfinite(t)
        w = torch.softmax(t[keep] / weight_temperature, 0)
        d = t[keep][:, None] - t[keep][None, :] - (s[keep][:, None] - s[keep][None, :])
        wmse = 0.25 * (w[:, None] * w[None, :] * d**2).sum()
        p = torch.zeros_like(t)
        p[keep] = torch.softmax(t[keep] / temperature, 0)
        sce = -(p * torch.log_softmax(s / temperature, 0)).sum()
        rows.append(beta * wmse + alpha * sce)
    return torch.stack(rows)


def _kl_rows(zs, zt, temperature):
    """Per-row KL(p || q) in float64 through F.kl_div (0 log 0 = 0 there)."""
    p = torch.softmax(zt / temperature, 1)
    return F.kl_div(torch.log_softmax(zs / temperature, 1), p, reduction="none").sum(1)


def _transform(z, scale=1.0, cap=None):
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _reference(
    p,
    *,
    kind="ikl",
    hp=HP,
    ce_weight=0.0,
    reduction="mean",
    upstream=None,
    s_tf=(1.0, None),
    t_tf=(1.0, None),
    zt=None,
):
    """Loss and grads (hidden, weight, bias) from materialised float64 logits."""
    leaves = [p["hs"], p["ws"]] + ([p["bs"]] if p["bs"] is not None else [])
    dbl = [x.detach().double().requires_grad_(True) for x in leaves]
    zs = _transform(F.linear(dbl[0], dbl[1], dbl[2] if len(dbl) == 3 else None), *s_tf)
    if zt is None:
        zt = _transform(F.linear(p["ht"].double(), p["wt"].double(), p["bt"].double()), *t_tf)
    mask = p["labels"] != -100
    if kind == "ikl":
        rows = _pairwise_ikl_rows(zs, zt.double(), **hp)
    else:
        rows = _kl_rows(zs, zt.double(), hp["temperature"])
    if ce_weight:
        rows = rows + ce_weight * F.cross_entropy(zs, p["labels"].clamp_min(0), reduction="none")
    rows = torch.where(mask, rows, 0.0)
    if reduction == "none":
        out = rows
        total = (rows * upstream.double()).sum()
    else:
        out = rows.sum() / (mask.sum().clamp_min(1) if reduction == "mean" else 1)
        total = out * (1.0 if upstream is None else upstream)
    return out.detach(), torch.autograd.grad(total, dbl)


def _grads(p):
    return [p["hs"].grad, p["ws"].grad] + ([p["bs"].grad] if p["bs"] is not None else [])


def _assert_close(p, loss, ref, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(loss.double(), ref[0], rtol=rtol, atol=atol)
    for got, want, name in zip(_grads(p), ref[1], ("hidden", "weight", "bias")):
        assert got is not None, f"no gradient for the student's {name}"
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=name)


def _call(fn, p, **kw):
    kw = {"labels": p["labels"], "student_bias": p["bs"], "teacher_bias": p["bt"], **kw}
    return fn(p["hs"], p["ws"], p["ht"], p["wt"], **kw)


# ------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("chunk_size", [4, 13])
def test_reduction_none_gives_per_token_losses_and_grads(chunk_size):
    p = _problem()
    upstream = torch.linspace(-1.0, 2.0, 13)  # per-token upstream gradients, not all 1
    ref = _reference(p, ce_weight=0.4, reduction="none", upstream=upstream)
    rows = _call(fused_linear_ikl, p, **HP, ce_weight=0.4, reduction="none", chunk_size=chunk_size)
    assert rows.shape == (13,) and torch.all(rows[p["labels"] == -100] == 0)
    rows.backward(upstream)
    _assert_close(p, rows, ref)


def test_reduction_none_keeps_the_token_shape_and_backward_twice_is_fine():
    p = _problem(N=12)
    hs = p["hs"].detach().reshape(3, 4, -1).requires_grad_(True)
    rows = fused_linear_ikl(hs, p["ws"], p["ht"].reshape(3, 4, -1), p["wt"], **HP, reduction="none")
    assert rows.shape == (3, 4)
    rows.sum().backward(retain_graph=True)
    first = hs.grad.clone()
    rows.sum().backward()
    torch.testing.assert_close(hs.grad, 2 * first)


def test_forward_kl_matches_kl_div():
    p = _problem(seed=1)
    ref = _reference(p, kind="kl", hp={"temperature": 3.0}, ce_weight=0.2)
    loss = _call(fused_linear_kl, p, temperature=3.0, ce_weight=0.2, chunk_size=5)
    (loss * 1.7).backward()
    ref = (ref[0], [1.7 * g for g in ref[1]])
    _assert_close(p, loss, ref)


def test_parts_add_up_to_the_loss():
    p = _problem(seed=2)
    loss, parts = _call(fused_linear_ikl, p, **HP, ce_weight=0.3, return_parts=True)
    assert set(parts) == {"wmse", "sce", "ce"}
    combined = HP["beta"] * parts["wmse"] + HP["alpha"] * parts["sce"] + 0.3 * parts["ce"]
    torch.testing.assert_close(loss.detach(), combined)
    ce = F.cross_entropy(
        F.linear(p["hs"], p["ws"], p["bs"]).double(), p["labels"], ignore_index=-100
    )
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-5, atol=1e-6)
    _, kl_parts = _call(fused_linear_kl, p, temperature=1.0, return_parts=True)
    assert set(kl_parts) == {"kl"}


# ------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("kind", ["ikl", "kl"])
def test_softcap_and_logit_scale_gradients_match_materialised(kind):
    p = _problem(seed=3)
    with torch.no_grad():
        p["ws"].mul_(4)  # logits of a few tens: the cap bites
    s_tf, t_tf = (0.8, 5.0), (1.25, 7.0)
    hp = HP if kind == "ikl" else {"temperature": 2.0}
    ref = _reference(p, kind=kind, hp=hp, ce_weight=0.5, s_tf=s_tf, t_tf=t_tf)
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    loss = _call(
        fn,
        p,
        **hp,
        ce_weight=0.5,
        chunk_size=6,
        student_logit_scale=s_tf[0],
        student_softcap=s_tf[1],
        teacher_logit_scale=t_tf[0],
        teacher_softcap=t_tf[1],
    )
    loss.backward()
    _assert_close(p, loss, ref)


def test_softcap_changes_the_objective():
    p = _problem(seed=4)
    plain = _call(fused_linear_ikl, p, **HP).item()
    capped = _call(fused_linear_ikl, p, **HP, student_softcap=0.5, teacher_softcap=0.5).item()
    assert abs(plain - capped) > 1e-3


# ------------------------------------------------------------------------------- -inf, empty
@pytest.mark.parametrize("kind", ["ikl", "kl"])
def test_minus_inf_teacher_logits_are_exact(kind):
    """A -inf teacher bias masks classes: they drop out of the KL and the wMSE, no NaN."""
    p = _problem(seed=5)
    p["bt"][[2, 7, 10]] = -math.inf  # e.g. padded vocabulary entries
    hp = HP if kind == "ikl" else {"temperature": 2.0}
    ref = _reference(p, kind=kind, hp=hp, ce_weight=0.3)
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    loss = _call(fn, p, **hp, ce_weight=0.3, chunk_size=4)
    loss.backward()
    assert math.isfinite(loss.item())
    _assert_close(p, loss, ref)


def test_teacher_row_without_finite_logit_raises_unless_ignored():
    p = _problem(seed=6)
    ht = p["ht"].clone()
    p["wt"] = torch.cat([p["wt"], torch.zeros(1, p["wt"].shape[1])])  # no effect: cut to V
    p["bt"] = torch.full((12,), -math.inf)  # every teacher logit -inf
    p["labels"][:] = -100
    p["labels"][3] = 4
    with pytest.raises(ValueError, match=r"1 token\(s\) whose teacher logits are all -inf"):
        _call(fused_linear_ikl, p, **HP)
    p["labels"][3] = -100  # the only such token ignored: fine (loss 0, like all ignored)
    p["ht"] = ht
    assert _call(fused_linear_ikl, p, **HP).item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_equals_all_ignored(reduction):
    p = _problem(seed=7)
    p["labels"][:] = -100
    ignored = _call(fused_linear_ikl, p, **HP, ce_weight=1.0, reduction=reduction)
    ignored.sum().backward()
    q = _problem(N=0, seed=7)
    empty = _call(fused_linear_ikl, q, **HP, ce_weight=1.0, reduction=reduction)
    empty.sum().backward()
    assert empty.shape == (0,) if reduction == "none" else empty.shape == ()
    assert float(empty.detach().sum()) == 0.0 == float(ignored.detach().sum())
    assert q["hs"].grad.shape == (0, 6) and torch.all(q["ws"].grad == 0)
    assert torch.all(p["ws"].grad == 0) and torch.all(q["bs"].grad == 0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("alpha", -1.0, "Expected alpha >= 0 and finite, got -1.0"),
        ("beta", -0.5, "Expected beta >= 0 and finite, got -0.5"),
        ("temperature", -2.0, "Expected temperature > 0 and finite, got -2.0"),
        ("weight_temperature", 0.0, "Expected weight_temperature > 0 and finite, got 0.0"),
        ("ce_weight", math.nan, "Expected ce_weight >= 0 and finite, got nan"),
        ("beta", math.inf, "Expected beta >= 0 and finite, got inf"),
    ],
)
def test_bad_weights_are_one_line_errors(name, value, message):
    p = _problem()
    kw = {**HP, name: value}
    with pytest.raises(ValueError, match=f"^{message}$"):
        _call(fused_linear_ikl, p, **kw)
    with pytest.raises(ValueError, match=f"^{message}$"):
        FusedLinearIKLLoss(**kw)


def test_bad_transform_and_labels_raise():
    p = _problem()
    with pytest.raises(ValueError, match="softcap > 0"):
        _call(fused_linear_ikl, p, **HP, student_softcap=-1.0)
    with pytest.raises(ValueError, match="logit scale > 0"):
        _call(fused_linear_ikl, p, **HP, teacher_logit_scale=0.0)
    p["labels"][0] = 99
    with pytest.raises(ValueError, match=r"labels in \[0, 11\) or equal to ignore_index"):
        _call(fused_linear_ikl, p, **HP, ce_weight=1.0)


# ------------------------------------------------------------------------------- top-k teachers
def _teacher_logits(p):
    return F.linear(p["ht"], p["wt"], p["bt"])


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("kind", ["ikl", "kl"])
def test_topk_with_k_equal_V_is_the_full_loss(kind, tail):
    p = _problem(seed=8)
    idx, val = topk_logprobs(_teacher_logits(p), 11)
    hp = HP if kind == "ikl" else {"temperature": 2.0}
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    full = _call(fn, p, **hp, ce_weight=0.2)
    full.backward()
    want = [g.clone() for g in _grads(p)]
    q = _problem(seed=8)
    sparse = fn(
        q["hs"],
        q["ws"],
        teacher_topk=(idx, val),
        topk_tail=tail,
        labels=q["labels"],
        student_bias=q["bs"],
        ce_weight=0.2,
        chunk_size=5,
        **hp,
    )
    sparse.backward()
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    for got, w in zip(_grads(q), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    # the materialised form too
    zs = F.linear(q["hs"], q["ws"], q["bs"]).detach()
    mask = q["labels"] != -100
    dense_fn = topk_ikl_loss if kind == "ikl" else topk_kl_loss
    got = dense_fn(zs, idx, val, tail=tail, mask=mask, **hp)
    ref = _reference(q, kind=kind, hp=hp)[0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_topk_from_a_larger_teacher_vocabulary_follows_the_cut_rule(tail):
    """Top-k over a teacher vocabulary of 15 > V = 11: entries >= V are dropped, as the dense
    path cuts the teacher's logits; with all 15 entries that is exactly the dense loss."""
    p = _problem(seed=13)
    g = torch.Generator().manual_seed(1)
    p["wt"] = torch.cat([p["wt"], torch.randn(4, p["wt"].shape[1], generator=g)])
    p["bt"] = torch.cat([p["bt"], torch.randn(4, generator=g)])
    dense = _call(fused_linear_ikl, p, **HP)
    idx, val = topk_logprobs(_teacher_logits(p), 15)
    assert int(idx.max()) >= 11
    sparse = fused_linear_ikl(
        p["hs"], p["ws"], teacher_topk=(idx, val), topk_tail=tail, labels=p["labels"],
        student_bias=p["bs"], **HP,
    )  # fmt: skip
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_topk_renormalize_is_the_loss_of_the_teacher_restricted_to_its_top_k():
    p = _problem(seed=9)
    zt = _teacher_logits(p)
    idx, val = topk_logprobs(zt, 4)
    masked = torch.full_like(zt, -math.inf).scatter(1, idx, zt.gather(1, idx))
    ref = _reference(p, zt=masked, ce_weight=0.1)
    loss = fused_linear_ikl(
        p["hs"],
        p["ws"],
        teacher_topk=(idx, val),
        labels=p["labels"],
        student_bias=p["bs"],
        ce_weight=0.1,
        chunk_size=3,
        **HP,
    )
    loss.backward()
    _assert_close(p, loss, ref)


def test_topk_uniform_tail_spreads_the_missing_mass():
    p = _problem(seed=10)
    logp = torch.log_softmax(_teacher_logits(p).double(), 1)
    idx, val = topk_logprobs(logp.float(), 3)
    mass = 1 - val.double().exp().sum(1, keepdim=True)
    dense = (mass / 8).log().expand(-1, 11).clone().scatter(1, idx, val.double())
    ref = _reference(p, kind="kl", hp={"temperature": 1.0}, zt=dense)
    loss = fused_linear_kl(
        p["hs"],
        p["ws"],
        teacher_topk=(idx, val),
        topk_tail="uniform",
        labels=p["labels"],
        student_bias=p["bs"],
        temperature=1.0,
    )
    loss.backward()
    _assert_close(p, loss, ref, rtol=1e-4, atol=1e-5)


def test_topk_bad_inputs_raise():
    p = _problem()
    idx, val = topk_logprobs(_teacher_logits(p), 3)
    kw = {"labels": p["labels"], **HP}
    with pytest.raises(ValueError, match="either teacher_hidden"):
        fused_linear_ikl(p["hs"], p["ws"], p["ht"], p["wt"], teacher_topk=(idx, val), **kw)
    bad = idx.clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="Expected non-negative top-k indices, got -1"):
        fused_linear_ikl(p["hs"], p["ws"], teacher_topk=(bad, val), **kw)
    with pytest.raises(ValueError, match="needs log-probabilities"):
        fused_linear_ikl(p["hs"], p["ws"], teacher_topk=(idx, val + 5.0), topk_tail="uniform", **kw)
    with pytest.raises(ValueError, match="Unknown topk_tail 'drop'"):
        fused_linear_ikl(p["hs"], p["ws"], teacher_topk=(idx, val), topk_tail="drop", **kw)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., k\) = \(13, 3\)"):
        fused_linear_ikl(p["hs"], p["ws"], teacher_topk=(idx[:5], val[:5]), **kw)


def test_topk_cache_round_trip_and_collator(tmp_path):
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11)
    emb = torch.nn.Embedding(11, 6)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = emb, head

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
            h = self.emb(input_ids)
            return {"hidden_states": (h, torch.tanh(h))}

    ids = torch.randint(0, 11, (3, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # the second sequence is 3 tokens long
    batches = [{"input_ids": ids, "attention_mask": mask}]
    cache = TopKCache.build(tmp_path / "c", batches, k=4, model=TinyLM(), chunk_size=4)
    assert len(cache) == 3 and cache.meta["tokens"] == 13
    logits = head(torch.tanh(emb(ids))).detach()
    _, want_val = topk_logprobs(logits, 4)
    idx, val = cache[1]
    assert idx.shape == (3, 4)
    torch.testing.assert_close(val, want_val[1, :3])
    torch.testing.assert_close(
        logits[1, :3].log_softmax(-1).gather(1, idx), val
    )  # the same entries (ties aside)
    with pytest.raises(FileExistsError):
        TopKCache.build(tmp_path / "c", batches, k=4, model=TinyLM())
    from dkl.llm.topk import TopKCollator

    def stack(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    collate = TopKCollator(stack, TopKCache(tmp_path / "c"))
    examples = [{"input_ids": ids[j], "attention_mask": mask[j], "cache_index": j} for j in (2, 1)]
    batch = collate(examples)
    assert batch["teacher_topk_indices"].shape == (2, 5, 4)
    torch.testing.assert_close(batch["teacher_topk_values"][0], want_val[2])
    assert torch.all(batch["teacher_topk_values"][1, 3:] == -float("inf"))  # padding: p = 0
    with pytest.raises(KeyError, match="cache_index"):
        collate([{"input_ids": ids[0]}])


# ------------------------------------------------------------------------------- sharded heads
class _FakeGathered:
    """Stands in for deepspeed.zero.GatheredParameters: fills the placeholders while inside."""

    log: ClassVar[list] = []

    def __init__(self, params, modifier_rank=None):
        self.params = params

    def __enter__(self):
        for prm in self.params:
            prm.data = prm.ds_full
        self.log.append("gather")

    def __exit__(self, *exc):
        for prm in self.params:
            prm.data = torch.empty(0)
        self.log.append("release")


def test_deepspeed_zero3_teacher_head_is_gathered_and_a_student_head_is_redirected(monkeypatch):
    """A frozen ZeRO-3 head is gathered for the block; a student head must not be (its gradient
    would arrive after the release): that is an error pointing at call_output_head. The real
    engine is exercised in tests/test_llm_sharding.py."""
    import sys
    import types

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=_FakeGathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    p = _problem(seed=11, bias=False)
    head = torch.nn.Linear(6, 11, bias=False)
    head.weight.ds_id = 0  # what a ZeRO-3 parameter carries
    head.weight.ds_full = p["ws"].detach().clone()
    head.weight.data = torch.empty(0)  # partitioned away after the forward
    with gathered_output_head(head, grad=False) as (w, b):
        assert w.shape == (11, 6) and b is None
        loss = fused_linear_ikl(p["hs"], w.detach(), p["ht"], p["wt"], labels=p["labels"], **HP)
    assert _FakeGathered.log[-2:] == ["gather", "release"] and head.weight.numel() == 0
    ref = _reference({**p, "bt": None, "wt": p["wt"]}, zt=F.linear(p["ht"], p["wt"]))
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="call_output_head"), gathered_output_head(head):
        pass


def test_plain_head_is_yielded_as_is():
    head = torch.nn.Linear(4, 9)
    with gathered_output_head(head, grad=False) as (w, b):
        assert w is head.weight and b is head.bias
    with (
        pytest.raises(TypeError, match="get_output_embeddings"),
        gathered_output_head(torch.nn.ReLU()),
    ):
        pass


# ------------------------------------------------------------------------------- the kernel
@needs_kernel
@pytest.mark.parametrize("kind", ["ikl", "kl"])
def test_kernel_path_with_softcap_ce_and_minus_inf(kind):
    pytest.importorskip("triton")
    p = _problem(N=6, V=9, seed=12)
    p["bt"][[2, 7]] = -math.inf  # masked teacher classes: the kernel follows the same rule
    if torch.cuda.is_available():  # the compiled kernel runs on CUDA tensors only
        p = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in p.items()}
    hp = HP if kind == "ikl" else {"temperature": 2.0}
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    ref = _reference(p, kind=kind, hp=hp, ce_weight=0.5, s_tf=(1.0, 3.0))
    loss = _call(fn, p, **hp, ce_weight=0.5, student_softcap=3.0, impl="triton")
    loss.backward()
    _assert_close(p, loss, ref, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "kind, temperature, reduction",
    [("ikl", 1.0, "mean"), ("ikl", 2.0, "sum"), ("kl", 1.0, "none"), ("kl", 3.0, "mean")],
)
def test_kernel_writes_the_gradient_over_the_logits_and_adds_the_ce_itself(
    kind, temperature, reduction, monkeypatch
):
    """Without a logit transform the kernel path writes each chunk's gradient over the student's
    logits and computes the hard-label CE in the same launch (its softmax at T = 1 is the
    student's own at T = 1, else one more log-sum-exp): the float64 materialised oracle."""
    pytest.importorskip("triton")
    p = _problem(N=9, V=13, seed=21)
    p["bt"][[1, 6]] = -math.inf
    if torch.cuda.is_available():
        p = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in p.items()}
    hp = {**HP, "temperature": temperature} if kind == "ikl" else {"temperature": temperature}
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    from dkl.llm import _sweep

    launches, one_launch = [], _sweep.loss_and_grad_one_launch

    def spy(zs, *args, **kwargs):  # the gradient comes back in the logits' own buffer
        out = one_launch(zs, *args, **kwargs)
        launches.append(out[1].data_ptr() == zs.data_ptr() and kwargs["labels"] is not None)
        return out

    monkeypatch.setattr(_sweep, "loss_and_grad_one_launch", spy)
    upstream = torch.linspace(-1.0, 2.0, 9, device=p["hs"].device)
    if reduction != "none":
        upstream = None
    ref = _reference(p, kind=kind, hp=hp, ce_weight=0.7, reduction=reduction, upstream=upstream)
    loss, parts = _call(
        fn,
        p,
        **hp,
        ce_weight=0.7,
        chunk_size=4,
        reduction=reduction,
        impl="triton",
        return_parts=True,
    )
    loss.backward(upstream)
    _assert_close(p, loss, ref, rtol=1e-5, atol=1e-6)
    assert launches and all(launches)
    if reduction != "none":
        mask = p["labels"] != -100
        zs = F.linear(p["hs"].double(), p["ws"].double(), p["bs"].double())
        ce = F.cross_entropy(zs[mask], p["labels"][mask], reduction="sum")
        want = ce / mask.sum() if reduction == "mean" else ce
        torch.testing.assert_close(parts["ce"].double(), want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            (parts[kind] + 0.7 * parts["ce"]).double(), loss.double(), rtol=1e-5, atol=1e-6
        )


@needs_kernel
@pytest.mark.parametrize("teacher", ["dense", "topk", "topk_uniform"])
def test_kernel_reads_bf16_logits_as_the_heads_give_them(teacher):
    """bfloat16 student and teacher: the kernel reads the heads' bfloat16 logits (no float32
    copies) and computes in float32, so the loss is the float64 value of those very logits to
    float32 rounding; the gradients carry one bfloat16 rounding. A top-k teacher with the uniform
    tail is built in float32 (its tail value is computed): a bfloat16 student with a float32
    teacher in one launch."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = _problem(N=10, V=17, seed=23)
    p["bt"][[3, 9]] = -math.inf
    p = {
        k: (
            v.detach().to(dev, torch.bfloat16).requires_grad_(v.requires_grad)
            if v.is_floating_point()
            else v.to(dev)
        )
        for k, v in p.items()
    }
    mask = p["labels"] != -100
    zs = F.linear(p["hs"], p["ws"], p["bs"]).double().detach().requires_grad_(True)
    zt = F.linear(p["ht"], p["wt"], p["bt"]).double()
    kw = {"labels": p["labels"], "student_bias": p["bs"], "ce_weight": 0.4, "impl": "triton"}
    if teacher == "topk":  # the top-k values as they come, in bfloat16; the rest ruled out
        values, indices = F.linear(p["ht"], p["wt"], p["bt"]).topk(6, dim=-1)
        kw["teacher_topk"] = (indices, values)
        zt = torch.full_like(zt, -math.inf).scatter(1, indices, values.double())
        args = (p["hs"], p["ws"], None, None)
    elif teacher == "topk_uniform":  # log-probabilities; the missing mass spread evenly
        log_p = F.log_softmax(F.linear(p["ht"], p["wt"], p["bt"]).float(), -1).to(torch.bfloat16)
        values, indices = log_p.topk(6, dim=-1)
        kw["teacher_topk"], kw["topk_tail"] = (indices, values), "uniform"
        tail = torch.log((1 - values.double().exp().sum(1, keepdim=True)) / (17 - 6))
        zt = tail.expand(-1, 17).clone().scatter(1, indices, values.double())
        args = (p["hs"], p["ws"], None, None)
    else:
        kw["teacher_bias"] = p["bt"]
        args = (p["hs"], p["ws"], p["ht"], p["wt"])
    rows = _pairwise_ikl_rows(zs, zt, **HP) + 0.4 * F.cross_entropy(
        zs, p["labels"].clamp_min(0), reduction="none"
    )
    want = torch.where(mask, rows, 0.0).sum() / mask.sum()
    (g_logits,) = torch.autograd.grad(want, zs)
    loss = fused_linear_ikl(*args, **HP, chunk_size=4, **kw)
    loss.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for got, ref in (
        (p["hs"].grad, g_logits @ p["ws"].double()),
        (p["ws"].grad, g_logits.T @ p["hs"].double()),
        (p["bs"].grad, g_logits.sum(0)),
    ):
        assert got.dtype == torch.bfloat16
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, err


# Triton's interpreter computes with NumPy, which warns at the -inf - -inf it then discards
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["ikl", "kl"])
def test_student_ruling_out_a_teacher_class_gives_plus_inf_on_every_route(kind):
    """A ``-inf`` student bias on a class the teacher keeps: the divergence is ``+inf`` (as in
    ``dkl.ikl_loss`` / ``F.kl_div``), never NaN, also at alpha = 0; the gradients stay finite and
    the torch route and the kernel agree on them."""
    p = _problem(N=5, V=9, seed=31)
    p["bs"] = p["bs"].detach().clone()
    p["bs"][4] = -math.inf
    fn = fused_linear_ikl if kind == "ikl" else fused_linear_kl
    hps = [{**HP, "alpha": 0.0}, HP] if kind == "ikl" else [{"temperature": 2.0}]
    impls = ["torch"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        impls.append("triton")
    for hp in hps:
        grads = {}
        for impl in impls:
            hs = p["hs"].detach().clone().requires_grad_(True)
            kw = {"student_bias": p["bs"], "teacher_bias": p["bt"]}
            loss = fn(hs, p["ws"].detach(), p["ht"], p["wt"], **hp, **kw, impl=impl)
            rows = fn(hs, p["ws"].detach(), p["ht"], p["wt"], **hp, **kw, reduction="none",
                      impl=impl)  # fmt: skip
            assert torch.isposinf(loss) and torch.isposinf(rows).all(), (impl, hp, rows)
            (grads[impl],) = torch.autograd.grad(loss, hs)
            assert torch.isfinite(grads[impl]).all(), (impl, hp)
        if "triton" in grads:
            torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-6)


def test_mixed_head_dtypes_and_bool_labels_are_refused_in_one_line():
    """Outside autocast a head whose dtype is not its hidden states' (or a bias of a third dtype)
    failed deep inside the matmul; a bool mask passed as labels was taken as classes 0 / 1."""
    p = _problem(N=4, V=7, seed=41)
    hs, ws, ht, wt = p["hs"], p["ws"], p["ht"], p["wt"]
    with pytest.raises(ValueError, match="student_head_weight of the student's hidden-state dtype"):
        fused_linear_ikl(hs.bfloat16(), ws, ht, wt, **HP)
    with pytest.raises(ValueError, match="teacher_bias of the teacher's hidden-state dtype"):
        fused_linear_kl(hs, ws, ht, wt, teacher_bias=p["bt"].double(), temperature=1.0)
    with pytest.raises(TypeError, match="Expected integer labels, got torch.bool"):
        fused_linear_ikl(hs, ws, ht, wt, labels=torch.ones(4, dtype=torch.bool), **HP)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the head: allowed
        loss = fused_linear_ikl(hs, ws.bfloat16(), ht, wt, **HP)
    ref = fused_linear_ikl(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), **HP)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_double_backward_is_refused_in_one_line():
    """The chunked and top-k losses write their gradient in closed form: a second derivative
    through them is an error naming the way out, never a silently wrong (zero) number."""
    p = _problem(seed=3, bias=False)
    hs = p["hs"].detach().requires_grad_(True)
    loss = fused_linear_ikl(hs, p["ws"], p["ht"], p["wt"], labels=p["labels"], **HP)
    with pytest.raises(RuntimeError, match="no second derivative .*dkl.ikl_loss"):
        torch.autograd.grad(loss, hs, create_graph=True)
    z = torch.randn(4, 11, requires_grad=True)
    idx, val = topk_logprobs(torch.randn(4, 11), 3)
    with pytest.raises(RuntimeError, match="top-k dkl.llm loss .* no second derivative"):
        torch.autograd.grad(topk_kl_loss(z, idx, val), z, create_graph=True)
    first = torch.autograd.grad(topk_kl_loss(z, idx, val), z)[0]  # first order: fine
    assert torch.isfinite(first).all()


# --------------------------------------------------------------------------- hostile, round 3
def test_nan_hidden_states_at_ignored_tokens_leave_the_head_gradient_finite():
    """Ignored tokens are left out of the loss: a NaN in their hidden states must not reach the
    head's gradient through 0 · NaN. The reference is the same loss without those tokens."""
    p = _problem(seed=3)
    ignored = p["labels"] == -100
    assert ignored.any()
    hs = p["hs"].detach().clone()
    hs[ignored] = float("nan")
    hs.requires_grad_(True)
    kw = {"labels": p["labels"], "student_bias": p["bs"], "teacher_bias": p["bt"], **HP}
    loss = fused_linear_ikl(hs, p["ws"], p["ht"], p["wt"], **kw)
    gw, gb = torch.autograd.grad(loss, (p["ws"], p["bs"]))
    keep = ~ignored
    ref = fused_linear_ikl(
        p["hs"][keep], p["ws"], p["ht"][keep], p["wt"], **{**kw, "labels": p["labels"][keep]}
    )
    rw, rb = torch.autograd.grad(ref, (p["ws"], p["bs"]))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(gb, rb)


def test_reduction_none_returns_parts_per_token():
    p = _problem(seed=4)
    kw = {"labels": p["labels"], "ce_weight": 0.5, "student_bias": p["bs"], "teacher_bias": p["bt"]}
    rows, parts = fused_linear_ikl(
        p["hs"], p["ws"], p["ht"], p["wt"], reduction="none", return_parts=True, **kw, **HP
    )
    assert {k: tuple(v.shape) for k, v in parts.items()} == {k: rows.shape for k in parts}
    total = HP["beta"] * parts["wmse"] + HP["alpha"] * parts["sce"] + 0.5 * parts["ce"]
    torch.testing.assert_close(total, rows)
    assert not rows[p["labels"] == -100].any()
    _, summed = fused_linear_ikl(
        p["hs"], p["ws"], p["ht"], p["wt"], reduction="sum", return_parts=True, **kw, **HP
    )
    for k, v in parts.items():
        torch.testing.assert_close(v.sum(), summed[k])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_small_integer_labels_are_labels(dtype):
    p = _problem(seed=5, V=11)
    labels = p["labels"].clamp_min(0)  # uint8 has no -100
    kw = {"temperature": 1.0, "ce_weight": 1.0}
    want = fused_linear_kl(p["hs"], p["ws"], p["ht"], p["wt"], labels=labels, **kw)
    got = fused_linear_kl(p["hs"], p["ws"], p["ht"], p["wt"], labels=labels.to(dtype), **kw)
    torch.testing.assert_close(got, want)


def test_an_ignore_index_that_is_not_an_int_is_one_line():
    p = _problem()
    with pytest.raises(TypeError, match="Expected ignore_index an int, got None"):
        fused_linear_kl(
            p["hs"],
            p["ws"],
            p["ht"],
            p["wt"],
            temperature=1.0,
            labels=p["labels"],
            ignore_index=None,
        )


@pytest.mark.parametrize(
    "edit,tail,match",
    [
        ("duplicate", "renormalize", "Expected distinct top-k indices per token"),
        ("float_indices", "renormalize", "Expected integer top-k indices"),
        ("beyond_vocab", "renormalize", "at least one top-k index below the vocabulary size"),
        ("nan_value", "uniform", "finite or -inf, got NaN or \\+inf"),
        ("logits_as_uniform", "uniform", "needs log-probabilities of the full distribution"),
        ("all_neg_inf", "renormalize", "at least one finite entry per token"),
        ("k_zero", "renormalize", "at least one top-k entry per token"),
    ],
)
def test_the_materialised_topk_losses_hold_the_fused_paths_rules(edit, tail, match):
    """topk_*_loss refuses what the fused path refuses, where it gave a wrong number or NaN."""
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(4, 12, generator=g), torch.randn(4, 12, generator=g) * 2
    idx, val = topk_logprobs(zt, 4)
    if edit == "duplicate":
        idx = idx.clone()
        idx[0, 1] = idx[0, 0]
    elif edit == "float_indices":
        idx = idx.float()
    elif edit == "beyond_vocab":
        idx = idx + 100
    elif edit == "nan_value":
        val = val.clone()
        val[1, 2] = float("nan")
    elif edit == "logits_as_uniform":
        val = val + 5.0
    elif edit == "all_neg_inf":
        val = torch.full_like(val, -math.inf)
    elif edit == "k_zero":
        idx, val = idx[:, :0], val[:, :0]
    with pytest.raises((ValueError, TypeError), match=match):
        topk_kl_loss(zs, idx, val, tail=tail, temperature=1.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"reduction": "avg"}, "Unknown reduction 'avg'"),
        ({"chunk_size": 0}, "Expected chunk_size a positive int, got 0"),
        ({"impl": "cuda"}, "Unknown impl 'cuda'"),
    ],
)
def test_the_module_checks_its_options_when_built(kw, match):
    with pytest.raises(ValueError, match=match):
        FusedLinearIKLLoss(**HP, **kw)


def test_torch_func_transforms_get_one_line():
    p = _problem()
    ws, ht, wt = p["ws"].detach(), p["ht"], p["wt"]
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.grad(lambda h: fused_linear_kl(h, ws, ht, wt, temperature=1.0))(p["hs"].detach())
    zs, zt = torch.randn(3, 11), torch.randn(3, 11)
    idx, val = topk_logprobs(zt, 4)
    with pytest.raises(RuntimeError, match="does not run under torch.func transforms"):
        torch.func.grad(lambda z: topk_kl_loss(z, idx, val, temperature=1.0))(zs)
