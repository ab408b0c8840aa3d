"""dkl.llm.fused_linear_ikl against materialised logits + dkl.ikl_loss (+ F.cross_entropy).

The reference builds the full (N, V) logits in float64 and differentiates through them with
autograd; the chunked path must give the same loss and the same gradients for the student's hidden
states, head weight and bias, whatever the chunk size.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dkl
from dkl.llm import FusedLinearIKLLoss, fused_linear_ikl, valid_token_mask

if os.environ.get("TRITON_INTERPRET") == "1":  # triton picks its mode at import: the interpreter
    with contextlib.suppress(ImportError):
        import triton.language  # noqa: F401


HP = {"alpha": 1.5, "beta": 0.5, "temperature": 2.0, "weight_temperature": 1.0}
ROOT = Path(__file__).resolve().parents[1]


def _problem(N=37, Hs=12, Ht=20, V=53, Vt=53, *, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    p = {
        "hs": randn(N, Hs).requires_grad_(True),
        "ws": randn(V, Hs, scale=0.7).requires_grad_(True),
        "ht": randn(N, Ht),
        "wt": randn(Vt, Ht, scale=0.7),
        "bs": randn(V).requires_grad_(True) if bias else None,
        "bt": randn(Vt) if bias else None,
    }
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.25] = -100
    p["labels"] = labels
    return p


def _reference(p, *, ce_weight=0.0, reduction="mean", use_labels=True, ignore_index=-100):
    """Materialised float64 logits through dkl.ikl_loss and F.cross_entropy."""
    leaves = [p["hs"], p["ws"]] + ([p["bs"]] if p["bs"] is not None else [])
    dbl = [x.detach().double().requires_grad_(True) for x in leaves]
    hs, ws = dbl[0], dbl[1]
    bs = dbl[2] if len(dbl) == 3 else None
    V = ws.shape[0]
    zs = F.linear(hs, ws, bs)
    bt = p["bt"].double()[:V] if p["bt"] is not None else None
    zt = F.linear(p["ht"].double(), p["wt"].double()[:V], bt)
    labels = p["labels"] if use_labels else None
    mask = labels != ignore_index if labels is not None else None
    per_row = dkl.ikl_loss(zs, zt, reduction="none", mask=mask, impl="torch", **HP)
    total = per_row.sum()
    if ce_weight > 0:
        total = total + ce_weight * F.cross_entropy(
            zs, labels, ignore_index=ignore_index, reduction="sum"
        )
    if reduction == "mean":
        count = mask.sum() if mask is not None else torch.tensor(zs.shape[0])
        total = total / count.clamp_min(1)
    grads = (
        torch.autograd.grad(total, dbl)
        if total.requires_grad
        else [torch.zeros_like(x) for x in dbl]
    )
    return total.detach(), grads


def _fused(p, **kw):
    return fused_linear_ikl(
        p["hs"],
        p["ws"],
        p["ht"],
        p["wt"],
        student_bias=p["bs"],
        teacher_bias=p["bt"],
        **{"labels": p["labels"], **HP, **kw},
    )


def _grads(p):
    out = [p["hs"].grad, p["ws"].grad]
    if p["bs"] is not None:
        out.append(p["bs"].grad)
    return out


def _assert_matches(p, ref, loss, upstream=1.0, rtol=1e-5, atol=1e-6):
    ref_loss, ref_grads = ref
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for got, want, name in zip(_grads(p), ref_grads, ("hidden", "weight", "bias")):
        assert got is not None, f"no gradient for the student's {name}"
        torch.testing.assert_close(
            got.double(),
            upstream * want,
            rtol=rtol,
            atol=atol,
            msg=lambda m, n=name: f"grad {n}: {m}",
        )


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 100])  # 37 = 2·16 + 5: a short last chunk
def test_matches_materialised(chunk_size):
    p = _problem()
    ref = _reference(p)
    loss = _fused(p, chunk_size=chunk_size)
    (loss * 2.5).backward()  # upstream gradient not 1
    _assert_matches(p, ref, loss, upstream=2.5)


@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_mixing_bias_and_larger_teacher_vocab(ce_weight, reduction):
    p = _problem(Vt=53 + 11, bias=True, seed=1)  # teacher head has 11 extra rows: cut off
    ref = _reference(p, ce_weight=ce_weight, reduction=reduction)
    loss = _fused(p, chunk_size=10, ce_weight=ce_weight, reduction=reduction)
    loss.backward()
    _assert_matches(p, ref, loss)


def test_all_ignored_chunk_and_no_labels():
    p = _problem(N=40, seed=2)
    p["labels"][16:32] = -100  # the whole second chunk of 16 is ignored
    ref = _reference(p, ce_weight=0.3)
    loss = _fused(p, chunk_size=16, ce_weight=0.3)
    loss.backward()
    _assert_matches(p, ref, loss)
    assert torch.all(p["hs"].grad[16:32] == 0)
    # without labels every token counts
    q = _problem(N=40, seed=2)
    ref = _reference(q, use_labels=False)
    loss = _fused(q, chunk_size=16, labels=None)
    loss.backward()
    _assert_matches(q, ref, loss)


def test_all_tokens_ignored_gives_zero():
    p = _problem(seed=3, bias=True)
    p["labels"][:] = -100
    loss = _fused(p, chunk_size=8, ce_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in _grads(p))


def test_custom_ignore_index_and_token_shape():
    """(B, L, H) hidden states with (B, L) labels, ignore_index = 0."""
    p = _problem(N=24, seed=4)
    p["labels"][p["labels"] == -100] = 0
    ref = _reference(p, ce_weight=0.5, ignore_index=0)
    hs3 = p["hs"].detach().reshape(4, 6, -1).requires_grad_(True)
    loss = fused_linear_ikl(
        hs3,
        p["ws"],
        p["ht"].reshape(4, 6, -1),
        p["wt"],
        labels=p["labels"].reshape(4, 6),
        ignore_index=0,
        ce_weight=0.5,
        chunk_size=5,
        **HP,
    )
    loss.backward()
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs3.grad.reshape(24, -1).double(), ref[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p["ws"].grad.double(), ref[1][1], rtol=1e-5, atol=1e-6)


def test_bfloat16_against_float64_reference():
    p = _problem(seed=5, dtype=torch.bfloat16, bias=True)
    ref = _reference(p, ce_weight=0.5)
    loss = _fused(p, chunk_size=16, ce_weight=0.5)
    loss.backward()
    assert p["hs"].grad.dtype == torch.bfloat16 and p["bs"].grad.dtype == torch.bfloat16
    # bf16 logits (8 bits of mantissa) and bf16 gradients
    _assert_matches(p, ref, loss, rtol=2e-2, atol=2e-3)


def test_teacher_gets_no_gradient_and_module_form():
    p = _problem(seed=6)
    p["wt"].requires_grad_(True)
    p["ht"].requires_grad_(True)
    crit = FusedLinearIKLLoss(chunk_size=7, ce_weight=0.2, **HP)
    assert "chunk_size=7" in repr(crit)
    with pytest.warns(UserWarning, match="give it no gradient"):
        loss = crit(p["hs"], p["ws"], p["ht"], p["wt"], labels=p["labels"])
    loss.backward()
    assert p["wt"].grad is None and p["ht"].grad is None
    ref = _reference(_problem(seed=6), ce_weight=0.2)
    _assert_matches(p, ref, loss)


def test_backward_twice_raises():
    p = _problem(seed=7)
    loss = _fused(p, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_bad_inputs_raise_clearly():
    p = _problem(Vt=40)  # teacher vocabulary smaller than the student's 53
    with pytest.raises(ValueError, match="teacher vocabulary at least as large.*53.*got 40"):
        _fused(p)
    p = _problem()
    with pytest.raises(ValueError, match="ce_weight = 0.5 > 0 needs labels"):
        _fused(p, labels=None, ce_weight=0.5)
    with pytest.raises(ValueError, match="Unknown reduction 'avg'"):
        _fused(p, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size a positive int, got 0"):
        _fused(p, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels of shape \(37,\), got \(36,\)"):
        _fused(p, labels=p["labels"][:36])
    with pytest.raises(ValueError, match=r"student's token shape \(37,\), got \(36,\)"):
        fused_linear_ikl(p["hs"], p["ws"], p["ht"][:36], p["wt"], **HP)
    with pytest.raises(ValueError, match=r"student_head_weight of shape \(V, H\) with H = 12"):
        fused_linear_ikl(p["hs"], p["ws"][:, :5], p["ht"], p["wt"], **HP)
    with pytest.raises(TypeError, match="integer labels"):
        valid_token_mask(torch.zeros(3))
    with pytest.raises(TypeError, match="alpha"):
        fused_linear_ikl(
            p["hs"], p["ws"], p["ht"], p["wt"], beta=1.0, temperature=1.0, weight_temperature=1.0
        )  # no hidden defaults for the loss weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_impl_without_device_raises_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = _problem()
    with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
        _fused(p, impl="triton")
    loss = _fused(p, impl="auto")  # auto: the torch path on CPU
    loss.backward()
    _assert_matches(p, _reference(_problem()), loss)


def test_example_runs():
    pytest.importorskip("transformers")
    path = ROOT / "examples" / "distill_causal_lm.py"
    spec = importlib.util.spec_from_file_location("distill_causal_lm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["distill_causal_lm"] = module
    try:
        spec.loader.exec_module(module)
        result = module.main(
            [
                "--teacher-steps",
                "2",
                "--steps",
                "3",
                "--seq-len",
                "16",
                "--batch-size",
                "4",
                "--eval-batches",
                "1",
            ]
        )
    finally:
        sys.modules.pop("distill_causal_lm", None)
    assert all(math.isfinite(x) for x in result["losses"])
    assert result["losses"]


def _relative(got, want):
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("mode", ["float16", "autocast"])
def test_float16_gradients_under_a_loss_scale_are_those_of_the_materialised_loss(mode):
    """GradScaler multiplies the loss by 2^16 (inf in float16) and divides the gradients after:
    the fused path's gradients, formed in forward, must be as exact as the materialised path's.
    They were inf (the scale cast to float16) and, at 16k tokens, 10x less exact (each token's
    gradient divided by the token count in float16, before the scale came)."""
    N, scale = 16384, 65536.0
    p = _problem(N=N, Hs=8, Ht=8, V=32, Vt=32, dtype=torch.float64)
    _, (want_h, want_w) = _reference(p)
    errors = {}
    for path in ("fused", "materialised"):
        dtype = torch.float16 if mode == "float16" else torch.float32
        hs = p["hs"].detach().to(dtype).requires_grad_()
        ws = p["ws"].detach().to(dtype).requires_grad_()
        ht, wt = p["ht"].to(dtype), p["wt"].to(dtype)
        autocast = torch.autocast("cpu", dtype=torch.float16, enabled=mode == "autocast")
        with autocast:
            if path == "fused":
                loss = fused_linear_ikl(hs, ws, ht, wt, labels=p["labels"], chunk_size=4096, **HP)
            else:
                zs, zt = (hs @ ws.T).float(), (ht @ wt.T).float()
                mask = p["labels"] != -100
                loss = dkl.ikl_loss(zs, zt, mask=mask, impl="torch", **HP)
        (loss * scale).backward()
        assert torch.isfinite(hs.grad).all() and torch.isfinite(ws.grad).all(), (mode, path)
        errors[path] = (
            _relative(hs.grad.double() / scale, want_h),
            _relative(ws.grad.double() / scale, want_w),
        )
    for got, reference in zip(errors["fused"], errors["materialised"]):
        assert got < 2 * reference + 1e-4, errors


def test_a_teacher_that_requires_grad_is_warned_that_it_gets_none():
    """dkl.ikl_loss moves the teacher too (its wMSE has no stop-gradient); the fused losses do
    not, and said nothing: a teacher that requires grad silently got no gradient."""
    p = _problem()
    ht = p["ht"].clone().requires_grad_()
    with pytest.warns(UserWarning, match="teacher_hidden requires grad, but the fused"):
        fused_linear_ikl(p["hs"], p["ws"], ht, p["wt"], labels=p["labels"], **HP).backward()
    assert ht.grad is None
    with torch.no_grad():
        teacher_hidden = ht * 1.0  # the usual way: computed without a graph
    head = torch.nn.Parameter(p["wt"].clone())  # an unfrozen teacher's head: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_linear_ikl(p["hs"], p["ws"], teacher_hidden, head, labels=p["labels"], **HP)
