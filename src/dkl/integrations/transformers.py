"""IKL / KL distillation inside Hugging Face's ``Trainer`` and TRL's ``SFTTrainer``.

``pip install "dkl[llm]"`` (transformers, accelerate, trl).

::

    from transformers import TrainingArguments
    from dkl.integrations.transformers import DistillationArguments, DistillationTrainer

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        distill=DistillationArguments(loss="ikl", alpha=1.0, beta=1.0, temperature=1.0,
                                      weight_temperature=1.0, ce_weight=0.0),
        args=TrainingArguments(output_dir="out", gradient_accumulation_steps=4),
        train_dataset=train_set, data_collator=collator)
    trainer.train()

With TRL's data pipeline (chat templates, packing, completion-only labels), mix the same behaviour
into its trainer: ``IKLSFTTrainer = with_distillation(trl.SFTTrainer)``.

What the loss step does (:meth:`DistillationMixin.compute_loss`): one forward of the student and
one of the teacher (no gradient) with ``output_hidden_states=True``, the head applied to the last
position only, so no model forms its ``(N, V)`` logits (PEFT / LoRA students included); then
the chosen divergence (:func:`dkl.llm.fused_linear_divergence`) on the last hidden states and the
output heads, run as the student head's forward (:func:`dkl.llm.call_output_head`), so under
DeepSpeed ZeRO-3 the engine gathers the head for forward and backward and its gradient reaches the
partitioned parameter. The teacher is prepared like the student: a ZeRO-3 inference engine, or
sharded with FSDP2 (``fully_shard``), else moved to the student's device. Position ``i`` predicts
token ``i + 1``; tokens whose label is ``-100`` are left out. Logit soft-capping (Gemma-2's
``final_logit_softcapping``) and scaling (Cohere's ``logit_scale``, Granite's ``logits_scaling``)
are read from each model's config and applied inside the chunks, so the loss is that of the
logits the models actually produce.

On-policy distillation: ``DistillationArguments(lmbda=...)`` completes a micro-batch's prompts
with the student's samples with probability ``lmbda``, ``seq_kd=True`` with the teacher's; see
:class:`DistillationArguments`. ``generate_fn`` (a keyword of the trainer) hands the student's
sampling to another engine, e.g. vLLM.

Gradient accumulation: the summed loss of a micro-batch is divided by ``num_items_in_batch``, the
Trainer's count of valid tokens over all micro-batches of the optimiser step (and all devices,
with ``average_tokens_across_devices``), so 4 micro-batches accumulate to exactly the loss and
gradients of one batch 4 times larger, however the valid tokens are spread over them.

A batch may carry the teacher as ``teacher_topk_indices`` / ``teacher_topk_values``
``(B, L, k)`` (from :class:`dkl.llm.TopKCache` through :class:`dkl.llm.topk.TopKCollator`); the
teacher model is then not run, and may be ``None``.
"""

from __future__ import annotations

import functools
import math
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dkl.llm import (
    DIVERGENCE_HYPERPARAMETERS,
    DIVERGENCES,
    call_output_head,
    deepspeed_inference_engine,
    fully_shard_teacher,
    fused_linear_divergence,
    gathered_output_head,
)
from dkl.llm._checks import packed_batch
from dkl.llm._chunk import TAILS
from dkl.llm.onpolicy import (
    GenerateFn,
    check_position_room,
    generate_completions,
    prompts_from_labels,
)
from dkl.llm.sharded import (
    NOT_MODEL_INPUTS,
    ZERO3_HEAD_LORA,
    last_hidden_state,
    logit_transform,
    lora_adapters,
    output_head,
    output_head_shape,
    unwrap_model,
)

__all__ = [
    "DistillationArguments",
    "DistillationMixin",
    "DistillationTrainer",  # noqa: F822  (built on first access: imports transformers.Trainer)
    "causal_lm_distillation_loss",
    "logit_transform",
    "with_distillation",
]

LOSSES = DIVERGENCES


