"""Tiny models shared by the LLM tests (not a test module)."""

from __future__ import annotations

import torch


def tiny_llama(vocab: int, hidden: int = 16, layers: int = 1, seed: int = 0, positions: int = 32):
    """A randomly initialised Llama with untied embeddings, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)
