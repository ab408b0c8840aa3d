"""The distillation loss under FSDP (``fully_shard``) on 2 CPU ranks with gloo equals the unsharded run.

Each rank gets half of a batch; the per-rank loss is its summed token losses divided by the
global token count and multiplied by the world size (FSDP averages gradients over ranks, and this
is what the Trainer integration does with ``num_items_in_batch``). The sum of the ranks' losses and
the gathered student gradients must equal one unsharded process on the whole batch. Both the usual
case (the root keeps the head unsharded after forward) and an explicitly resharded head (gathered
by :func:`dkl.llm.gathered_output_head`) are checked. With transformers installed, a Hugging Face
Llama teacher is sharded by :func:`dkl.llm.fully_shard_teacher`, the function the Trainer
integration calls under FSDP2 (the Trainer itself is checked in ``tests/test_llm_sharding.py``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
V = 32


class TinyCausalLM(nn.Module):
    """Embedding, two residual MLP blocks, a final norm and an output head: the parts FSDP shards
    in a decoder, in the calling convention of a Hugging Face causal LM."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, hidden)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, V)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, output_hidden_states=False):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        h = self.norm(h)
        return {"logits": self.lm_head(h[:, -1:]), "hidden_states": (h,)}


def _models():
    return TinyCausalLM(16, 0), TinyCausalLM(24, 1).eval().requires_grad_(False)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (4, 8), generator=g)
    labels = ids.clone()
    labels[1, 5:] = -100  # the ranks hold different numbers of valid tokens
    labels[2, :2] = -100
    return {"input_ids": ids, "labels": labels}


def _distill():
    from dkl.integrations.transformers import DistillationArguments

    return DistillationArguments(
        loss="ikl", alpha=1.0, beta=0.5, temperature=2.0, weight_temperature=1.0, ce_weight=0.2
    )


def _worker(rank: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        for reshard_head in (False, True):
            _check(rank, reshard_head)
        if _has_transformers():
            _check_hf_teacher(rank)
        dist.barrier()  # rank 1 waits for rank 0's reference before the group goes away
    finally:
        dist.destroy_process_group()


def _check(rank: int, reshard_head: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    from dkl.integrations.transformers import causal_lm_distillation_loss
    from dkl.llm import gathered_output_head

    distill = _distill()
    student, teacher = _models()
    ref_student, _ = _models()
    for model in (student, teacher):
        for layer in model.layers:
            fully_shard(layer)
        if reshard_head:
            fully_shard(model.lm_head)
        fully_shard(model)
    batch = _batch()
    n_global = (batch["labels"][:, 1:] != -100).sum()
    mine = {k: v[rank * 2 : rank * 2 + 2] for k, v in batch.items()}
    if reshard_head:  # the heads are shards when the loss reads them
        for model in (student, teacher):
            model.lm_head.register_forward_hook(lambda mod, inp, out: mod.reshard())
    total, _, _ = causal_lm_distillation_loss(student, teacher, mine, distill)
    (total / n_global * WORLD).backward()
    summed = total.detach().clone()
    dist.all_reduce(summed)
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    if reshard_head:
        teacher.lm_head.reshard()
        with gathered_output_head(teacher, grad=False) as (w, _):
            assert w.shape == (V, 24) and not hasattr(w, "placements")
    if rank == 0:
        ref_teacher = _models()[1]
        ref_total, _, _ = causal_lm_distillation_loss(ref_student, ref_teacher, batch, distill)
        (ref_total / n_global).backward()
        torch.testing.assert_close(summed, ref_total.detach(), rtol=1e-5, atol=1e-6)
        for n, p in ref_student.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _hf_llama(vocab: int, hidden: int, layers: int, seed: int):
    from llm_helpers import tiny_llama

    return tiny_llama(vocab, hidden, layers, seed)


def _check_hf_teacher(rank: int) -> None:
    """Hugging Face Llamas: the teacher sharded by ``fully_shard_teacher`` (what the Trainer
    integration does under FSDP2), the student per decoder layer and root as accelerate does."""
    from torch.distributed.fsdp import fully_shard

    from dkl.integrations.transformers import causal_lm_distillation_loss
    from dkl.llm import fully_shard_teacher

    distill = _distill()
    student, ref_student = _hf_llama(V, 16, 2, 0), _hf_llama(V, 16, 2, 0)
    teacher = fully_shard_teacher(_hf_llama(V + 8, 24, 2, 1))
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    shards = [p for p in teacher.parameters()]
    assert all(hasattr(p, "placements") for p in shards)  # every teacher parameter is sharded
    local = sum(p.to_local().numel() for p in shards)
    assert local < 0.6 * sum(p.numel() for p in shards)  # each rank holds about half
    assert not any(p.requires_grad for p in shards)
    batch = _batch()
    n_global = (batch["labels"][:, 1:] != -100).sum()
    mine = {k: v[rank * 2 : rank * 2 + 2] for k, v in batch.items()}
    total, _, _ = causal_lm_distillation_loss(student, teacher, mine, distill)
    (total / n_global * WORLD).backward()
    summed = total.detach().clone()
    dist.all_reduce(summed)
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    if rank == 0:
        ref_teacher = _hf_llama(V + 8, 24, 2, 1)
        ref_total, _, _ = causal_lm_distillation_loss(ref_student, ref_teacher, batch, distill)
        (ref_total / n_global).backward()
        torch.testing.assert_close(summed, ref_total.detach(), rtol=1e-5, atol=1e-6)
        for n, p in ref_student.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_fsdp_two_ranks_equal_unsharded():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