@dataclass
class DistillationArguments:
    """The distillation settings of :class:`DistillationTrainer`.

    ``loss`` is one of :data:`dkl.llm.DIVERGENCES`. ``"ikl"`` needs ``alpha`` (soft-label CE
    weight), ``beta`` (wMSE weight), ``temperature`` and ``weight_temperature`` (as in
    :func:`dkl.ikl_loss`); ``"kl"`` (forward) and ``"reverse_kl"`` need ``temperature``;
    ``"jsd"`` needs ``beta``, the generalised JSD's mixture weight in ``[0, 1]`` (TRL's
    ``GKDTrainer``: 0 = forward KL, 1 = reverse KL), and ``temperature``. ``ce_weight`` adds the
    hard-label cross-entropy on the same tokens.
    ``topk_tail`` is used when batches carry a top-k teacher.

    Where the completions come from (Agarwal et al. 2024, "On-Policy Distillation of Language
    Models", as TRL's ``GKDTrainer`` has it): with probability ``lmbda`` a micro-batch's prompts
    are completed by the *student* (on-policy) and the loss is taken on those completions;
    otherwise the data's completions are used, or, with ``seq_kd=True``, the teacher's
    (sequence-level KD). Sampling: ``max_new_tokens``, ``generation_temperature`` (0 = greedy),
    ``generation_top_p``. ``lmbda=0`` and ``seq_kd=False`` (the defaults) train on the data only,
    exactly as before. Whenever completions may be generated, every micro-batch is weighted as
    its own per-token mean (its token count is known only once it is generated).
    """

    loss: str = "ikl"
    alpha: float | None = None
    beta: float | None = None
    temperature: float | None = None
    weight_temperature: float | None = None
    ce_weight: float = 0.0
    chunk_size: int = 1024
    topk_tail: str = "renormalize"
    lmbda: float = 0.0
    seq_kd: bool = False
    max_new_tokens: int = 128
    generation_temperature: float = 1.0
    generation_top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown distillation loss {self.loss!r}: expected one of {LOSSES}")
        needed = DIVERGENCE_HYPERPARAMETERS[self.loss]
        missing = [n for n in needed if getattr(self, n) is None]
        if missing:
            raise ValueError(f"loss={self.loss!r} needs {', '.join(missing)} (no hidden defaults)")
        # (name, low, high, low allowed) per number; one line naming the field when off
        ranges = {
            "alpha": (0.0, math.inf, True),
            "beta": (0.0, 1.0 if self.loss == "jsd" else math.inf, True),
            "temperature": (0.0, math.inf, False),
            "weight_temperature": (0.0, math.inf, False),
            "ce_weight": (0.0, math.inf, True),
            "lmbda": (0.0, 1.0, True),
            "generation_temperature": (0.0, math.inf, True),
            "generation_top_p": (0.0, 1.0, False),
        }
        for name, (low, high, closed) in ranges.items():
            value = getattr(self, name)
            if value is None and name not in needed:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = number and math.isfinite(value) and (value >= low if closed else value > low)
            if not (ok and value <= high):
                bracket = "[" if closed else "("
                span = (
                    f"{bracket}{low:g}, {high:g}]" if high < math.inf else f"{bracket}{low:g}, inf)"
                )
                where = " for loss='jsd'" if name == "beta" and self.loss == "jsd" else ""
                raise ValueError(f"Expected {name} in {span}{where}, got {value!r}")
        for name in ("chunk_size", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} a positive int, got {value!r}")
        if not isinstance(self.seq_kd, bool):
            raise TypeError(f"Expected seq_kd True or False, got {self.seq_kd!r}")
        if self.topk_tail not in TAILS:
            raise ValueError(f"Unknown topk_tail {self.topk_tail!r}: expected one of {TAILS}")
        unused = [
            name
            for name in ("alpha", "beta", "weight_temperature")
            if name not in needed and getattr(self, name) is not None
        ]
        if unused:  # e.g. a TRL config's beta carried over to loss="kl": it changes nothing
            warnings.warn(
                f"{', '.join(unused)} set but not used by loss={self.loss!r} "
                f"(it uses {', '.join(needed)})",
                stacklevel=3,
            )

    @property
    def generates(self) -> bool:
        """Whether any micro-batch may be completed by a model (on-policy or sequence-level)."""
        return self.lmbda > 0 or self.seq_kd

    def part_weights(self) -> dict[str, float]:
        """The weight of each logged part in the loss (1 for a divergence's own part)."""
        if self.loss == "ikl":
            return {"wmse": float(self.beta), "sce": float(self.alpha), "ce": self.ce_weight}
        return {"ce": self.ce_weight}

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the loss function."""
        names = (*DIVERGENCE_HYPERPARAMETERS[self.loss], "ce_weight", "chunk_size", "topk_tail")
        return {n: getattr(self, n) for n in names}


def causal_lm_distillation_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: dict[str, Any],
    distill: DistillationArguments,
    *,
    per_example: bool = False,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The summed distillation loss of one batch: ``(loss_sum, parts_sum, valid_token_count)``.

    ``inputs`` holds the model inputs (``input_ids``, ``attention_mask``, ...) and ``labels``
    ``(B, L)`` (or ``shift_labels``, already shifted), optionally ``teacher_topk_indices`` /
    ``teacher_topk_values`` ``(B, L, k)``. Divide by a token count to get a mean; the Trainer
    divides by ``num_items_in_batch``. ``per_example=True``: the loss sums and token counts per
    example, ``(B,)`` each (the parts stay summed).
    """
    labels = inputs.get("shift_labels")
    shift = labels is None
    if shift:
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "Expected the batch to carry labels (next-token targets, -100 where ignored) or "
                "shift_labels for distillation, got keys " + ", ".join(sorted(inputs)) + " (the "
                "Trainer drops columns the model's forward does not take, shift_labels among "
                "them, unless TrainingArguments(remove_unused_columns=False))"
            )
        labels = labels[..., 1:]
    model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}

    def cut(x: Tensor) -> Tensor:  # position i predicts token i + 1: drop the last position
        return x[:, :-1] if shift else x

    s_tf = logit_transform(student)
    s_hidden = cut(last_hidden_state(student, model_inputs, transform=s_tf))
    kw: dict[str, Any] = {
        **distill.loss_kwargs(),
        "labels": labels.to(s_hidden.device),
        "reduction": "none" if per_example else "sum",
        "return_parts": True,
        "student_logit_scale": s_tf["logit_scale"],
        "student_softcap": s_tf["softcap"],
    }
    fn = functools.partial(fused_linear_divergence, distill.loss)
    if "teacher_topk_indices" in inputs:
        kw["teacher_topk"] = (
            cut(inputs["teacher_topk_indices"]).to(s_hidden.device),
            cut(inputs["teacher_topk_values"]).to(s_hidden.device),
        )
        t_hidden = None
    else:
        if teacher is None:
            raise ValueError(
                "Expected a teacher_model, or batches carrying teacher_topk_indices / "
                "teacher_topk_values"
            )
        t_tf = logit_transform(teacher)
        with torch.no_grad():
            t_hidden = last_hidden_state(teacher, model_inputs, transform=t_tf)
            t_hidden = cut(t_hidden).to(s_hidden.device)
        kw.update(teacher_logit_scale=t_tf["logit_scale"], teacher_softcap=t_tf["softcap"])

    def loss_from_heads(ws: Tensor, bs: Tensor | None, hidden: Tensor):
        # runs as the student head's forward under ZeRO-3 (see dkl.llm.call_output_head)
        if t_hidden is None:  # a top-k teacher from the batch
            return fn(hidden, ws, student_bias=bs, **kw)
        with gathered_output_head(teacher, grad=False) as (wt, bt):
            dev = hidden.device
            bt = bt.to(dev) if bt is not None else None
            return fn(hidden, ws, t_hidden, wt.to(dev), student_bias=bs, teacher_bias=bt, **kw)

    loss, parts = call_output_head(student, loss_from_heads, s_hidden)
    valid = labels.to(loss.device) != -100
    if per_example:  # (B, L) per token, 0 where ignored
        return loss.sum(-1), {k: v.sum() for k, v in parts.items()}, valid.sum(-1)
    return loss, parts, valid.sum()


