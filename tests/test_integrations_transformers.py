"""dkl.integrations.transformers: the Trainer path against a hand-written materialised reference.

The reference runs the models normally (full logits from ``model(...).logits``, so soft-capping
is whatever the model's own forward does), shifts labels by hand and writes IKL out with the
paper's pairwise wMSE in float64. Gradient accumulation is checked by training one step with 4
micro-batches and one with a single batch 4 times larger.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from llm_helpers import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dkl.integrations.transformers import (
    DistillationArguments,
    causal_lm_distillation_loss,
    with_distillation,
)
from dkl.llm import topk_logprobs

V = 40
IKL = DistillationArguments(
    loss="ikl", alpha=1.0, beta=0.5, temperature=2.0, weight_temperature=1.0, ce_weight=0.3
)


def _llama(vocab=V, hidden=16, layers=1, seed=0):
    return tiny_llama(vocab, hidden, layers, seed)


def _batch(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i in range(n):  # ragged lengths: right padding, labels -100 there
        cut = length - (i * 2) % 5
        mask[i, cut:] = 0
        labels[i, cut:] = -100
    labels[0, :3] = -100  # a masked "prompt"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _training_step(trainer, model, batch):
    """One ``training_step`` outside ``train()`` (transformers < 5 sets the accumulation count it
    reads only inside ``train()``)."""
    if not hasattr(trainer, "current_gradient_accumulation_steps"):
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainer.training_step(model, batch)


def _ikl_rows(zs, zt, alpha, beta, temperature, weight_temperature):
    """Per-token IKL, pairwise wMSE form, float64."""
    w = torch.softmax(zt / weight_temperature, 1)
    d = (zt[:, :, None] - zt[:, None, :]) - (zs[:, :, None] - zs[:, None, :])
    wmse = 0.25 * (w[:, :, None] * w[:, None, :] * d**2).sum((1, 2))
    p = torch.softmax(zt / temperature, 1)
    sce = -(p * torch.log_softmax(zs / temperature, 1)).sum(1)
    return beta * wmse + alpha * sce


def _reference_loss(student, teacher, batch, d: DistillationArguments):
    """Mean over valid next-token positions of IKL + ce_weight * CE, from full logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    zs = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        zt = teacher(**inputs).logits[:, :-1, :V].double()  # teacher vocab cut to the student's
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    zs, zt, y = zs[keep], zt[keep], labels[keep]
    rows = _ikl_rows(zs, zt, d.alpha, d.beta, d.temperature, d.weight_temperature)
    rows = rows + d.ce_weight * F.cross_entropy(zs, y, reduction="none")
    return rows.mean()


def _trainer(student, teacher, tmp_path, distill=IKL, trainer_cls=None, **args):
    from transformers import Trainer, TrainingArguments

    defaults = {"use_cpu": True, "report_to": [], "save_strategy": "no", "disable_tqdm": True}
    targs = TrainingArguments(output_dir=str(tmp_path), **{**defaults, **args})
    cls = with_distillation(trainer_cls or Trainer)
    return cls(model=student, teacher_model=teacher, distill=distill, args=targs)


def test_trainer_loss_and_grads_match_materialised_reference(tmp_path):
    student, teacher = _llama(seed=0), _llama(vocab=V + 8, hidden=24, layers=2, seed=1)
    trainer = _trainer(student, teacher, tmp_path)
    batch = _batch()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    ref = _reference_loss(student, teacher, batch, IKL)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in teacher.parameters())


def _gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=32)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_step_loss_is_the_mean_over_predicted_tokens(tmp_path, family):
    """The Trainer divides the summed loss by its token count. Position 0 of each row is never
    predicted; the count must leave it out for every model, also GPT-2, whose loss_type the
    Trainer does not map to a causal-LM loss (it counted all 4 rows' first labels there)."""
    make = _gpt2 if family == "gpt2" else (lambda seed: _llama(seed=seed))
    student, teacher = make(0), make(1)
    batch = _batch()
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # position 0 labelled in every row
    with torch.no_grad():
        ref = _reference_loss(student, teacher, batch, IKL).item()
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = _trainer(
        student, teacher, tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=0.0
    )
    trainer.train_dataset = data
    trainer.data_collator = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    assert trainer.train().training_loss == pytest.approx(ref, rel=1e-5)


