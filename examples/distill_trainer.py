"""Distil a causal language model with Hugging Face's ``Trainer`` and IKL, end to end.

    pip install "dkl[llm]"                 # transformers, accelerate
    python examples/distill_trainer.py     # a few seconds on a CPU

Everything is built here, nothing is downloaded: a byte-level "tokenizer" (token = UTF-8 byte),
a few sentences, a 2-layer Llama teacher and a 1-layer, narrower Llama student with random
weights. The teacher is fitted to the sentences first with a plain ``Trainer`` (so that it has
something to teach), then ``DistillationTrainer`` trains the student on the same batches with
IKL computed from the last hidden states and the ``lm_head`` weights (the ``(N, V)`` logits are
never formed). With your own models, replace ``tiny_llama`` by ``AutoModelForCausalLM`` and the
byte tokenizer by the model's tokenizer; the Trainer part stays as it is.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from dkl.integrations.transformers import DistillationArguments, DistillationTrainer

SENTENCES = [
    "The student learns from the teacher's whole distribution, not only from the label.",
    "Decoupled KL splits the divergence into a weighted MSE and a soft-label cross-entropy.",
    "Improved KL lets the weighted MSE move the student and weights it with the teacher.",
    "A chunked loss never builds the logits of a large vocabulary at once.",
    "Gradient accumulation over four micro-batches equals one batch four times larger.",
    "Tokens labelled -100 are left out of the loss and of its mean.",
]
VOCAB = 256  # one token per byte
PAD = 0  # the NUL byte never occurs in the sentences


def tokenise(text: str, length: int) -> dict[str, list[int]]:
    """Byte ids padded to ``length``; the labels of padding are -100 (ignored by the loss)."""
    ids = list(text.encode("utf-8"))[:length]
    pad = length - len(ids)
    return {
        "input_ids": ids + [PAD] * pad,
        "attention_mask": [1] * len(ids) + [0] * pad,
        "labels": ids + [-100] * pad,
    }


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([row[key] for row in rows]) for key in rows[0]}


def tiny_llama(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def next_token_ce(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) on ``batch``: what both models are judged by."""
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40, help="distillation steps")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)

    length = max(len(s.encode()) for s in SENTENCES)
    train_set = [tokenise(s, length) for s in SENTENCES]
    everything = collate(train_set)
    out = args.out or tempfile.mkdtemp(prefix="distill_trainer_")

    def trainer_args(name: str, steps: int, lr: float) -> TrainingArguments:
        return TrainingArguments(
            output_dir=f"{out}/{name}",
            max_steps=steps,
            per_device_train_batch_size=3,
            gradient_accumulation_steps=2,  # the loss is exact under accumulation
            learning_rate=lr,
            lr_scheduler_type="constant",
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=max(steps // 4, 1),
            disable_tqdm=True,
            seed=0,
        )

    # 1. a teacher that knows the sentences (plain cross-entropy)
    teacher = tiny_llama(hidden=64, layers=2, seed=0)
    Trainer(
        model=teacher,
        args=trainer_args("teacher", args.teacher_steps, 1e-2),
        train_dataset=train_set,
        data_collator=collate,
    ).train()

    # 2. a smaller student distilled from it with IKL
    student = tiny_llama(hidden=32, layers=1, seed=1)
    before = next_token_ce(student, everything)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,  # frozen by the trainer; its vocabulary starts with the student's
        distill=DistillationArguments(
            loss="ikl",
            alpha=1.0,  # soft-label cross-entropy at temperature T
            beta=1.0,  # weighted MSE of logit differences
            temperature=1.0,
            weight_temperature=1.0,
            ce_weight=0.0,  # > 0 adds the hard-label cross-entropy
        ),
        args=trainer_args("student", args.steps, 3e-3),
        train_dataset=train_set,
        data_collator=collate,
    )
    trainer.train()

    result = {
        "teacher_ce": next_token_ce(teacher, everything),
        "student_ce_before": before,
        "student_ce_after": next_token_ce(student, everything),
        "uniform_ce": math.log(VOCAB),
    }
    print(
        f"next-token CE (nats): uniform {result['uniform_ce']:.2f}, teacher "
        f"{result['teacher_ce']:.2f}, student {result['student_ce_before']:.2f} -> "
        f"{result['student_ce_after']:.2f} after {args.steps} IKL steps"
    )
    return result


if __name__ == "__main__":
    main()
