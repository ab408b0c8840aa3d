"""Completions sampled from a model, as training batches: on-policy and sequence-level distillation.

On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models"; TRL's
``GKDTrainer``) trains the student on its *own* samples: each prompt is completed by the student,
the teacher scores the completion, and the divergence is taken on the completion's tokens.
Sequence-level KD (Kim & Rush 2016) does the same with the teacher's samples.

:func:`prompts_from_labels` reads each example's prompt off a completion-only batch (labels
``-100`` over the prompt); :func:`generate_completions` samples completions for a list of prompts
(batched, the model in eval mode, no gradient) and returns a right-padded batch with labels on the
completion only. Any sampler can stand in for the model's ``generate`` through ``generate_fn``
(e.g. a vLLM engine): it takes the prompts as lists of token ids and returns the completions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dkl.llm.sharded import output_head_shape, unwrap_model

__all__ = ["generate_completions", "prompts_from_labels"]

GenerateFn = Callable[[list[list[int]]], Sequence[Sequence[int]]]


def prompts_from_labels(
    input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, ignore_index: int = -100
) -> list[Tensor]:
    """Each row's prompt: its tokens (attention mask 1) before the first label that counts.

    >>> ids = torch.tensor([[5, 6, 7, 8, 0], [0, 1, 2, 3, 4]])
    >>> mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    >>> labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 3, 4]])
    >>> [p.tolist() for p in prompts_from_labels(ids, mask, labels)]
    [[5, 6], [1, 2]]
    """
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"Expected labels of the input ids' shape {tuple(input_ids.shape)}, got "
            f"{tuple(labels.shape)}"
        )
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
    )
    prompts = []
    for row in range(input_ids.shape[0]):
        counted = (labels[row] != ignore_index).nonzero()
        if len(counted) == 0:
            raise ValueError(f"Expected row {row} to have a completion (labels != {ignore_index})")
        first = int(counted[0])
        prompt = input_ids[row, :first][mask[row, :first].bool()]
        if len(prompt) == 0:
            raise ValueError(
                f"Row {row} has no prompt (its first token already counts): on-policy "
                "distillation completes prompts, so give batches labels of -100 over the prompt "
                "(completion-only data)"
            )
        prompts.append(prompt)
    return prompts


@torch.no_grad()
def generate_completions(
    model: nn.Module | None,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    generate_fn: GenerateFn | None = None,
    device: torch.device | str | None = None,
    vocab_size: int | None = None,
) -> tuple[dict[str, Tensor], float]:
    """Sample a completion for each prompt: ``(batch, seconds)``.

    The batch holds ``input_ids`` (prompt + completion, right-padded with ``pad_token_id``),
    ``attention_mask`` and ``labels`` (``-100`` over the prompt and the padding): the completion
    up to and including its first end-of-sequence token, at most ``max_new_tokens``.

    Args:
        model: a causal LM with ``generate`` (wrappers are looked through); it runs in eval mode,
            without gradients, and is put back in the mode it was in. Under DeepSpeed ZeRO-3 or
            FSDP every rank must call this together (transformers then keeps the ranks in step).
        prompts: 1-D token tensors.
        temperature: sampling temperature (0: greedy).
        generate_fn: instead of ``model.generate``, a function from the prompts (lists of ids)
            to their completions (lists of ids), e.g. served by vLLM.
        vocab_size: the vocabulary of the model that will read the batch: a model with a larger
            one (a teacher whose vocabulary is padded) never samples the ids past it, and a
            ``generate_fn`` completion that holds one is refused.
    """
    if not prompts:
        raise ValueError("Expected at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"Expected max_new_tokens a positive int, got {max_new_tokens!r}")
    if not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"Expected temperature >= 0, got {temperature}")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    t0 = time.perf_counter()
    if generate_fn is not None:
        completions = [
            torch.as_tensor(list(c), dtype=torch.long)[:max_new_tokens]
            for c in generate_fn([p.tolist() for p in prompts])
        ]
        if len(completions) != len(prompts):
            raise ValueError(
                f"generate_fn returned {len(completions)} completions for {len(prompts)} prompts"
            )
    else:
        if model is None:
            raise ValueError("Expected a model or a generate_fn")
        check_position_room(model, "generating model", prompts, max_new_tokens)
        completions = _generate(
            model,
            prompts,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            eos,
            pad_token_id,
            vocab_size,
        )
    if vocab_size is not None:
        for j, c in enumerate(completions):
            top = int(torch.as_tensor(c).max()) if len(c) else -1
            if top >= vocab_size:
                raise ValueError(
                    f"Expected completion token ids below the reading model's vocab_size "
                    f"{vocab_size}, got {top} in completion {j}"
                )
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        completion = completion.to(prompt.device)
        ends = [i for i, t in enumerate(completion.tolist()) if t in eos]
        if ends:
            completion = completion[: ends[0] + 1]
        rows.append((prompt, completion))
    L = max(len(p) + len(c) for p, c in rows)
    dev = device if device is not None else prompts[0].device
    ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for j, (p, c) in enumerate(rows):
        n, m = len(p), len(c)
        ids[j, :n], ids[j, n : n + m] = p.cpu(), c.cpu()
        labels[j, n : n + m] = c.cpu()
        mask[j, : n + m] = 1
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}
    return batch, time.perf_counter() - t0


def position_limit(model: nn.Module) -> int | None:
    """How many positions a model with a learned position table can read (GPT-2's ``wpe``,
    OPT's ``embed_positions``); ``None`` for rotary or relative positions, which have no table
    to run past."""
    for name, module in unwrap_model(model).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _POSITION_TABLES and isinstance(module, nn.Embedding):
            return module.num_embeddings - int(getattr(module, "offset", 0))
    return None


_POSITION_TABLES = frozenset({"wpe", "embed_positions", "position_embeddings"})


def check_position_room(
    model: nn.Module, who: str, prompts: Sequence[Tensor], max_new_tokens: int
) -> None:
    """Refuse completions that would run past ``model``'s learned position table (a raw
    ``IndexError`` deep in its embedding otherwise); ``who`` names the model in the message."""
    limit = position_limit(model)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if limit is not None and longest > limit:
        raise ValueError(
            f"Expected prompts + max_new_tokens within the {who}'s {limit} positions, got "
            f"{longest} tokens (the longest prompt and max_new_tokens={max_new_tokens}): lower "
            "max_new_tokens or truncate the prompts"
        )


def _generate(
    model, prompts, max_new_tokens, temperature, top_p, top_k, eos, pad, vocab_size
) -> list[Tensor]:
    """The model's own ``generate`` on the left-padded prompts; the completions, unpadded."""
    inner = unwrap_model(model)
    dev = next(inner.parameters()).device
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, P - len(p) :], mask[j, P - len(p) :] = p.to(dev), 1
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "pad_token_id": pad,
    }
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if eos:
        kw["eos_token_id"] = sorted(eos)
    own = output_head_shape(inner)[0]
    if vocab_size is not None and own > vocab_size:  # ids the reading model has no row for
        kw["suppress_tokens"] = list(range(vocab_size, own))
    was_training = inner.training
    inner.eval()
    try:
        out = inner.generate(input_ids=ids, attention_mask=mask, **kw)
    finally:
        inner.train(was_training)
    return [row[P:] for row in out]