def _sgd_step(tmp_path, rows, bs, accum, lr, **args):
    """One plain SGD step of a fresh student on ``rows``: ``(parameter updates, trainer)``."""
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = _trainer(
        student,
        teacher,
        tmp_path / f"bs{bs}_accum{accum}",
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=lr,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        **args,
    )
    trainer.train_dataset, trainer.data_collator = rows, _stack
    trainer.train()
    return {n: p.detach() - start[n] for n, p in student.named_parameters()}, trainer


def test_gradient_accumulation_over_4_micro_batches_equals_one_batch(tmp_path):
    data = [{k: v[i] for k, v in _batch(n=8, seed=3).items()} for i in range(8)]
    results = []
    for bs, accum in ((8, 1), (2, 4)):
        update, trainer = _sgd_step(tmp_path, data, bs, accum, 0.5, logging_steps=1)
        results.append(update)
        logged = trainer.state.log_history[0]
        assert {"distill/wmse", "distill/sce", "distill/ce"} <= set(logged)
    one, four = results
    assert any(d.abs().max() > 1e-4 for d in one.values())  # the step did something
    for n in one:
        torch.testing.assert_close(four[n], one[n], rtol=1e-4, atol=1e-7, msg=n)


def test_topk_teacher_in_the_batch_replaces_the_teacher_model(tmp_path):
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    batch = _batch(seed=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        idx, val = topk_logprobs(teacher(**inputs).logits, V)  # k = V: the full teacher
    dense, _, _ = causal_lm_distillation_loss(student, teacher, dict(batch), IKL)
    sparse_batch = {**batch, "teacher_topk_indices": idx, "teacher_topk_values": val}
    sparse, _, count = causal_lm_distillation_loss(student, None, sparse_batch, IKL)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="Expected a teacher_model, or batches carrying"):
        causal_lm_distillation_loss(student, None, dict(batch), IKL)


def _gemma2(seed):
    """A tiny Gemma-2, whose forward soft-caps its logits (a small cap, so that it matters)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        final_logit_softcapping=1.5,
        tie_word_embeddings=False,
    )
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def test_gemma2_soft_capping_is_read_from_the_config():
    gemma = _gemma2
    student, teacher = gemma(0), gemma(1)
    batch = _batch(seed=6)
    loss, _, count = causal_lm_distillation_loss(student, teacher, dict(batch), IKL)
    (loss / count).backward()
    got = student.lm_head.weight.grad.clone()
    student.zero_grad()
    ref = _reference_loss(student, teacher, batch, IKL)  # Gemma2's forward caps its logits
    ref.backward()
    torch.testing.assert_close((loss / count).double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, student.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def _tiny_causal_lm(model_type, seed=0, **config):
    """A tiny randomly initialised causal LM of ``model_type`` (weights wide enough that a
    logit transform changes the distribution)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **config}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


# output transforms under other config keys: each model's own forward is the oracle
OUTPUT_TRANSFORMS = {
    "falcon_h1 lm_head_multiplier": (
        "falcon_h1",
        {
            "lm_head_multiplier": 0.25,
            "mamba_d_ssm": 32,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_d_state": 8,
            "mamba_chunk_size": 8,
        },
    ),
    "hyperclovax logits_scaling (multiplied)": ("hyperclovax", {"logits_scaling": 0.25}),
    "granite logits_scaling (divided)": ("granite", {"logits_scaling": 4.0}),
    "cohere logit_scale": ("cohere", {"logit_scale": 0.37}),
    "recurrent_gemma logits_soft_cap": (
        "recurrent_gemma",
        {
            "logits_soft_cap": 2.0,
            "lru_width": 32,
            "attention_window_size": 16,
            "num_hidden_layers": 3,
            "num_key_value_heads": 1,
        },
    ),
    # MPT's config has a logit_scale that transformers' MPT forward does not apply
    "mpt logit_scale (unused by its forward)": (
        "mpt",
        {"d_model": 32, "n_heads": 4, "n_layers": 2, "logit_scale": 2.0, "max_seq_len": 64},
    ),
}


