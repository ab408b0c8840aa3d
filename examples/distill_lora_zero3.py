"""Distil a causal LM into a LoRA student with the Hugging Face Trainer under DeepSpeed ZeRO-3.

The teacher and the student's base model are loaded *after* the ``TrainingArguments``, so under
ZeRO-3 both are created partitioned (``zero.Init``): no rank ever holds a whole model. dkl's
trainer wraps the teacher as a ZeRO-3 inference engine and computes IKL from the last hidden
states inside the student head's forward, so the head's gradient reaches its partitioned weight
(and the ``(N, V)`` logits are never formed).

Launch, one node with N GPUs::

    torchrun --nproc_per_node N examples/distill_lora_zero3.py \\
        --teacher path/to/teacher --student path/to/student --text train.txt --out runs/lora

On CPU ranks (as the test suite runs it; tiny random Llamas, no files needed)::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/distill_lora_zero3.py --tiny

Needs ``pip install "dkl[llm,deepspeed,peft]"``.
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from dkl.integrations.transformers import DistillationArguments, with_distillation

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A random 2-layer teacher and 1-layer student (Llama, vocabulary 64), saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for name, hidden, layers in (("teacher", 32, 2), ("student", 16, 1)):
        torch.manual_seed(len(paths))
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        LlamaForCausalLM(cfg).save_pretrained(folder / name)
        paths.append(folder / name)
    return paths[0], paths[1]


def text_examples(tokenizer_path: Path, text: Path, length: int) -> list[dict]:
    """Lines of ``text``, tokenised and cut to ``length`` tokens (labels = input ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    lines = [ln for ln in text.read_text().splitlines() if ln.strip()]
    out = []
    for line in lines:
        ids = tok(line, truncation=True, max_length=length)["input_ids"]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def random_examples(n: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g).tolist()
    return [{"input_ids": x, "labels": list(x)} for x in ids]


def collate(features: list[dict], pad: int = 0) -> dict:
    """Right padding; labels -100 on padding."""
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), L), pad, dtype=torch.long)
    labels = torch.full((len(features), L), -100, dtype=torch.long)
    mask = torch.zeros((len(features), L), dtype=torch.long)
    for j, f in enumerate(features):
        n = len(f["input_ids"])
        ids[j, :n], labels[j, :n], mask[j, :n] = (
            torch.tensor(f["input_ids"]),
            torch.tensor(f["labels"]),
            1,
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, help="a causal LM folder (from_pretrained)")
    parser.add_argument("--student", type=Path, help="the student's base model folder")
    parser.add_argument("--text", type=Path, help="training text, one example per line")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llamas and tokens")
    parser.add_argument("--out", type=Path, default=Path("runs/distill_lora_zero3"))
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="per device")
    parser.add_argument("--length", type=int, default=128, help="tokens per example")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    args = parser.parse_args()
    if not args.tiny and not (args.teacher and args.student and args.text):
        parser.error("give --teacher, --student and --text, or --tiny")

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:  # saved before the arguments exist: zero.Init must not build these
            teacher_path, student_path = tiny_models(Path(tmp))
            examples = random_examples(8 * args.batch_size, min(args.length, 32), 64)
        else:
            teacher_path, student_path = args.teacher, args.student
            examples = text_examples(student_path, args.text, args.length)
        # the arguments first: from_pretrained then loads every model partitioned (zero.Init)
        targs = TrainingArguments(
            output_dir=str(args.out),
            deepspeed=ZERO3,
            use_cpu=not torch.cuda.is_available(),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
        )
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
        student = AutoModelForCausalLM.from_pretrained(student_path)

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear")
    student = get_peft_model(student, lora)
    trainer = with_distillation(Trainer)(
        model=student,
        teacher_model=teacher,
        distill=DistillationArguments(
            loss="ikl", alpha=1.0, beta=1.0, temperature=1.0, weight_temperature=1.0
        ),
        args=targs,
        train_dataset=examples,
        data_collator=collate,
    )
    result = trainer.train()
    trainer.save_model(str(args.out))  # the LoRA adapter, gathered from the ranks
    if trainer.is_world_process_zero():
        loss = result.training_loss
        print(f"trained {args.max_steps} steps, loss {loss:.4f}; adapter in {args.out}")
        if not math.isfinite(loss):
            raise SystemExit("the loss is not finite")


if __name__ == "__main__":
    main()
    # the Trainer sits in reference cycles: free it before the process group ends, and end the
    # group on every rank together (left to the interpreter's exit, a gloo rank can abort)
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
