"""Vocabulary-scale distillation losses for language models.

- :func:`fused_linear_ikl`, :func:`fused_linear_kl`, :func:`fused_linear_reverse_kl`,
  :func:`fused_linear_jsd`: IKL / forward KL / reverse KL / generalised JSD from the last hidden
  states and the output heads (or a top-k teacher), chunked over tokens, never holding the
  ``(N, V)`` logits; :func:`fused_linear_divergence` picks one by its name in :data:`DIVERGENCES`.
- :func:`topk_ikl_loss`, :func:`topk_kl_loss`, :func:`topk_reverse_kl_loss`,
  :func:`topk_jsd_loss`, :func:`topk_logprobs`, :class:`TopKCache`: sparse (top-k) teachers from
  logits, and a disk cache of a teacher's top-k outputs.
- :func:`gathered_output_head`, :func:`call_output_head`: the output head's full weight under FSDP
  (``fully_shard``) or DeepSpeed ZeRO-3, where a module holds only a shard of it, with the
  student's gradient reaching the sharded parameter; :func:`deepspeed_inference_engine` and
  :func:`fully_shard_teacher` prepare a frozen teacher for the same engines.
"""

from dkl.llm.fused import (
    DIVERGENCE_HYPERPARAMETERS,
    DIVERGENCES,
    FusedLinearIKLLoss,
    fused_linear_divergence,
    fused_linear_ikl,
    fused_linear_jsd,
    fused_linear_kl,
    fused_linear_reverse_kl,
    valid_token_mask,
)
from dkl.llm.onpolicy import generate_completions, prompts_from_labels
from dkl.llm.sharded import (
    call_output_head,
    deepspeed_inference_engine,
    fully_shard_teacher,
    gathered_output_head,
)
from dkl.llm.topk import (
    topk_ikl_loss,
    topk_jsd_loss,
    topk_kl_loss,
    topk_logprobs,
    topk_reverse_kl_loss,
)
from dkl.llm.topk_cache import TopKCache, TopKCacheError, TopKCollator

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_HYPERPARAMETERS",
    "FusedLinearIKLLoss",
    "TopKCache",
    "TopKCacheError",
    "TopKCollator",
    "call_output_head",
    "deepspeed_inference_engine",
    "fully_shard_teacher",
    "fused_linear_divergence",
    "fused_linear_ikl",
    "fused_linear_jsd",
    "fused_linear_kl",
    "fused_linear_reverse_kl",
    "gathered_output_head",
    "generate_completions",
    "prompts_from_labels",
    "topk_ikl_loss",
    "topk_jsd_loss",
    "topk_kl_loss",
    "topk_logprobs",
    "topk_reverse_kl_loss",
    "valid_token_mask",
]