@pytest.mark.parametrize("case", list(OUTPUT_TRANSFORMS))
def test_output_transforms_match_the_models_own_logits(case):
    from dkl.integrations.transformers import logit_transform
    from dkl.llm._chunk import LogitTransform
    from dkl.llm.sharded import last_hidden_state, output_head

    model_type, config = OUTPUT_TRANSFORMS[case]
    model = _tiny_causal_lm(model_type, **config)
    ids = _batch(n=2, length=8, seed=3)["input_ids"]
    with torch.no_grad():
        own = model(input_ids=ids).logits
        tf = logit_transform(model)
        hidden = last_hidden_state(model, {"input_ids": ids})
        ours = LogitTransform(tf["logit_scale"], tf["softcap"])(output_head(model)(hidden))[0]
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    teacher = _tiny_causal_lm(model_type, seed=1, **config)
    args = DistillationArguments(loss="kl", temperature=1.0)
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss, _, count = causal_lm_distillation_loss(model, teacher, batch, args)
    with torch.no_grad():  # KL on the logits the models output, in float64
        s = model(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
        t = teacher(input_ids=ids).logits[:, :-1].double().log_softmax(-1)
    ref = (t.exp() * (t - s)).sum(-1).mean()
    torch.testing.assert_close((loss / count).double(), ref, rtol=1e-5, atol=1e-6)


def test_a_batch_asking_for_tuples_still_gives_hidden_states():
    """A batch carrying return_dict=False made the forward return a tuple, and reading its
    hidden states raised a raw TypeError; the hidden states are asked for as a ModelOutput."""
    from dkl.llm.sharded import last_hidden_state

    model, ids = _llama(), _batch()["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = last_hidden_state(model, {"input_ids": ids, "return_dict": False})
    torch.testing.assert_close(got, want)


def test_an_unknown_output_transform_is_refused():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # an architecture whose forward scales its logits
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    llama = _llama()
    model = Scaled(llama.config)
    model.load_state_dict(llama.state_dict())
    batch = _batch()
    with pytest.raises(ValueError, match=r"Scaled's logits are not its output head's values"):
        causal_lm_distillation_loss(model, _llama(seed=1), dict(batch), IKL)
    # a transform passed explicitly is checked the same way, and accepted where it is right
    from dkl.llm.sharded import last_hidden_state

    last_hidden_state(model, {"input_ids": batch["input_ids"]}, transform={"logit_scale": 3.0})


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="needs alpha, beta, weight_temperature"):
        DistillationArguments(loss="ikl", temperature=1.0)
    with pytest.raises(ValueError, match="Unknown distillation loss 'tvd'"):
        DistillationArguments(loss="tvd", temperature=1.0)
    with pytest.raises(ValueError, match="loss='jsd' needs beta"):
        DistillationArguments(loss="jsd", temperature=1.0)
    with pytest.raises(ValueError, match=r"Expected beta in \[0, 1\] for loss='jsd', got 1.5"):
        DistillationArguments(loss="jsd", beta=1.5, temperature=1.0)
    kl = DistillationArguments(loss="kl", temperature=2.0)
    assert "alpha" not in kl.loss_kwargs()
    student = _llama()
    batch = _batch()
    batch.pop("labels")
    with pytest.raises(ValueError, match="Expected the batch to carry labels"):
        causal_lm_distillation_loss(student, student, batch, kl)


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house"]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _sentences(n, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(k),), generator=g))
        for k in torch.randint(low, high, (n,), generator=g)
    ]


def _sft_config(trl, tmp_path, **kw):
    return trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
        **kw,
    )


