"""Vocabulary-scale distillation losses for language models.

- :func:`fused_linear_ikl`, :func:`fused_linear_kl`: IKL / KL from the last hidden states and the
  output heads (or a top-k teacher), chunked over tokens, never holding the ``(N, V)`` logits.
- :func:`topk_ikl_loss`, :func:`topk_kl_loss`, :func:`topk_logprobs`, :class:`TopKCache`: sparse
  (top-k) teachers from logits, and a disk cache of a teacher's top-k outputs.
- :func:`gathered_output_head`: the output head's full weight under FSDP (``fully_shard``) or
  DeepSpeed ZeRO-3, where a module holds only a shard of it.
"""

from dkl.llm.fused import FusedLinearIKLLoss, fused_linear_ikl, fused_linear_kl, valid_token_mask
from dkl.llm.sharded import gathered_output_head
from dkl.llm.topk import TopKCache, topk_ikl_loss, topk_kl_loss, topk_logprobs

__all__ = [
    "FusedLinearIKLLoss",
    "TopKCache",
    "fused_linear_ikl",
    "fused_linear_kl",
    "gathered_output_head",
    "topk_ikl_loss",
    "topk_kl_loss",
    "topk_logprobs",
    "valid_token_mask",
]
