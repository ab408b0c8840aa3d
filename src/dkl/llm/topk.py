r"""Sparse (top-k) teachers: losses from a teacher's top-k outputs, and a disk cache of them.

A served or cached teacher often gives only its ``k`` most likely next tokens per position, as
``(indices, values)`` with values being logits or log-probabilities. The classes outside the
top-k are treated in one of two documented ways (``tail``):

- ``"renormalize"`` (default): they get probability 0, i.e. the teacher is its top-k renormalised.
  They then contribute nothing to the KL and have weight 0 in IKL's wMSE (exactly as ``-inf``
  logits do); the JSD (``beta < 1``) stays finite through its mixture. Works with logits or
  log-probabilities (a per-token shift changes none of these losses). The reverse KL is ``+inf``
  there (the student gives those classes mass the teacher does not), so it refuses this tail
  for ``k < V``.
- ``"uniform"``: ``values`` are log-probabilities of the full distribution; the missing mass
  :math:`m = 1 - \sum_k e^{v_k}` is spread evenly over the other ``V - k`` classes. Every
  divergence takes it (the reverse KL as long as :math:`m > 0`).

With ``k = V`` both equal the full loss. How far they are from it for smaller ``k`` depends on how
peaked the teacher is; ``benchmarks/llm_loss.py --topk`` measures it on a trained model.

:class:`TopKCache` runs a teacher once over a tokenised data set and stores its top-k
log-probabilities per token on disk (NumPy memory maps: nothing is loaded until read), so the
teacher need not be in memory while the student trains.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dkl.llm._checks import _check_mixture, _check_weight, _flatten_tokens
from dkl.llm._chunk import (
    TAILS,
    LogitTransform,
    chunk_loss,
    dense_from_topk,
    unbounded_error,
    unbounded_rows,
)
from dkl.llm.sharded import gathered_output_head, last_hidden_state

__all__ = [
    "TopKCache",
    "TopKCollator",
    "topk_ikl_loss",
    "topk_jsd_loss",
    "topk_kl_loss",
    "topk_logprobs",
    "topk_reverse_kl_loss",
]

REDUCTIONS = ("none", "mean", "sum")


def topk_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest log-probabilities per row of ``(..., V)`` logits: ``(indices, values)``.

    >>> idx, val = topk_logprobs(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    >>> idx.tolist(), [round(v, 4) for v in val[0].tolist()]
    ([[1, 2]], [-0.4076, -1.4076])
    """
    if not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"Expected 1 <= k <= V = {logits.shape[-1]}, got {k!r}")
    values, indices = F.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return indices, values


class _RowLoss(torch.autograd.Function):
    """Per-row loss whose gradient w.r.t. the logits is computed in forward (closed form)."""

    @staticmethod
    def forward(ctx, input, target, mask, cfg):
        res = chunk_loss(
            input.to(cfg["dtype"]),
            target,
            labels=None,
            valid=mask,
            need_grad=ctx.needs_input_grad[0],
            ce_weight=0.0,
            **{k: cfg[k] for k in ("kind", "alpha", "beta", "temperature", "weight_temperature")},
        )
        ctx.save_for_backward(res.grad)
        ctx.input_dtype = input.dtype
        return res.rows

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows.unsqueeze(1)).to(ctx.input_dtype), None, None, None