def test_trl_sft_trainer_pipeline(tmp_path):
    """TRL's SFTTrainer data pipeline (tokenising a text data set, collating, -100 padding)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    trainer = with_distillation(trl.SFTTrainer)(
        model=student,
        teacher_model=teacher,
        distill=IKL,
        args=_sft_config(trl, tmp_path, dataset_text_field="text"),
        train_dataset=datasets.Dataset.from_dict({"text": _sentences(16, 3, 9, 0)}),
        processing_class=_word_tokenizer(),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("distill/wmse" in h for h in logs)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


def test_trl_prompt_completion_data_on_policy(tmp_path):
    """TRL's prompt/completion data (the prompt masked by its collator) trained on-policy: the
    student completes each prompt, and the loss is taken on its completion only."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    data = datasets.Dataset.from_dict(
        {"prompt": _sentences(8, 2, 5, 1), "completion": [" " + c for c in _sentences(8, 2, 6, 2)]}
    )
    distill = DistillationArguments(**{**IKL.__dict__, "lmbda": 1.0, "max_new_tokens": 4})
    tokenizer = _word_tokenizer()
    trainer = with_distillation(trl.SFTTrainer)(
        model=student,
        teacher_model=teacher,
        distill=distill,
        args=_sft_config(trl, tmp_path),
        train_dataset=data,
        processing_class=tokenizer,
    )
    seen, modes = _records(trainer)
    trainer.train()
    assert len(seen) == 2 and False in modes  # two micro-batches, each sampled in eval mode
    prompts = {tuple(tokenizer(p)["input_ids"]) for p in data["prompt"]}
    for batch in seen:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            first = int((labels != -100).nonzero()[0])
            assert tuple(ids[:first].tolist()) in prompts  # a prompt of the data, masked
            n = int(mask.sum())
            assert 0 < n - first <= 4  # then at most max_new_tokens sampled tokens
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["distill/on_policy_share"] == 1.0 for h in logs)
    assert all(0 < h["distill/generation_time_share"] < 1 for h in logs)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operator returns (every allocation of forward and
    backward goes through an operator)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("wrapper", ["peft", "none"])
