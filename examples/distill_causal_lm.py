"""Distil a small causal LM into a smaller one with token-level IKL, never building the logits.

    pip install "dkl[llm]"                          # transformers
    python examples/distill_causal_lm.py             # a few minutes on a 2-core CPU
    python examples/distill_causal_lm.py --device cuda --steps 1000

Everything is built from configs (no downloads). The "language" is a random sparse Markov chain
over 256 tokens, so its best possible next-token cross-entropy (the chain's entropy rate) is known
and printed next to the models'. A 4-layer Llama teacher is first trained on it with plain
cross-entropy; a 2-layer, narrower Llama student then learns from the teacher through
``dkl.llm.fused_linear_ikl`` on the last hidden states and the ``lm_head`` weights. The teacher's
head is padded to 320 rows (as real checkpoints pad vocabularies); the loss cuts the teacher's
logits to the student's first 256 entries (the student's vocabulary is a prefix of the
teacher's).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from dkl.llm import fused_linear_ikl

VOCAB = 256
TEACHER_VOCAB = 320  # padded head: rows 256..319 are never the answer


def markov_chain(vocab: int, successors: int, gen: torch.Generator) -> torch.Tensor:
    """(V, V) transition matrix: each token has a few likely successors, the rest get a little."""
    trans = torch.full((vocab, vocab), 0.02 / vocab)
    for tok in range(vocab):
        nxt = torch.randperm(vocab, generator=gen)[:successors]
        trans[tok, nxt] += torch.distributions.Dirichlet(torch.ones(successors)).sample() * 0.98
    return trans / trans.sum(1, keepdim=True)


def entropy_rate(trans: torch.Tensor) -> float:
    """Cross-entropy of the best predictor: H(next | current) under the stationary distribution."""
    pi = torch.full((trans.shape[0],), 1.0 / trans.shape[0])
    for _ in range(200):
        pi = pi @ trans
    return float(-(pi[:, None] * trans * trans.log()).sum())


def sample(trans: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length) token ids drawn from the chain (inverse-CDF sampling, one step per column)."""
    cdf = trans.cumsum(1)
    cdf[:, -1] = 1.0
    ids = torch.empty(batch, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, trans.shape[0], (batch,), generator=gen)
    u = torch.rand(batch, length, generator=gen)
    for i in range(1, length):
        rows = cdf[ids[:, i - 1]]
        ids[:, i] = (
            torch.searchsorted(rows, u[:, i : i + 1].contiguous())
            .squeeze(1)
            .clamp_max(trans.shape[0] - 1)
        )
    return ids


def build(vocab: int, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def hidden_and_head(model, ids):
    """Last hidden states (B, L, H) from the decoder body, and the output-head weight (V, H)."""
    hidden = model.base_model(input_ids=ids).last_hidden_state
    return hidden, model.get_output_embeddings().weight


@torch.no_grad()
def eval_ce(model, batches) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits[:, :-1, :VOCAB]  # small: fine to materialise here
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return total / count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the soft CE")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the wMSE")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weight-temperature", type=float, default=1.0)
    parser.add_argument("--ce-weight", type=float, default=0.0, help="hard-label CE (0 = none)")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per logits chunk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    trans = markov_chain(VOCAB, successors=4, gen=gen)
    held_out = [
        sample(trans, args.batch_size, args.seq_len, gen).to(device)
        for _ in range(args.eval_batches)
    ]

    def batch():
        return sample(trans, args.batch_size, args.seq_len, gen).to(device)

    teacher = build(TEACHER_VOCAB, hidden=128, layers=4, heads=4).to(device)
    student = build(VOCAB, hidden=64, layers=2, heads=2).to(device)
    n_params = {
        m: sum(p.numel() for p in net.parameters())
        for m, net in (("teacher", teacher), ("student", student))
    }
    print(
        f"teacher {n_params['teacher'] / 1e6:.2f}M params, student "
        f"{n_params['student'] / 1e6:.2f}M; best possible CE {entropy_rate(trans):.3f} nats"
    )

    # 1. teacher: plain next-token cross-entropy
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for _ in range(args.teacher_steps):
        ids = batch()
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)
    print(
        f"teacher trained ({time.perf_counter() - t0:.0f} s): CE {eval_ce(teacher, held_out):.3f}"
    )
    student_ce_before = eval_ce(student, held_out)

    # 2. student: chunked IKL on the LM head, teacher frozen
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch()
        with torch.no_grad():
            t_hidden, t_head = hidden_and_head(teacher, ids)
        s_hidden, s_head = hidden_and_head(student, ids)
        # position i predicts token i + 1: drop the last position, shift the labels
        loss = fused_linear_ikl(
            s_hidden[:, :-1],
            s_head,
            t_hidden[:, :-1],
            t_head,
            labels=ids[:, 1:],
            ce_weight=args.ce_weight,
            alpha=args.alpha,
            beta=args.beta,
            temperature=args.temperature,
            weight_temperature=args.weight_temperature,
            chunk_size=args.chunk_size,
        )
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"non-finite distillation loss at step {step}; lower --beta or --lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  IKL {loss.item():.4f}")
    student_ce = eval_ce(student, held_out)
    print(
        f"student distilled ({time.perf_counter() - t0:.0f} s): CE {student_ce_before:.3f} -> "
        f"{student_ce:.3f}"
    )
    return {"losses": losses, "student_ce": student_ce, "student_ce_before": student_ce_before}


if __name__ == "__main__":
    main()