def as_counted(batch: Any) -> Any:
    """What the Trainer's token count should see: ``batch`` with ``labels[..., 0]`` set to -100
    (a copy; position 0 is never a next-token target); with ``shift_labels``, those as the labels
    (the Trainer counts nothing in a batch without ``labels``)."""
    if not isinstance(batch, Mapping):
        return batch
    if isinstance(batch.get("shift_labels"), Tensor):
        return {**batch, "labels": batch["shift_labels"]}
    labels = batch.get("labels")
    if not isinstance(labels, Tensor) or labels.shape[-1] == 0:
        return batch
    labels = labels.clone()
    labels[..., 0] = -100
    return {**batch, "labels": labels}


def _trainer_divides_unscaled_loss(trainer: Any) -> bool:
    """Whether the Trainer's ``training_step`` divides a loss computed without
    ``num_items_in_batch`` by the accumulation steps itself. transformers >= 5 reads
    ``loss_is_scaled_for_ga`` (the mixin sets it: no); 4.53 to 4.x always do; before 4.53 only
    for models that take no loss kwargs, and the mixin says its model does (no)."""
    bases = type(trainer).__mro__
    start = bases.index(DistillationMixin) + 1 if DistillationMixin in bases else 0
    if any("loss_is_scaled_for_ga" in vars(c) for c in bases[start:]):
        return False
    import transformers

    release = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    return release >= (4, 53)


