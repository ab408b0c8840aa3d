"""``dkl demo --recipe llm --llm-mode on-policy``: which divergence, which mode.

The text, tokenizer and teacher are those of the LLM demo (:mod:`dkl.demos.llm`: the standard
library's docstrings, a 2,048-token BPE vocabulary, a 4-layer Llama teacher). Each training example
is a prompt of ``PROMPT`` tokens followed by a completion of ``COMPLETION`` tokens; the loss is
taken on the completion only. Students (2-layer Llama) learn with

- four divergences to the teacher's next-token distribution, at T = 1: forward KL, reverse KL,
  the generalised JSD at beta = 0.5 (TRL's ``GKDTrainer`` definition) and IKL
  (alpha = beta = T2 = 1), all through :func:`dkl.llm.fused_linear_divergence`;
- in two modes: **off-policy**, on the data's completions, and **on-policy** (Agarwal et al.
  2024, lambda = 1), on completions the student samples itself at temperature 1 from the same
  prompts (:func:`dkl.llm.generate_completions`),

each over several seeds. As in Agarwal et al., every student starts from a supervised one: per seed,
a 2-layer student is first trained with cross-entropy on the data (the same number of steps),
then each divergence and mode continues from that checkpoint on the same batches. Reported, mean ±
sample std over seeds: the validation cross-entropy on held-out text (nats per token) and its
perplexity, and a generation metric: the teacher's mean log-likelihood per token of the student's
samples (temperature 1) from held-out prompts, the quantity on-policy training is about (higher
is better). The settings were fixed before the runs, not tuned.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from dkl.demos._stats import format_mean_std, markdown_table, mean_std, pyplot, write_results
from dkl.demos.llm import (
    BATCH,
    _llama,
    _loss_fn,
    _tokenizer,
    _train,
    _windows,
    stdlib_docstrings,
)
from dkl.llm import fused_linear_divergence, generate_completions
from dkl.llm.sharded import last_hidden_state

__all__ = ["DIVERGENCE_SETTINGS", "MODES", "run_demo", "teacher_loglik"]

PROMPT, COMPLETION = 16, 16
MODES = ("off-policy", "on-policy")
DIVERGENCE_SETTINGS = {
    "kl": ("kl", {"temperature": 1.0}),
    "reverse kl": ("reverse_kl", {"temperature": 1.0}),
    "jsd(0.5)": ("jsd", {"beta": 0.5, "temperature": 1.0}),
    "ikl": ("ikl", {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 1.0}),
}
TEACHER_WINDOW = 64


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :PROMPT] = -100  # the prompt never counts
    return labels


def _divergence_loss(name: str, mode: str, teacher, timing: dict):
    kind, hp = DIVERGENCE_SETTINGS[name]

    def loss(model, step, ids):
        ids = ids[:, : PROMPT + COMPLETION]
        if mode == "on-policy":
            prompts = list(ids[:, :PROMPT])
            batch, seconds = generate_completions(
                model, prompts, max_new_tokens=COMPLETION, temperature=1.0, pad_token_id=0
            )
            timing["generation_s"] += seconds
            ids, labels = batch["input_ids"], batch["labels"]
        else:
            labels = _labels(ids)
        with torch.no_grad():
            t_hidden = last_hidden_state(teacher, {"input_ids": ids})[:, :-1]
        s_hidden = last_hidden_state(model, {"input_ids": ids})[:, :-1]
        return fused_linear_divergence(
            kind,
            s_hidden,
            model.lm_head.weight,
            t_hidden,
            teacher.lm_head.weight,
            labels=labels[:, 1:],
            **hp,
        )

    return loss


@torch.no_grad()
def teacher_loglik(student, teacher, prompts: torch.Tensor, seed: int) -> float:
    """The teacher's mean log-likelihood per token of the student's samples (temperature 1,
    ``COMPLETION`` tokens) from ``prompts``."""
    torch.manual_seed(seed)
    batch, _ = generate_completions(
        student, list(prompts), max_new_tokens=COMPLETION, temperature=1.0, pad_token_id=0
    )
    ids, labels = batch["input_ids"], batch["labels"]
    logp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float(picked[keep].mean())


def run_demo(args) -> int:
    """Teacher once, then every divergence x mode over ``args.seeds`` seeds; writes
    ``<out>/summary.json``, ``results.md`` and ``results.png``."""
    out = Path(args.out)
    seeds = args.seeds
    quick = getattr(args, "quick", False)
    steps = getattr(args, "llm_steps", None) or (40 if quick else 100)
    teacher_steps = getattr(args, "llm_teacher_steps", None) or (150 if quick else 400)
    t0 = time.time()
    train_text, val_text = stdlib_docstrings()
    tok = _tokenizer(train_text)
    vocab = tok.get_vocab_size()
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    val_all = torch.tensor(tok.encode(val_text).ids, dtype=torch.long)
    window = PROMPT + COMPLETION + 1
    n_val = min(len(val_all) // window, 128)
    val = val_all[: n_val * window].reshape(n_val, window)
    val_prompts = val[:64, :PROMPT]
    print(
        f"dkl demo: on-policy vs off-policy distillation, 4 divergences, on the standard "
        f"library's docstrings ({torch.get_num_threads()} CPU threads, BPE vocabulary {vocab}, "
        f"{PROMPT}-token prompts, {COMPLETION}-token completions); {seeds} seed(s) -> {out}/",
        flush=True,
    )
    torch.manual_seed(0)
    teacher = _llama(hidden=128, layers=4, heads=4, vocab=vocab)
    gen = torch.Generator().manual_seed(0)
    t1 = time.time()
    t_batches = [_windows(train_ids, gen, BATCH) for _ in range(teacher_steps)]
    t_res = _train(teacher, t_batches, _loss_fn("ce"), val)
    teacher.eval().requires_grad_(False)
    t_loglik = teacher_loglik(teacher, teacher, val_prompts, seed=0)
    print(
        f"  teacher  {teacher_steps} steps  val CE {t_res['val_loss']:.3f}  "
        f"log-lik of its own samples {t_loglik:.3f}  ({time.time() - t1:.0f}s)",
        flush=True,
    )
    runs: dict[tuple[str, str], list] = {(m, d): [] for m in MODES for d in DIVERGENCE_SETTINGS}
    sft_runs = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(100 + seed)
        sft_batches = [_windows(train_ids, gen, BATCH)[:, :window] for _ in range(steps)]
        batches = [_windows(train_ids, gen, BATCH) for _ in range(steps)]
        torch.manual_seed(1 + seed)
        sft = _llama(hidden=64, layers=2, heads=2, vocab=vocab)
        sft_res = _train(sft, sft_batches, _loss_fn("ce"), val)
        sft_res.update(seed=seed, teacher_loglik=teacher_loglik(sft, teacher, val_prompts, seed))
        sft_runs.append(sft_res)
        print(
            f"  supervised start     seed {seed}  val CE {sft_res['val_loss']:.3f}  "
            f"teacher log-lik {sft_res['teacher_loglik']:.3f}",
            flush=True,
        )
        start = {k: v.clone() for k, v in sft.state_dict().items()}
        for mode in MODES:
            for name in DIVERGENCE_SETTINGS:
                torch.manual_seed(1 + seed)  # the same samples' seed for every divergence
                student = _llama(hidden=64, layers=2, heads=2, vocab=vocab)
                student.load_state_dict(start)
                timing = {"generation_s": 0.0}
                t1 = time.time()
                res = _train(student, batches, _divergence_loss(name, mode, teacher, timing), val)
                seconds = time.time() - t1
                student.eval()
                res.update(
                    seed=seed,
                    time_s=round(seconds, 1),
                    generation_share=round(timing["generation_s"] / seconds, 3),
                    teacher_loglik=teacher_loglik(student, teacher, val_prompts, seed=seed),
                )
                runs[(mode, name)].append(res)
                print(
                    f"  {mode:<10} {name:<10} seed {seed}  val CE {res['val_loss']:.3f}  "
                    f"teacher log-lik {res['teacher_loglik']:.3f}  ({seconds:.0f}s"
                    + (
                        f", {100 * res['generation_share']:.0f} % sampling)"
                        if mode == MODES[1]
                        else ")"
                    ),
                    flush=True,
                )
    rows, results = [], {}
    for (mode, name), method_runs in runs.items():
        losses = [r["val_loss"] for r in method_runs]
        logliks = [r["teacher_loglik"] for r in method_runs]
        results[f"{mode} {name}"] = {
            "mode": mode,
            "divergence": name,
            "val_loss_mean": mean_std(losses)[0],
            "val_loss_std": mean_std(losses)[1],
            "teacher_loglik_mean": mean_std(logliks)[0],
            "teacher_loglik_std": mean_std(logliks)[1],
            "runs": method_runs,
        }
        rows.append(
            [
                mode,
                name,
                format_mean_std(losses, 3),
                format_mean_std([math.exp(v) for v in losses], 1),
                format_mean_std(logliks, 3),
                f"{mean_std([r['time_s'] for r in method_runs])[0]:.0f}",
            ]
        )
    sft_losses = [r["val_loss"] for r in sft_runs]
    sft_ll = [r["teacher_loglik"] for r in sft_runs]
    rows.insert(
        0,
        [
            "supervised start",
            "(ce)",
            format_mean_std(sft_losses, 3),
            format_mean_std([math.exp(v) for v in sft_losses], 1),
            format_mean_std(sft_ll, 3),
            "",
        ],
    )
    rows.append(
        [
            "teacher",
            "(reference)",
            f"{t_res['val_loss']:.3f}",
            f"{math.exp(t_res['val_loss']):.1f}",
            f"{t_loglik:.3f}",
            "",
        ]
    )
    head = (
        f"Python standard-library docstrings, BPE vocabulary {vocab}; {PROMPT}-token prompts, "
        f"loss on {COMPLETION}-token completions, batch {BATCH}, {steps} steps. Teacher: 4-layer "
        f"Llama (hidden 128), {teacher_steps} steps. Students: 2-layer Llama (hidden 64), "
        f"{steps} cross-entropy steps on the data (the supervised start), then {steps} "
        "distillation steps; off-policy = the data's completions, on-policy = the student's own samples "
        "(temperature 1, lambda = 1). Divergences at T = 1; jsd(0.5) as TRL's GKDTrainer; "
        "ikl alpha = beta = T2 = 1. Validation CE on held-out text; teacher log-lik = the "
        "teacher's mean log-probability per token of the student's samples from held-out "
        f"prompts (higher is better); {seeds} seed(s)"
        + (", mean ± sample std." if seeds > 1 else ".")
    )
    table = (
        head
        + "\n\n"
        + markdown_table(
            ["mode", "divergence", "val CE (nats)", "val ppl", "teacher log-lik", "time / run (s)"],
            rows,
        )
    )
    total = time.time() - t0
    summary = {
        "demo": "llm on-policy",
        "vocab": vocab,
        "prompt_tokens": PROMPT,
        "completion_tokens": COMPLETION,
        "steps": steps,
        "seeds": seeds,
        "teacher": {"steps": teacher_steps, "teacher_loglik": t_loglik, **t_res},
        "supervised_start": sft_runs,
        "divergences": {k: {"kind": v[0], **v[1]} for k, v in DIVERGENCE_SETTINGS.items()},
        "methods": results,
        "total_time_s": round(total, 1),
    }
    refs = {
        "teacher": (t_res["val_loss"], t_loglik),
        "supervised start": (mean_std(sft_losses)[0], mean_std(sft_ll)[0]),
    }
    write_results(out, summary, table, lambda p: _plot(results, refs, p))
    print()
    print(table)
    print(f"\ntotal {total:.0f}s; wrote {out}/summary.json, results.md, results.png")
    return 0


def _plot(results: dict, refs: dict[str, tuple[float, float]], path: Path) -> None:
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(DIVERGENCE_SETTINGS)
    x = np.arange(len(names))
    for j, (ax, key, label) in enumerate(
        (
            (axes[0], "val_loss", "validation CE (nats / token, lower is better)"),
            (axes[1], "teacher_loglik", "teacher log-lik of samples (higher is better)"),
        )
    ):
        for i, mode in enumerate(MODES):
            r = [results[f"{mode} {n}"] for n in names]
            means = [v[f"{key}_mean"] for v in r]
            stds = [v[f"{key}_std"] for v in r]
            ax.errorbar(x + (i - 0.5) * 0.25, means, yerr=stds, fmt="o", capsize=4, label=mode)
        for (name, values), style in zip(refs.items(), ("--", ":"), strict=True):
            ax.axhline(values[j], color="k", ls=style, lw=1, label=f"{name} ({values[j]:.3f})")
        ends = [v[j] for v in refs.values()]
        lo = min(min(v[f"{key}_mean"] - v[f"{key}_std"] for v in results.values()), *ends)
        hi = max(max(v[f"{key}_mean"] + v[f"{key}_std"] for v in results.values()), *ends)
        pad = 0.08 * (hi - lo) + 1e-3
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(x, names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel(label, fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_title("held-out text", fontsize=10)
    axes[1].set_title("the student's own samples", fontsize=10)
    fig.suptitle("off-policy vs on-policy distillation (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