def _topk_loss(kind, input, topk_indices, topk_values, *, tail, reduction, mask, **kw) -> Tensor:
    if not isinstance(input, Tensor) or input.dim() != 2 or not input.is_floating_point():
        got = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"Expected input logits of shape (B, V), got {got}")
    B, V = input.shape
    for name, x in (("topk_indices", topk_indices), ("topk_values", topk_values)):
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != B:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Expected {name} of shape (B, k) with B = {B}, got {got}")
    if topk_indices.shape != topk_values.shape:
        raise ValueError(
            f"Expected topk_values of the indices' shape {tuple(topk_indices.shape)}, got "
            f"{tuple(topk_values.shape)}"
        )
    if tail not in TAILS:
        raise ValueError(f"Unknown tail {tail!r}: expected one of {TAILS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}: expected one of {REDUCTIONS}")
    if mask is not None and (
        not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B,)
    ):
        raise ValueError(f"Expected mask a bool tensor of shape (B,) = ({B},)")
    if topk_indices.numel() and bool((topk_indices < 0).any()):
        raise ValueError(f"Expected non-negative top-k indices, got {int(topk_indices.min())}")
    cfg = {
        "kind": kind,
        "alpha": _check_weight("alpha", kw.get("alpha", 1.0), positive=False),
        "beta": (
            _check_mixture(kw["beta"])
            if kind == "jsd"
            else _check_weight("beta", kw.get("beta", 1.0), positive=False)
        ),
        "temperature": _check_weight("temperature", kw["temperature"], positive=True),
        "weight_temperature": _check_weight(
            "weight_temperature", kw.get("weight_temperature", 1.0), positive=True
        ),
        "dtype": torch.float64 if input.dtype == torch.float64 else torch.float32,
    }
    target = dense_from_topk(topk_indices, topk_values.detach(), V, tail, cfg["dtype"])
    unbounded = unbounded_rows(input.detach(), target, kind, cfg["beta"])
    if unbounded is not None:
        n = int((unbounded & mask).sum() if mask is not None else unbounded.sum())
        if n:
            raise unbounded_error(n)
    rows = _RowLoss.apply(input, target, mask, cfg)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = mask.sum().clamp_min(1) if mask is not None else max(B, 1)
    return rows.sum() / count


def topk_ikl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    weight_temperature: float,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""IKL of student logits ``(B, V)`` against a top-k teacher ``(B, k)`` indices and values.

    The teacher's logits are the top-k values at their indices and, outside, ``-inf``
    (``tail="renormalize"``) or :math:`\log(m/(V-k))` (``tail="uniform"``, values being
    log-probabilities); then the loss is :func:`dkl.ikl_loss`'s. ``mask`` (bool ``(B,)``) drops
    rows as in :func:`dkl.ikl_loss`.

    Example:
        >>> import dkl
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 10)  # k = V: the full loss
        >>> hp = dict(alpha=1.0, beta=1.0, temperature=2.0, weight_temperature=1.0)
        >>> full = dkl.ikl_loss(z_s, z_t, **hp)
        >>> bool(torch.allclose(topk_ikl_loss(z_s, idx, val, **hp), full, atol=1e-5))
        True
    """
    return _topk_loss(
        "ikl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
        weight_temperature=weight_temperature,
    )


def topk_kl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""KL of student logits ``(B, V)`` against a top-k teacher; the tail as in
    :func:`topk_ikl_loss`, the loss as :func:`dkl.kl_loss` (no :math:`T^2`)."""
    return _topk_loss(
        "kl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        temperature=temperature,
    )