class _TrainBegin:
    """Tells the mixin when train() begins (after a checkpoint's state is loaded)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._on_train_begin(state.global_step)

    def __getattr__(self, name: str) -> Any:  # every other event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class DistillationMixin:
    """Turns a Hugging Face ``Trainer`` (or a subclass such as TRL's ``SFTTrainer``) into a
    distillation trainer; see the module docstring. Extra keyword arguments:

    Args:
        teacher_model: the frozen teacher (put in eval mode, no gradients, moved to the
            student's device; prepared by ``accelerate`` under DeepSpeed / FSDP). ``None`` when
            batches carry a top-k teacher.
        distill: :class:`DistillationArguments` (or a dict of them).

    The loss's terms are logged next to ``loss`` as ``distill/<part>``: ``wmse`` (times
    ``beta``), ``sce`` (times ``alpha``) or ``kl``, and ``ce`` (times ``ce_weight``). They are
    weighted, reduced and averaged exactly as the loss is (per token over the optimiser step's
    micro-batches and ranks, then over the steps since the last log), so they add up to the
    logged ``loss``.
    """

    # the loss returned by compute_loss is already divided by num_items_in_batch
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module | None = None,
        distill: DistillationArguments | dict | None = None,
        generate_fn: GenerateFn | None = None,
        **kwargs: Any,
    ) -> None:
        if distill is None:
            raise TypeError("Expected distill=DistillationArguments(...), got none")
        self.distill = (
            distill
            if isinstance(distill, DistillationArguments)
            else (DistillationArguments(**distill))
        )
        super().__init__(*args, **kwargs)
        # Makes every transformers >= 4.46 count num_items_in_batch over the accumulated
        # micro-batches and leave the loss it returns unscaled (compute_loss divides by it).
        self.model_accepts_loss_kwargs = True
        self._check_topk_cache_vocabulary()
        self._check_student_head()
        self.teacher = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        if self.distill.seq_kd and self.teacher is None:
            raise ValueError("seq_kd=True needs a teacher_model to generate the completions")
        if self.distill.lmbda > 0 and self.teacher is None:
            raise ValueError(
                f"lmbda={self.distill.lmbda:g} needs a teacher_model: the student's own "
                "completions have no top-k teacher entries in the batches (a cache holds the "
                "data's tokens only)"
            )
        if self.teacher is not None and not self.distill.generates and self._topk_collator():
            warnings.warn(
                "the batches carry top-k teacher entries (TopKCollator), which the loss takes "
                "instead of teacher_model: the teacher is never run and only holds memory; "
                "pass teacher_model=None",
                stacklevel=2,
            )
        self.generate_fn = generate_fn
        self._parts: dict[str, Tensor] = {}
        self._parts_since_step = 0
        self._draw_step, self._draw_index = -1, 0
        self._timing = _new_timing()
        self._eval_tokens: list[Tensor] | None = None  # (loss sum, token count) while evaluating
        self.add_callback(_TrainBegin(self))

    def _on_train_begin(self, global_step: int) -> None:
        """Each train() (a resumed one too) logs its parts from its own first step on, as the
        Trainer logs its loss."""
        self._parts, self._parts_since_step = {}, global_step
        self._timing = _new_timing()

    def _topk_collator(self) -> Any:
        """The Trainer's data collator if it is a :class:`~dkl.llm.TopKCollator`, else None."""
        from dkl.llm.topk_cache import TopKCollator

        collator = getattr(self, "data_collator", None)
        return collator if isinstance(collator, TopKCollator) else None

    def _check_topk_cache_vocabulary(self) -> None:
        """A top-k cache from a teacher whose vocabulary is smaller than the student's would
        leave student classes no teacher ever scored (a dense teacher is refused for that)."""
        collator = self._topk_collator()
        if collator is None or not collator.cache.vocab_size:
            return
        V = output_head_shape(self.model)[0]
        if collator.cache.vocab_size < V:
            raise ValueError(
                f"Expected a top-k cache from a teacher vocabulary at least as large as the "
                f"student's V = {V}, got a cache with vocab_size = {collator.cache.vocab_size}"
            )

    def _check_student_head(self) -> None:
        """What the fused loss cannot do with the student's head, refused when the trainer is
        built rather than at the first step (after the engines are made): a LoRA adapter on a
        head DeepSpeed ZeRO-3 partitions."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        stage = (config.get("zero_optimization") or {}).get("stage")
        if stage == 3 and lora_adapters(output_head(self.model)):
            raise NotImplementedError(ZERO3_HEAD_LORA)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen teacher sharded or placed like the student.

        - DeepSpeed ZeRO-3: a ZeRO-3 inference engine over the student's config (partitioned,
          no optimizer); ZeRO-1/2: the whole teacher on the student's device.
        - FSDP2: ``fully_shard`` on each decoder layer and the root, over the student's device
          mesh, with the plugin's ``reshard_after_forward``.
        - otherwise (one process, DDP): moved to the student's device.
        """
        teacher.eval().requires_grad_(False)
        accelerator = getattr(self, "accelerator", None)
        if getattr(self, "is_deepspeed_enabled", False):
            config = accelerator.state.deepspeed_plugin.deepspeed_config
            prepared = deepspeed_inference_engine(teacher, config)
            return prepared if prepared is not teacher else teacher.to(self.args.device)
        if getattr(self, "is_fsdp_enabled", False):
            plugin = accelerator.state.fsdp_plugin
            if int(getattr(plugin, "fsdp_version", 1) or 1) != 2:
                raise ValueError(
                    "Distillation under FSDP needs FSDP2 (fully_shard): the student head's "
                    "gradient is formed outside its forward, which FSDP1 cannot take. Set "
                    "fsdp_version: 2 in the accelerate / TrainingArguments fsdp_config "
                    "(transformers < 5 reads it from accelerate's config or FSDP_VERSION=2 in "
                    "the environment)"
                )
            mesh = getattr(accelerator, "torch_device_mesh", None)
            layers = getattr(plugin, "transformer_cls_names_to_wrap", None)
            return fully_shard_teacher(
                teacher,
                mesh=mesh,
                layer_classes=layers,
                reshard_after_forward=bool(getattr(plugin, "reshard_after_forward", True)),
            )
        return teacher.to(self.args.device)

    def _completion_source(self) -> str | None:
        """``"student"``, ``"teacher"`` or ``None`` (the data) for the next micro-batch. The draw
        depends only on the seed, the step and the micro-batch's place in it, so every rank draws
        the same, and so does a resumed run."""
        d = self.distill
        if not d.generates:
            return None
        # the micro-batch's place in its step, counted afresh each step: a resumed run (which
        # starts at a step's first micro-batch) draws what the uninterrupted one drew
        step = self.state.global_step
        if self._draw_step != step:
            self._draw_step, self._draw_index = step, 0
        self._draw_index += 1
        key = f"{self.args.seed}:{step}:{self._draw_index}"
        if d.lmbda > 0 and random.Random(key).random() < d.lmbda:
            return "student"
        return "teacher" if d.seq_kd else None

    def _complete(self, model: nn.Module, inputs: dict[str, Any], source: str) -> dict:
        """The micro-batch's prompts completed by ``source``'s samples."""
        if "prompts" in inputs:  # TRL's GKD collators carry the prompts on their own
            pm = inputs.get("prompt_attention_mask")
            rows = inputs["prompts"]
            prompts = [r[pm[j].bool()] if pm is not None else r for j, r in enumerate(rows)]
        else:
            if "labels" not in inputs:
                raise ValueError(
                    "Expected on-policy batches to carry labels (-100 on the prompt) or prompts "
                    "(TRL's GKD collators), got keys " + ", ".join(sorted(inputs))
                )
            prompts = prompts_from_labels(
                inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            )
        generator = model if source == "student" else self.teacher
        for role, reader in (("student", model), ("teacher", self.teacher)):  # both read it
            if reader is not None:
                check_position_room(reader, role, prompts, self.distill.max_new_tokens)
        cfg = getattr(unwrap_model(generator), "generation_config", None)
        tok = getattr(self, "processing_class", None)
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(tok, "eos_token_id", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = eos[0] if isinstance(eos, list | tuple) else (eos if eos is not None else 0)
        d = self.distill
        batch, seconds = generate_completions(
            generator,
            prompts,
            max_new_tokens=d.max_new_tokens,
            temperature=d.generation_temperature,
            top_p=d.generation_top_p,
            eos_token_id=eos,
            pad_token_id=pad,
            generate_fn=self.generate_fn if source == "student" else None,
            device=inputs["input_ids"].device,
            vocab_size=output_head_shape(model)[0],
        )
        self._timing["generation_s"] += seconds
        self._timing["on_policy"] += source == "student"
        return batch

    # The Trainer counts num_items_in_batch over labels[..., 1:] only for models whose loss_type
    # it maps to its causal-LM loss (not GPT-2, whose loss_type is None), and transformers < 5
    # over every label. The loss sums the shifted positions, so the counting sees batches whose
    # first label (never a prediction target) is -100: either rule then counts those positions.
    def _get_num_items_in_batch(self, batch_samples: list, device: Any):  # transformers >= 5
        batches = [as_counted(b) for b in batch_samples]
        return super()._get_num_items_in_batch(batches, device)  # type: ignore[misc]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, *args: Any, **kwargs: Any):
        if not hasattr(super(), "_get_num_items_in_batch"):  # counted inline on these batches
            epoch_iterator = map(as_counted, epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)  # type: ignore[misc]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        if not self.distill.generates:
            return super().training_step(model, inputs, *args, **kwargs)
        packed = packed_batch(inputs)
        if packed:  # one prompt per row would be taken, the other sequences' lost
            raise ValueError(
                f"on-policy distillation (lmbda > 0 or seq_kd) got a packed batch ({packed}): "
                "each row must hold one prompt and its completion; turn packing / padding-free "
                "collation off"
            )
        t0 = time.perf_counter()
        source = self._completion_source()
        if source is not None:
            inputs = self._complete(model, inputs, source)
        # every micro-batch its own per-token mean: a generated one's count is known only now
        if args:
            args = (None, *args[1:])
        if "num_items_in_batch" in kwargs:
            kwargs["num_items_in_batch"] = None
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._timing["step_s"] += time.perf_counter() - t0
        self._timing["micro"] += 1
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        # the module's own mode: DeepSpeed's engine stays in training mode when evaluated
        training = unwrap_model(model).training
        evaluating = not training and self._eval_tokens is not None
        total, parts, count = causal_lm_distillation_loss(
            model, self.teacher, inputs, self.distill, per_example=evaluating
        )
        if evaluating:  # every rank's examples, each once (the padding evening out ranks dropped)
            rows = torch.stack([total.detach().double(), count.double()], 1)
            rows = self.accelerator.gather_for_metrics(rows).sum(0).cpu()
            acc = self._eval_tokens
            acc[0], acc[1] = acc[0] + rows[0], acc[1] + rows[1].long()
            total, count = total.sum(), count.sum()
        if num_items_in_batch is None:
            # each micro-batch its own token mean, divided by the accumulation steps here unless
            # the Trainer does it (which transformers versions do: see the function)
            accum = 1
            if training and not _trainer_divides_unscaled_loss(self):
                accum = getattr(
                    self,
                    "current_gradient_accumulation_steps",
                    self.args.gradient_accumulation_steps,
                )
            scale = 1.0 / (count.clamp_min(1) * accum)
        else:
            scale = 1.0 / torch.as_tensor(num_items_in_batch, device=total.device).clamp_min(1)
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every device's tokens; DDP / FSDP average the grads
                scale = scale * self.accelerator.num_processes
        loss = total * scale
        if training:
            weights = self.distill.part_weights()
            for k, v in parts.items():
                term = (v * weights.get(k, 1.0) * scale).detach().double()
                self._parts[k] = self._parts.get(k, 0.0) + term
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def evaluation_loop(self, dataloader: Any, description: str, *args: Any, **kwargs: Any):
        """The Trainer's loop, whose loss is the mean of its batches' losses weighted by their
        rows, with the loss replaced by the mean over every evaluated token (the training
        loss's measure; batch size and padding do not change it)."""
        prefix = kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval")
        self._eval_tokens = [
            torch.zeros((), dtype=torch.float64),
            torch.zeros((), dtype=torch.long),
        ]
        try:
            output = super().evaluation_loop(dataloader, description, *args, **kwargs)  # type: ignore[misc]
            total, count = self._eval_tokens
        finally:
            self._eval_tokens = None
        key = f"{prefix}_loss"
        if key in output.metrics and int(count) > 0:
            output.metrics[key] = float(total / count)
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._parts and "loss" in logs:
            steps = max(self.state.global_step - self._parts_since_step, 1)
            names = sorted(self._parts)
            values = torch.stack([torch.as_tensor(self._parts[k]).double() for k in names])
            if self.accelerator.num_processes > 1:  # the mean over ranks, as the loss's
                values = self.accelerator.gather(values.to(self.accelerator.device)[None])
                values = values.reshape(-1, len(names)).mean(0)
            for k, v in zip(names, values.tolist(), strict=True):
                v /= steps
                logs[f"distill/{k}"] = round(v, 6) if math.isfinite(v) else v
            self._parts = {}
            self._parts_since_step = self.state.global_step
        timing = self._timing
        if timing["micro"] and "loss" in logs:
            logs["distill/on_policy_share"] = round(timing["on_policy"] / timing["micro"], 4)
            share = timing["generation_s"] / max(timing["step_s"], 1e-9)
            logs["distill/generation_time_share"] = round(share, 4)
            self._timing = _new_timing()
        super().log(logs, *args, **kwargs)


def _new_timing() -> dict:
    """Sampling time, step time, on-policy and all micro-batches since the last log."""
    return {"generation_s": 0.0, "step_s": 0.0, "on_policy": 0, "micro": 0}


def with_distillation(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`DistillationMixin` in front, e.g. TRL's ``SFTTrainer``.

    >>> class Base:
    ...     pass
    >>> with_distillation(Base).__name__
    'DistillationBase'
    """
    return type(f"Distillation{trainer_cls.__name__}", (DistillationMixin, trainer_cls), {})


def __getattr__(name: str):
    # DistillationTrainer imports transformers only when asked for
    if name == "DistillationTrainer":
        from transformers import Trainer

        cls = with_distillation(Trainer)
        cls.__name__ = cls.__qualname__ = "DistillationTrainer"
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
