"""One optimiser step of the distillation Trainer on several ranks, run by ``torchrun``.

Started by ``tests/test_llm_sharding.py`` (2 CPU ranks, gloo). It loads a student and a teacher
saved by the test with ``from_pretrained`` *after* the ``TrainingArguments`` exist, as users do,
so under DeepSpeed ZeRO-3 both are created partitioned (``zero.Init``). The step is plain SGD
(lr 1, no clipping, constant schedule), so ``start - end`` of each trainable parameter is its
gradient. Rank 0 writes the gathered parameters after the step, the loss of the step summed over
the ranks, and the logged line to ``--out`` (``torch.save``); the test compares them with one
process in float64.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path


def _ds_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP path on CPU ranks (gloo).

    accelerate keeps FSDP for accelerator devices and trains with DDP on CPU; ``fully_shard``
    itself runs on CPU with gloo. When the Trainer asks for FSDP, this turns the CPU state into
    accelerate's FSDP state after its own set-up, so its real FSDP2 preparation runs here.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *a, fsdp_plugin=None, **kw):
        init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            type(self)._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="folder with student/ and teacher/")
    parser.add_argument("--data", required=True, help="a .pt list of examples")
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=("ddp", "zero3", "fsdp2"), default="zero3")
    parser.add_argument("--lora", default=None, help="a saved PEFT adapter to train")
    parser.add_argument("--lora-targets", default=None, help="a new LoRA on these modules")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument(
        "--distill",
        default='{"loss": "ikl", "alpha": 1.0, "beta": 0.5, '
        '"temperature": 2.0, "weight_temperature": 1.0, "ce_weight": 0.3}',
    )
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from dkl.integrations.transformers import DistillationArguments, with_distillation

    examples = torch.load(args.data)
    cuda = torch.cuda.is_available()
    engine_args: dict = {"use_cpu": not cuda}
    if args.engine == "zero3":
        engine_args["deepspeed"] = _ds_config(3)
    elif args.engine == "fsdp2":
        if not cuda:
            _fsdp_on_cpu()
        os.environ["FSDP_VERSION"] = "2"  # transformers < 5 does not pass fsdp_version on
        engine_args["fsdp"] = "full_shard"
        engine_args["fsdp_config"] = {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            # transformers < 5 asks FSDP to broadcast rank 0's weights, which it refuses on CPU
            # (the ranks load the same weights anyway)
            "sync_module_states": False,
            "cpu_ram_efficient_loading": False,
        }
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = len(examples) // (world * args.accum)
    targs = TrainingArguments(
        output_dir=str(Path(args.out).parent / "trainer"),
        **engine_args,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.accum,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        per_device_eval_batch_size=1,
    )
    student = AutoModelForCausalLM.from_pretrained(f"{args.models}/student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(f"{args.models}/teacher", dtype=torch.float32)
    if args.lora:
        from peft import PeftModel

        student = PeftModel.from_pretrained(student, args.lora, is_trainable=True)
    if args.lora_targets:
        import peft

        targets = args.lora_targets.split(",")
        cfg = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets)
        student = peft.get_peft_model(student, cfg)

    losses: list[float] = []
    seen: list[dict] = []

    rank = int(os.environ.get("RANK", "0"))

    class Recording(with_distillation(Trainer)):
        def get_train_dataloader(self):
            # each rank its own examples, in order (the Trainer's loader, prepared by accelerate,
            # gave both CPU ranks the same batch under DeepSpeed's CPU accelerator)
            mine = examples[rank::world]
            return torch.utils.data.DataLoader(mine, batch_size=per_device, collate_fn=collate)

        def compute_loss(self, model, inputs, *a, **kw):
            loss = super().compute_loss(model, inputs, *a, **kw)
            if isinstance(loss, tuple):  # evaluate() asks for the outputs too: not recorded
                return loss
            seen.append({k: v.detach().cpu() for k, v in inputs.items()})
            return loss

        def training_step(self, *a, **kw):
            # what backward was given (transformers < 5 divides some losses by the accumulation
            # steps after compute_loss)
            loss = super().training_step(*a, **kw)
            losses.append(float(loss))
            return loss

    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    trainer = Recording(
        model=student,
        teacher_model=teacher,
        distill=DistillationArguments(**json.loads(args.distill)),
        args=targs,
        train_dataset=examples,
        data_collator=collate,
    )
    trainer.train()
    # after the step, on 5 examples: the ranks' last batches are evened out with a repeated one
    # (drop_last would drop the fifth instead)
    trainer.args.dataloader_drop_last = False
    eval_loss = trainer.evaluate(examples[:5])["eval_loss"]
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False))
    # each rank's micro-batch losses add up to (world x) its share of the step's mean
    step_loss = torch.tensor(sum(losses), dtype=torch.float64, device=trainer.args.device)
    if dist.is_initialized():
        dist.all_reduce(step_loss)
    step_loss = float(step_loss) / world
    batches = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(batches, seen)
    else:
        batches = [seen]
    named = list(trainer.model.named_parameters())
    gather = contextlib.nullcontext()
    if args.engine == "zero3":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gather:
        params = {
            n.removeprefix("module."): (p.full_tensor() if hasattr(p, "full_tensor") else p)
            .detach()
            .cpu()
            .clone()
            for n, p in named
        }
    teacher_params = list(trainer.teacher.parameters())
    if rank == 0:
        teacher_engine = type(trainer.teacher).__name__
        sharded = [hasattr(p, "placements") or hasattr(p, "ds_id") for p in teacher_params]
        torch.save(
            {
                "params": params,
                "loss": step_loss,
                "eval_loss": eval_loss,
                "log": trainer.state.log_history[0],
                "teacher_type": teacher_engine,
                "teacher_sharded": all(sharded),
                "fsdp": fsdp,
                "teacher_device": str(teacher_params[0].device),
                "student_device": str(next(trainer.model.parameters()).device),
                "batches": batches,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
    import gc

    import torch.distributed as dist

    # The Trainer sits in reference cycles: left to the interpreter's exit, its process-group
    # users are torn down after the group, and a gloo rank can abort ("terminate called without
    # an active exception"). Free them first, then end the group on every rank together.
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