def test_no_student_tensor_of_n_by_v(wrapper):
    """A LoRA (PEFT) student never forms its (N, V) logits, in forward or backward."""
    vocab = 512  # N x V = 96 x 512 stands out from every weight (at most 512 x 24)
    student, teacher = _llama(vocab=vocab, seed=0), _llama(vocab=vocab, hidden=24, seed=1)
    if wrapper == "peft":
        peft = pytest.importorskip("peft")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        student = peft.get_peft_model(student, cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    distill = DistillationArguments(**{**IKL.__dict__, "chunk_size": 8})
    n_by_v = ids.numel() * vocab
    with _LargestTensor() as seen:
        loss, _, count = causal_lm_distillation_loss(student, teacher, dict(batch), distill)
        (loss / count).backward()
    assert seen.largest < n_by_v / 2, f"{seen.op} returned {seen.largest} >= N*V/2 = {n_by_v / 2}"
    with _LargestTensor() as plain:  # the check sees (N, V) logits where they are formed
        student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.sum().backward()
    assert plain.largest >= n_by_v


# ------------------------------------------------------------------------------- on-policy
def _prompted_batch(n=4, length=9, prompt=3, seed=0):
    batch = _batch(n=n, length=length, seed=seed)
    batch["labels"][:, :prompt] = -100  # completion-only: the first tokens are the prompt
    return batch


def _records(trainer):
    """The micro-batches compute_loss saw, and whether the student was in train mode while it
    generated (a forward pre-hook during generate)."""
    seen, modes = [], []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = compute_loss
    trainer.model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    return seen, modes


def test_lmbda_zero_is_the_data_path_bit_for_bit(tmp_path):
    data = [{k: v[i] for k, v in _prompted_batch(n=8, seed=3).items()} for i in range(8)]
    results = []
    for distill in (IKL, DistillationArguments(**{**IKL.__dict__, "lmbda": 0.0})):
        student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
        trainer = _trainer(
            student,
            teacher,
            tmp_path / str(len(results)),
            distill=distill,
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=0.1,
            logging_steps=1,
        )
        trainer.train_dataset = data
        trainer.data_collator = lambda f: {k: torch.stack([x[k] for x in f]) for k in f[0]}
        trainer.train()
        results.append({n: p.detach().clone() for n, p in student.named_parameters()})
        assert "distill/on_policy_share" not in trainer.state.log_history[0]
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_on_policy_step_generates_masks_the_prompt_and_matches_a_reference(tmp_path):
    student, teacher = _llama(seed=0), _llama(vocab=V + 8, hidden=24, layers=2, seed=1)
    distill = DistillationArguments(**{**IKL.__dict__, "lmbda": 1.0, "max_new_tokens": 5})
    trainer = _trainer(student, teacher, tmp_path, distill=distill, max_steps=1, logging_steps=1)
    batch = _prompted_batch()
    seen, modes = _records(trainer)
    torch.manual_seed(0)
    loss = _training_step(trainer, student.train(), dict(batch))
    (generated,) = seen
    assert modes and not modes[0] and modes[-1]  # generated in eval mode, trained in train mode
    assert student.training
    for j in range(len(batch["input_ids"])):
        prompt = batch["input_ids"][j, :3]
        n = int(generated["attention_mask"][j].sum())
        assert torch.equal(generated["input_ids"][j, :3], prompt)  # the prompt, then samples
        assert bool((generated["labels"][j, :3] == -100).all())  # the prompt is masked
        assert bool((generated["labels"][j, 3:n] == generated["input_ids"][j, 3:n]).all())
        assert 3 < n <= 3 + 5 and bool((generated["labels"][j, n:] == -100).all())
    student.zero_grad()
    ref = _reference_loss(student, teacher, generated, distill)  # float64, materialised
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_sequence_level_kd_uses_the_teachers_completions(tmp_path):
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    distill = DistillationArguments(**{**IKL.__dict__, "seq_kd": True, "max_new_tokens": 4})
    trainer = _trainer(student, teacher, tmp_path, distill=distill, max_steps=1)
    seen, modes = _records(trainer)
    _training_step(trainer, student.train(), dict(_prompted_batch()))
    assert modes == [True]  # the student ran only its training forward (no sampling)
    assert seen[0]["input_ids"].shape[1] <= 3 + 4
    with pytest.raises(ValueError, match="Expected lmbda in \\[0, 1\\], got 1.5"):
        DistillationArguments(**{**IKL.__dict__, "lmbda": 1.5})
    with pytest.raises(ValueError, match="Row 1 has no prompt"):  # row 0 has a 3-token one
        on = DistillationArguments(**{**IKL.__dict__, "lmbda": 1.0})
        _trainer(student, teacher, tmp_path, distill=on)._complete(student, _batch(), "student")


def test_on_policy_refuses_packed_batches_and_a_missing_teacher(tmp_path):
    """A packed micro-batch (DataCollatorWithFlattening, TRL's padding_free) holds several
    prompts per row; on-policy took the first document's alone and generated for it (one prompt
    for four), so it is refused. lmbda > 0 without a teacher_model (batches with cached top-k
    entries) failed only when a generated micro-batch came, without its entries."""
    from transformers import DataCollatorWithFlattening

    from dkl.llm._checks import packed_batch

    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    examples = [([11, 12, 13], [21, 22]), ([31, 32], [5, 6, 7]), ([8, 9, 10, 14], [15])]
    features = [{"input_ids": p + c, "labels": [-100] * len(p) + c} for p, c in examples]
    packed = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert packed["input_ids"].shape[0] == 1  # three documents in one row
    distill = DistillationArguments(**{**IKL.__dict__, "lmbda": 1.0, "max_new_tokens": 3})
    trainer = _trainer(student, teacher, tmp_path, distill=distill, max_steps=1)
    with pytest.raises(ValueError, match=r"packed batch \(its position_ids restart inside a row"):
        _training_step(trainer, student.train(), dict(packed))
    # left padding's positions restart after the padding only: not a packed batch
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    assert packed_batch({"position_ids": positions, "attention_mask": mask}) is None
    assert packed_batch({"cu_seq_lens_q": torch.tensor([0, 3])}) == "it carries 'cu_seq_lens_q'"
    with pytest.raises(ValueError, match=r"lmbda=0.5 needs a teacher_model"):
        on = DistillationArguments(**{**IKL.__dict__, "lmbda": 0.5})
        _trainer(student, None, tmp_path, distill=on)


@pytest.mark.parametrize("loss, beta", [("jsd", 0.5), ("jsd", 0.0), ("reverse_kl", None)])
def test_trainer_divergences_match_materialised_references(tmp_path, loss, beta):
    """TRL's generalised JSD and the reverse KL, written out in float64 from full logits."""
    student, teacher = _llama(seed=0), _llama(vocab=V + 8, hidden=24, layers=2, seed=1)
    distill = DistillationArguments(loss=loss, beta=beta, temperature=2.0, ce_weight=0.3)
    batch = _batch(seed=2)
    trainer = _trainer(student, teacher, tmp_path, distill=distill)
    got = trainer.compute_loss(student, dict(batch))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    zs = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        zt = teacher(**inputs).logits[:, :-1, :V].double()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    log_q = torch.log_softmax(zs[keep] / 2.0, -1)
    log_p = torch.log_softmax(zt[keep] / 2.0, -1)
    p, q = log_p.exp(), log_q.exp()
    if loss == "reverse_kl" or beta == 1.0:
        rows = (q * (log_q - log_p)).sum(-1)
    elif beta == 0.0:
        rows = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    ref = (rows + 0.3 * F.cross_entropy(zs[keep], labels[keep], reduction="none")).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"loss": "kl", "temperature": "4"}, r"temperature in \(0, inf\), got '4'"),
        ({"loss": "kl", "temperature": float("nan")}, r"temperature in \(0, inf\), got nan"),
        ({"loss": "kl", "temperature": 1.0, "lmbda": "0.5"}, r"lmbda in \[0, 1\], got '0.5'"),
        ({"loss": "kl", "temperature": 1.0, "lmbda": -0.1}, r"lmbda in \[0, 1\], got -0.1"),
        ({"loss": "kl", "temperature": 1.0, "max_new_tokens": 0}, "max_new_tokens a positive"),
        ({"loss": "kl", "temperature": 1.0, "chunk_size": 2.5}, "chunk_size a positive int"),
        (
            {"loss": "kl", "temperature": 1.0, "generation_top_p": 0},
            r"generation_top_p in \(0, 1\]",
        ),
        (
            {"loss": "ikl", "alpha": 1, "beta": -1, "temperature": 1, "weight_temperature": 1},
            "beta",
        ),
    ],
)
def test_distillation_arguments_name_the_field_and_its_range(kw, message):
    with pytest.raises(ValueError, match=f"Expected {message}"):
        DistillationArguments(**kw)