def topk_reverse_kl_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "uniform",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Reverse KL :math:`\mathrm{KL}(\sigma(z_s/T) \,\|\, \sigma(z_t/T))` of student logits
    ``(B, V)`` against a top-k teacher (the loss of :func:`dkl.llm.fused_linear_reverse_kl`).

    ``tail="uniform"`` (the default here) needs top-k *log-probabilities* with missing mass > 0;
    ``tail="renormalize"`` gives the classes outside the top-k probability 0, where the reverse KL
    is ``+inf``, and so raises unless the top-k covers every class.

    Example:
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 3)
        >>> topk_reverse_kl_loss(z_s, idx, val, temperature=2.0).backward()
    """
    return _topk_loss(
        "reverse_kl",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        temperature=temperature,
    )


def topk_jsd_loss(
    input: Tensor,
    topk_indices: Tensor,
    topk_values: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "renormalize",
    reduction: str = "mean",
    mask: Tensor | None = None,
) -> Tensor:
    r"""Generalised JSD of student logits ``(B, V)`` against a top-k teacher (the loss of
    :func:`dkl.llm.fused_linear_jsd`: ``beta`` 0 / 1 are the forward / reverse KL); both tails
    work for ``beta < 1``, ``beta = 1`` has :func:`topk_reverse_kl_loss`'s rules.

    Example:
        >>> z_s, z_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
        >>> idx, val = topk_logprobs(z_t, 3)
        >>> topk_jsd_loss(z_s, idx, val, beta=0.5).backward()
    """
    return _topk_loss(
        "jsd",
        input,
        topk_indices,
        topk_values,
        tail=tail,
        reduction=reduction,
        mask=mask,
        beta=beta,
        temperature=temperature,
    )


# ------------------------------------------------------------------------------- the disk cache
class TopKCache:
    """A teacher's top-k next-token log-probabilities for every token of a data set, on disk.

    Layout of the folder: ``meta.json`` (``k``, vocabulary size, dtypes, number of tokens),
    ``offsets.npy`` (``S + 1`` token offsets, one sequence per example), ``indices.bin`` and
    ``values.bin`` (raw ``(tokens, k)`` arrays, opened as NumPy memory maps). Sequence ``i``'s
    row ``j`` holds the teacher's prediction *at* position ``j`` (for token ``j + 1``), aligned
    with its ``input_ids``.

    Example:
        >>> import tempfile
        >>> lm = lambda ids: torch.nn.functional.one_hot(ids, 7).float() * 3  # a toy "teacher"
        >>> ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
        >>> with tempfile.TemporaryDirectory() as d:
        ...     cache = TopKCache.build(d, [ids], k=2, logits_fn=lm)
        ...     idx, val = cache[1]
        ...     print(len(cache), tuple(idx.shape), int(idx[0, 0]), round(float(val[0, 0]), 4))
        2 (4, 2) 5 -0.2614
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"No top-k cache at {self.path} (expected {meta_file})")
        self.meta = json.loads(meta_file.read_text())
        self.k, self.vocab_size = int(self.meta["k"]), int(self.meta["vocab_size"])
        self.offsets = np.load(self.path / "offsets.npy")
        n = int(self.offsets[-1])
        shape = (n, self.k)

        def open_map(name: str, dtype: str) -> np.ndarray:
            if n == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(self.path / name, dtype=dtype, mode="r", shape=shape)

        self.indices = open_map("indices.bin", self.meta["indices_dtype"])
        self.values = open_map("values.bin", self.meta["values_dtype"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """Sequence ``i``: ``(indices (L, k) int64, values (L, k) float32)``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"Expected a sequence index in [0, {len(self)}), got {i}")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return (
            torch.from_numpy(np.array(self.indices[a:b], dtype=np.int64)),
            torch.from_numpy(np.array(self.values[a:b], dtype=np.float32)),
        )

    def batch(self, rows: Sequence[int], length: int | None = None) -> tuple[Tensor, Tensor]:
        """Sequences ``rows`` stacked to ``(B, length, k)`` (right-padded with index 0, value 0:
        padded positions must carry label ``-100``)."""
        items = [self[int(r)] for r in rows]
        L = max((len(i) for i, _ in items), default=0) if length is None else length
        idx = torch.zeros(len(items), L, self.k, dtype=torch.long)
        val = torch.zeros(len(items), L, self.k, dtype=torch.float32)
        for j, (i, v) in enumerate(items):
            n = min(len(i), L)
            idx[j, :n], val[j, :n] = i[:n], v[:n]
        return idx, val

    @classmethod
    def build(
        cls,
        path: str | Path,
        batches: Iterable[Tensor | Mapping[str, Tensor]],
        *,
        k: int,
        model: Any = None,
        logits_fn: Callable[[Tensor], Tensor] | None = None,
        chunk_size: int = 1024,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        values_dtype: str = "float32",
    ) -> TopKCache:
        """Run a teacher over ``batches`` and write its top-k log-probabilities to ``path``.

        Args:
            path: folder to create (must not hold a cache already).
            batches: ``(B, L)`` input ids, or dicts with ``input_ids`` and optionally
                ``attention_mask`` (only positions with mask 1 are stored; one sequence per row).
            k: entries kept per token.
            model: a causal LM (Hugging Face style: called with ``output_hidden_states=True``,
                ``get_output_embeddings()`` gives its head); its logits are formed
                ``chunk_size`` tokens at a time, never all at once.
            logits_fn: instead of ``model``, a function ``input_ids -> (B, L, V)`` logits.
            logit_scale, softcap: the teacher's logit transform (as in
                :func:`~dkl.llm.fused_linear_ikl`), applied before the softmax.
            values_dtype: ``"float32"`` or ``"float16"`` on disk.
        """
        if (model is None) == (logits_fn is None):
            raise ValueError("Expected exactly one of model= or logits_fn=")
        if values_dtype not in ("float32", "float16"):
            raise ValueError(f"Expected values_dtype 'float32' or 'float16', got {values_dtype!r}")
        path = Path(path)
        if (path / "meta.json").exists():
            raise FileExistsError(f"A top-k cache already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        tf = LogitTransform(float(logit_scale), softcap)
        offsets, vocab = [0], None
        with (
            open(path / "indices.bin", "wb") as f_idx,
            open(path / "values.bin", "wb") as f_val,
            torch.no_grad(),
        ):
            for batch in batches:
                inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
                ids = inputs["input_ids"]
                keep = inputs.get("attention_mask")
                keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep.bool()
                if logits_fn is not None:
                    logits = logits_fn(ids)
                    vocab = logits.shape[-1]
                    idx, val = topk_logprobs(tf(logits.float())[0], k)
                else:
                    hidden = _flatten_tokens(last_hidden_state(model, inputs), "hidden")
                    with gathered_output_head(model, grad=False) as (w, b):
                        vocab = w.shape[0]
                        parts = [
                            topk_logprobs(
                                tf(F.linear(hidden[s : s + chunk_size], w, b).float())[0], k
                            )
                            for s in range(0, hidden.shape[0], chunk_size)
                        ]
                    idx = torch.cat([p[0] for p in parts]).reshape(*ids.shape, k)
                    val = torch.cat([p[1] for p in parts]).reshape(*ids.shape, k)
                for row in range(ids.shape[0]):
                    sel = keep[row].to(idx.device)
                    f_idx.write(idx[row][sel].to(torch.int32).cpu().numpy().tobytes())
                    f_val.write(val[row][sel].cpu().numpy().astype(values_dtype).tobytes())
                    offsets.append(offsets[-1] + int(sel.sum()))
        np.save(path / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {
            "k": k,
            "vocab_size": vocab if vocab is not None else 0,
            "tokens": offsets[-1],
            "sequences": len(offsets) - 1,
            "indices_dtype": "int32",
            "values_dtype": values_dtype,
            "values": "log-probabilities",
            "logit_scale": float(logit_scale),
            "softcap": softcap,
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return cls(path)


class TopKCollator:
    """Wraps a collator: adds ``teacher_topk_indices`` / ``teacher_topk_values`` ``(B, L, k)``
    from a :class:`TopKCache`, read for each example's ``index_key`` (which is removed before the
    wrapped collator sees the examples). With Hugging Face's ``Trainer`` keep the column with
    ``TrainingArguments(remove_unused_columns=False)``."""

    def __init__(self, collator: Callable, cache: TopKCache, index_key: str = "cache_index"):
        self.collator, self.cache, self.index_key = collator, cache, index_key

    def __call__(self, features: list[dict]) -> dict:
        try:
            rows = [int(f[self.index_key]) for f in features]
        except KeyError:
            raise KeyError(
                f"Expected each example to carry {self.index_key!r} (its row in the top-k "
                "cache); keep the column with remove_unused_columns=False"
            ) from None
        batch = dict(
            self.collator([{k: v for k, v in f.items() if k != self.index_key} for f in features])
        )
        length = batch["input_ids"].shape[1]
        batch["teacher_topk_indices"], batch["teacher_topk_values"] = self.cache.batch(rows, length)
        return batch