def test_distillation_arguments_refuse_an_unknown_tail_and_warn_of_unused_numbers():
    with pytest.raises(ValueError, match=r"Unknown topk_tail 'x': expected one of \('renormalize'"):
        DistillationArguments(loss="kl", temperature=1.0, topk_tail="x")
    with pytest.warns(
        UserWarning, match=r"beta set but not used by loss='kl' \(it uses temperature\)"
    ):
        DistillationArguments(loss="kl", temperature=1.0, beta=0.5)


def test_a_lora_adapter_on_the_output_head_is_part_of_the_loss_and_gets_its_gradient():
    """PEFT LoRA on lm_head (non-zero B): the fused loss reads the head's weight, so it must add
    s B A to it. Loss and every LoRA gradient equal those of the materialised reference, which
    calls the adapted model itself."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False
    )
    student = peft.get_peft_model(_llama(seed=0), cfg)
    teacher = _llama(seed=1)
    batch = _batch()
    total, _, count = causal_lm_distillation_loss(student, teacher, batch, IKL)
    (total / count).backward()
    lora = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in lora)
    got = {n: p.grad.clone() for n, p in lora.items()}
    student.zero_grad()
    ref = _reference_loss(student, teacher, batch, IKL)
    ref.backward()
    torch.testing.assert_close((total / count).double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for n, p in lora.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_lora_head_that_cannot_be_folded_into_its_weight_is_refused():
    peft = pytest.importorskip("peft")
    batch = _batch()
    for kw, match in (
        ({"lora_dropout": 0.1}, "Expected lora_dropout = 0 for LoRA adapter 'default'"),
        ({"use_dora": True}, "a variant \\(e.g. DoRA\\)"),
    ):
        cfg = peft.LoraConfig(r=4, target_modules=["lm_head"], **kw)
        student = peft.get_peft_model(_llama(seed=0), cfg).train()
        with pytest.raises((ValueError, NotImplementedError), match=match):
            causal_lm_distillation_loss(student, _llama(seed=1), batch, IKL)


def test_a_topk_cache_from_a_smaller_teacher_vocabulary_is_refused(tmp_path):
    """A dense teacher with fewer classes than the student is refused; a top-k cache written
    by one must be too, when the trainer is built, not trained on with classes no teacher saw."""
    from transformers import Trainer, TrainingArguments

    from dkl.llm import TopKCache
    from dkl.llm.topk_cache import TopKCollator

    ids = torch.randint(0, V - 10, (2, 5))
    cache = TopKCache.build(
        tmp_path / "c", [ids], k=4, logits_fn=lambda x: torch.randn(2, 5, V - 10), progress=False
    )
    cls = with_distillation(Trainer)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=f"student's V = {V}, got a cache with vocab_size = 30"):
        cls(
            model=_llama(seed=0),
            teacher_model=None,
            distill=DistillationArguments(loss="kl", temperature=1.0),
            args=args,
            data_collator=TopKCollator(lambda rows: rows, cache),
        )


def test_a_teacher_model_beside_a_topk_collator_is_named(tmp_path):
    """Batches with cached top-k entries take them instead of a teacher_model: a teacher passed
    as well is never run (off-policy) and only holds memory, which a warning says."""
    from transformers import Trainer, TrainingArguments

    from dkl.llm import TopKCache
    from dkl.llm.topk_cache import TopKCollator

    ids = torch.randint(0, V, (2, 5))
    cache = TopKCache.build(
        tmp_path / "c", [ids], k=4, logits_fn=lambda x: torch.randn(2, 5, V), progress=False
    )
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    build = functools.partial(
        with_distillation(Trainer),
        model=_llama(seed=0),
        args=args,
        data_collator=TopKCollator(lambda rows: rows, cache),
    )
    with pytest.warns(UserWarning, match="the teacher is never run"):
        build(
            teacher_model=_llama(seed=1), distill=DistillationArguments(loss="kl", temperature=1.0)
        )
    with warnings.catch_warnings():  # on-policy runs the teacher on the generated batches
        warnings.simplefilter("error")
        on = DistillationArguments(loss="kl", temperature=1.0, lmbda=0.5)
        build(teacher_model=_llama(seed=1), distill=on)


def test_a_topk_cache_of_a_gemma2_teacher_holds_its_capped_log_probabilities(tmp_path):
    """TopKCache.build(model=...) reads the teacher's logit transform from its config, as the
    trainer does: the cached values are log_softmax of the model's own (capped) logits."""
    from dkl.llm import TopKCache

    teacher = _gemma2(1).eval()
    ids = _batch(seed=7)["input_ids"]
    cache = TopKCache.build(tmp_path / "c", [ids], k=V, model=teacher, progress=False)
    with torch.no_grad():
        want = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    for row in range(ids.shape[0]):
        idx, val = cache[row]
        got = torch.full((ids.shape[1], V), -math.inf).scatter(1, idx, val)
        torch.testing.assert_close(got, want[row], rtol=1e-5, atol=1e-5)


def _rows_with_ragged_labels():
    """4 rows with 4 / 0 / 5 / 5 next-token labels (one micro-batch with none at all)."""
    batch = _batch(n=4, length=9, seed=8)
    batch["labels"][1] = -100
    return [{k: v[i] for k, v in batch.items()} for i in range(4)]


def _stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _shifted(rows):
    return [
        {
            "input_ids": r["input_ids"],
            "attention_mask": r["attention_mask"],
            "shift_labels": torch.cat([r["labels"][1:], torch.tensor([-100])]),
        }
        for r in rows
    ]


def test_shift_labels_batches_accumulate_exactly(tmp_path):
    """Batches that carry shift_labels alone: the Trainer counts no tokens in them, so the
    count must come from shift_labels, or accumulation weighs micro-batches wrongly."""
    rows = _shifted(_rows_with_ragged_labels())
    updates = [
        _sgd_step(tmp_path, rows, bs, accum, 1.0, remove_unused_columns=False)[0]
        for bs, accum in ((4, 1), (1, 4))
    ]
    for n in updates[0]:
        torch.testing.assert_close(updates[1][n], updates[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_eval_loss_is_the_mean_over_tokens_at_any_eval_batch_size(tmp_path):
    rows = _rows_with_ragged_labels()
    student, teacher = _llama(seed=0), _llama(hidden=24, seed=1)
    with torch.no_grad():
        ref = _reference_loss(student, teacher, _stack(rows), IKL).item()
    for bs in (4, 3, 1):
        trainer = _trainer(student, teacher, tmp_path / f"e{bs}", per_device_eval_batch_size=bs)
        trainer.data_collator = _stack
        assert trainer.evaluate(rows)["eval_loss"] == pytest.approx(ref, rel=1e-5), bs


def test_logged_parts_add_up_to_the_loss_after_a_resume(tmp_path):
    """The distill/* parts are averaged over the steps since the last log, counted from where
    this train() began: after a resume they summed to half the loss, after a second train()
    on the same trainer to twice it."""
    rows = _rows_with_ragged_labels() * 2
    kw = {
        "per_device_train_batch_size": 2,
        "learning_rate": 0.01,
        "optim": "sgd",
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    out = tmp_path / "run"

    def logs_of(trainer):
        return [log for log in trainer.state.log_history if "loss" in log]

    first = _trainer(_llama(seed=0), _llama(hidden=24, seed=1), out, max_steps=2, **kw)
    first.train_dataset, first.data_collator = rows, _stack
    first.train()
    resumed = _trainer(_llama(seed=0), _llama(hidden=24, seed=1), out, max_steps=4, **kw)
    resumed.train_dataset, resumed.data_collator = rows, _stack
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    resumed.train()  # and once more on the same trainer
    for log in logs_of(first) + logs_of(resumed):
        parts = sum(v for k, v in log.items() if k.startswith("distill/"))
        assert parts == pytest.approx(log["loss"], rel=1e-3), log


def test_a_batch_without_labels_says_which_setting_drops_them():
    batch = {k: v for k, v in _batch().items() if k != "labels"}
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        causal_lm_distillation_loss(_llama(seed=0), _llama(seed=1), batch, IKL)


def test_a_resumed_run_draws_the_completion_sources_of_the_uninterrupted_one(tmp_path):
    """The draw is keyed by the seed, the step and the micro-batch's place in it: a trainer
    built afresh at step 3 (a resume) draws what the one that ran from step 0 drew there."""
    distill = DistillationArguments(loss="kl", temperature=1.0, lmbda=0.5)

    def draws(steps):
        trainer = _trainer(_llama(), _llama(seed=1), tmp_path, distill=distill)
        trainer.args.gradient_accumulation_steps = 2
        out = []
        for step in steps:
            trainer.state.global_step = step
            out.append([trainer._completion_source() for _ in range(2)])
        return out

    whole = draws(range(12))
    assert {s for step in whole for s in step} == {"student", None}  # both sources occur
    assert draws(range(3, 12)) == whole[3:]


def test_seq_kd_with_a_padded_teacher_vocabulary_samples_only_student_ids(tmp_path):
    """A teacher whose head has rows past the student's vocabulary (padding) must not sample
    them: the student could not read the completion (a raw IndexError in its embedding)."""
    student, teacher = _llama(seed=0), _llama(vocab=V + 200, hidden=24, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight[V:] *= 30  # the padding rows would win most draws
    distill = DistillationArguments(loss="kl", temperature=1.0, seq_kd=True, max_new_tokens=6)
    trainer = _trainer(student, teacher, tmp_path, distill=distill, max_steps=1)
    seen, _ = _records(trainer)
    torch.manual_seed(0)
    loss = _training_step(trainer, student.train(), dict(_prompted_batch()))
    assert torch.isfinite(loss)
    completion = seen[0]["input_ids"][:, 3:]
    assert completion.numel() and int(completion.max()) < V


def test_completions_past_a_learned_position_table_are_refused_before_generating(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    gpt2 = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=10)
    teacher = GPT2LMHeadModel(gpt2)
    distill = DistillationArguments(loss="kl", temperature=1.0, lmbda=1.0, max_new_tokens=8)
    trainer = _trainer(_llama(seed=0), teacher, tmp_path, distill=distill, max_steps=1)
    with pytest.raises(ValueError, match=r"within the teacher's 10 positions, got 11 tokens"):
        _training_step(trainer, trainer.model.train(), dict(_prompted_batch()))


def test_a_generate_fn_completion_past_the_readers_vocabulary_is_refused():
    from dkl.llm.onpolicy import generate_completions

    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    batch, _ = generate_completions(
        None, prompts, max_new_tokens=3, generate_fn=lambda p: [[7, 8], [9]], vocab_size=V
    )
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 7, 8]
    with pytest.raises(ValueError, match=f"below the reading model's vocab_size {V}, got {V + 1}"):
        generate_completions(
            None, prompts, max_new_tokens=3, generate_fn=lambda p: [[7], [V + 1]], vocab_size=V
        )
