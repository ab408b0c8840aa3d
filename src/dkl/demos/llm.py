"""``dkl demo --recipe llm``: distil a small causal LM on real English text; CE vs KD vs IKL students.

The text is the documentation strings of the Python standard library that runs this demo (module,
class and function docstrings of its top-level modules, read with :mod:`ast`): real prose written
by people, on every machine, no download. Every tenth module goes to validation, the rest to
training. A byte-pair tokenizer (``tokenizers``) with a 2,048-token vocabulary is trained on the
training text. A 4-layer Llama teacher (built from a config, random init) learns the text with
cross-entropy; then 2-layer students learn it over the same number of steps and batches with

- ``ce``: cross-entropy on the next token only,
- ``kd``: forward KL to the teacher's next-token distribution (:func:`dkl.llm.fused_linear_kl`),
- ``ikl``: IKL to the teacher (:func:`dkl.llm.fused_linear_ikl`),

each over several seeds. Reported: validation cross-entropy (nats per token) and perplexity,
mean ± sample std over seeds, and how far top-k teachers (k = 8 ... 1024) are from the full
KL / IKL on the validation tokens. The distillation losses' settings (alpha = beta = T = T2 = 1,
no hard-label term) were fixed before the runs, not tuned.
"""

from __future__ import annotations

import argparse
import ast
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dkl.demos._stats import format_mean_std, markdown_table, mean_std, pyplot, write_results
from dkl.llm import fused_linear_ikl, fused_linear_kl, topk_ikl_loss, topk_kl_loss, topk_logprobs
from dkl.llm.sharded import last_hidden_state

__all__ = ["DEMO_METHODS", "add_arguments", "main", "run_demo", "stdlib_docstrings"]

DEMO_METHODS = ("ce", "kd", "ikl")
IKL_SETTINGS = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, "weight_temperature": 1.0}
TOPK = (8, 32, 128, 1024)
VOCAB = 2048
SEQ_LEN = 64
BATCH = 16
LR = 3e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("llm demo")
    g.add_argument(
        "--llm-steps",
        type=int,
        default=None,
        help="student steps per run (default 150; 100 on-policy)",
    )
    g.add_argument(
        "--llm-teacher-steps", type=int, default=None, help="teacher steps (default 400)"
    )
    g.add_argument(
        "--llm-mode",
        choices=("offline", "on-policy"),
        default="offline",
        help="offline: ce / kd / ikl students and top-k errors (default); on-policy: forward KL, "
        "reverse KL, JSD(0.5) and IKL students, trained off-policy and on-policy",
    )
    g.add_argument(
        "--quick", action="store_true", help="on-policy mode: 40 student steps, 150 teacher steps"
    )


def main(args: argparse.Namespace) -> int:
    if getattr(args, "llm_mode", "offline") == "on-policy":
        from dkl.demos import llm_onpolicy

        return llm_onpolicy.run_demo(args)
    return run_demo(args)


def stdlib_docstrings(val_every: int = 10) -> tuple[str, str]:
    """``(train_text, val_text)``: the docstrings of the standard library's top-level modules,
    every ``val_every``-th module (in name order) held out for validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for i, path in enumerate(sorted(root.glob("*.py"))):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
        text = "\n\n".join(d for d in docs if d)
        if text:
            (val if i % val_every == 0 else train).append(text)
    if not train or not val:
        raise RuntimeError(f"Found no docstrings under {root} (the standard library's sources)")
    return "\n\n".join(train), "\n\n".join(val)


def _tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tok


def _llama(hidden: int, layers: int, heads: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(8 * hidden / 3),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=SEQ_LEN + 1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _windows(ids: torch.Tensor, gen: torch.Generator, batch: int) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + SEQ_LEN + 1] for s in starts.tolist()])


@torch.no_grad()
def _val_loss(model, val: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for chunk in val.split(64):
        logits = model(input_ids=chunk).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
    model.train()
    return float(total) / (val.shape[0] * (val.shape[1] - 1))


def _train(model, batches: list[torch.Tensor], loss_fn, val: torch.Tensor, evals: int = 5) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    steps = len(batches)
    sched = _schedule(opt, steps)
    curve = []
    every = max(1, steps // evals)
    for step, ids in enumerate(batches, start=1):
        loss = loss_fn(model, step - 1, ids)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            curve.append((step, _val_loss(model, val)))
    return {"val_loss": curve[-1][1], "curve": curve}


def _loss_fn(method: str, teacher=None, teacher_hidden: list | None = None):
    """The training loss of ``method``; the teacher's hidden states of batch ``i`` are computed
    once and kept in ``teacher_hidden`` (kd and ikl students of a seed see the same batches)."""

    def ce(model, i, ids):
        return model(input_ids=ids, labels=ids).loss

    def distill(model, i, ids):
        if i == len(teacher_hidden):
            with torch.no_grad():
                teacher_hidden.append(last_hidden_state(teacher, {"input_ids": ids})[:, :-1])
        t_hidden = teacher_hidden[i]
        s_hidden = last_hidden_state(model, {"input_ids": ids})[:, :-1]
        heads = (model.lm_head.weight, teacher.lm_head.weight)
        if method == "kd":
            return fused_linear_kl(s_hidden, heads[0], t_hidden, heads[1], temperature=1.0)
        return fused_linear_ikl(s_hidden, heads[0], t_hidden, heads[1], **IKL_SETTINGS)

    return ce if method == "ce" else distill


@torch.no_grad()
def topk_errors(student, teacher, val: torch.Tensor, ks=TOPK) -> list[dict]:
    """Relative error of the top-k KL / IKL (loss, and gradient w.r.t. the student's logits)
    against the full loss, on the validation tokens, for both tail treatments."""
    import dkl

    zs = torch.cat([student(input_ids=c).logits[:, :-1] for c in val.split(64)]).flatten(0, 1)
    zt = torch.cat([teacher(input_ids=c).logits[:, :-1] for c in val.split(64)]).flatten(0, 1)
    rows = []
    for kind in ("kl", "ikl"):
        full_fn = dkl.kl_loss if kind == "kl" else dkl.ikl_loss
        topk_fn = topk_kl_loss if kind == "kl" else topk_ikl_loss
        hp = {"temperature": 1.0} if kind == "kl" else IKL_SETTINGS
        with torch.enable_grad():
            z = zs.clone().requires_grad_(True)
            full = full_fn(z, zt, impl="torch", **hp)
            (g_full,) = torch.autograd.grad(full, z)
        for k in ks:
            if k > zt.shape[1]:
                continue
            idx, val_k = topk_logprobs(zt, k)
            mass = float(val_k.exp().sum(1).mean())
            for tail in ("renormalize", "uniform"):
                with torch.enable_grad():
                    z = zs.clone().requires_grad_(True)
                    approx = topk_fn(z, idx, val_k, tail=tail, **hp)
                    (g,) = torch.autograd.grad(approx, z)
                rows.append(
                    {
                        "loss": kind,
                        "k": k,
                        "tail": tail,
                        "teacher_mass": mass,
                        "loss_rel_err": abs(float(approx) - float(full)) / abs(float(full)),
                        "grad_rel_err": float((g - g_full).norm() / g_full.norm()),
                    }
                )
    return rows


def run_demo(args) -> int:
    """Teacher once, then ce / kd / ikl students over ``args.seeds`` seeds; writes
    ``<out>/summary.json``, ``results.md`` and ``results.png``."""
    out = Path(args.out)
    seeds = args.seeds
    steps = getattr(args, "llm_steps", None) or 150
    teacher_steps = getattr(args, "llm_teacher_steps", None) or 400
    t0 = time.time()
    train_text, val_text = stdlib_docstrings()
    tok = _tokenizer(train_text)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    val_all = torch.tensor(tok.encode(val_text).ids, dtype=torch.long)
    n_val = min(len(val_all) // (SEQ_LEN + 1), 128)  # 128 windows: 8,192 scored tokens
    val = val_all[: n_val * (SEQ_LEN + 1)].reshape(n_val, SEQ_LEN + 1)
    print(
        f"dkl demo: distilling a causal LM on the standard library's docstrings "
        f"({torch.get_num_threads()} CPU threads) "
        f"({len(train_text) / 1e6:.1f} MB train / {len(val_text) / 1e6:.2f} MB validation text, "
        f"{len(train_ids):,} train tokens, BPE vocabulary {tok.get_vocab_size()}); "
        f"{seeds} seed(s) per method -> {out}/",
        flush=True,
    )

    torch.manual_seed(0)
    teacher = _llama(hidden=128, layers=4, heads=4, vocab=tok.get_vocab_size())
    gen = torch.Generator().manual_seed(0)
    t1 = time.time()
    batches = [_windows(train_ids, gen, BATCH) for _ in range(teacher_steps)]
    t_res = _train(teacher, batches, _loss_fn("ce"), val)
    teacher.eval().requires_grad_(False)
    t_params = sum(p.numel() for p in teacher.parameters())
    print(
        f"  teacher  4x128 Llama {t_params / 1e6:.2f}M params, {teacher_steps} steps  "
        f"val CE {t_res['val_loss']:.3f}  ppl {math.exp(t_res['val_loss']):.1f}  "
        f"({time.time() - t1:.0f}s)",
        flush=True,
    )

    runs: dict[str, list] = {m: [] for m in DEMO_METHODS}
    students = {}
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(100 + seed)  # the seed's batches, for every method
        batches = [_windows(train_ids, gen, BATCH) for _ in range(steps)]
        teacher_hidden: list = []
        for method in DEMO_METHODS:
            torch.manual_seed(1 + seed)  # the same initial student for every method
            student = _llama(hidden=64, layers=2, heads=2, vocab=tok.get_vocab_size())
            t1 = time.time()
            res = _train(student, batches, _loss_fn(method, teacher, teacher_hidden), val)
            res.update(seed=seed, time_s=round(time.time() - t1, 1))
            runs[method].append(res)
            students.setdefault(method, student)
            print(
                f"  {method:<4} seed {seed}  val CE {res['val_loss']:.3f}  "
                f"ppl {math.exp(res['val_loss']):.1f}  ({res['time_s']:.0f}s)",
                flush=True,
            )
    results = {}
    for method, method_runs in runs.items():
        losses = [r["val_loss"] for r in method_runs]
        ppl = [math.exp(v) for v in losses]
        results[method] = {
            "val_loss_mean": mean_std(losses)[0],
            "val_loss_std": mean_std(losses)[1],
            "ppl_mean": mean_std(ppl)[0],
            "ppl_std": mean_std(ppl)[1],
            "runs": method_runs,
        }
    s_params = sum(p.numel() for p in students["ce"].parameters())
    topk = topk_errors(students["ce"], teacher, val)

    rows = [
        [
            m,
            format_mean_std([x["val_loss"] for x in r["runs"]], 3),
            format_mean_std([math.exp(x["val_loss"]) for x in r["runs"]], 1),
            ", ".join(f"{x['val_loss']:.3f}" for x in r["runs"]),
        ]
        for m, r in results.items()
    ]
    rows.append(
        [
            "teacher (reference)",
            f"{t_res['val_loss']:.3f}",
            f"{math.exp(t_res['val_loss']):.1f}",
            "",
        ]
    )
    head = (
        f"Python standard-library docstrings, BPE vocabulary {tok.get_vocab_size()}, "
        f"{SEQ_LEN}-token windows, batch {BATCH}. Teacher: 4-layer Llama, hidden 128 "
        f"({t_params / 1e6:.2f}M params), {teacher_steps} steps. Students: 2-layer Llama, hidden "
        f"64 ({s_params / 1e6:.2f}M params), {steps} steps on the same batches; kd = KL(T = 1), "
        f"ikl = IKL(alpha = beta = T = T2 = 1), no hard-label term. Validation: "
        f"{val.shape[0] * SEQ_LEN:,} tokens of held-out modules; {seeds} seed(s)"
        + (", mean ± sample std." if seeds > 1 else ".")
    )
    table = (
        head + "\n\n" + markdown_table(["student", "val CE (nats)", "val ppl", "per seed"], rows)
    )
    topk_rows = [
        [
            r["loss"],
            r["k"],
            r["tail"],
            f"{r['teacher_mass']:.3f}",
            f"{100 * r['loss_rel_err']:.2f} %",
            f"{100 * r['grad_rel_err']:.2f} %",
        ]
        for r in topk
    ]
    topk_table = (
        f"Top-k teacher vs the full loss on the validation tokens (teacher above, the seed-0 "
        f"ce student's logits, V = {tok.get_vocab_size()}): relative error of the loss and of "
        "its gradient w.r.t. the student's logits.\n\n"
        + markdown_table(
            ["loss", "k", "tail", "teacher mass in top-k", "loss error", "gradient error"],
            topk_rows,
        )
    )
    total = time.time() - t0
    summary = {
        "demo": "llm",
        "data": "Python standard-library docstrings",
        "vocab": tok.get_vocab_size(),
        "train_tokens": len(train_ids),
        "val_tokens": val.shape[0] * SEQ_LEN,
        "teacher": {"params": t_params, "steps": teacher_steps, **t_res},
        "student_params": s_params,
        "steps": steps,
        "seeds": seeds,
        "ikl": IKL_SETTINGS,
        "methods": results,
        "topk": topk,
        "total_time_s": round(total, 1),
    }
    write_results(
        out,
        summary,
        table + "\n\n" + topk_table,
        lambda p: _plot(results, t_res["val_loss"], topk, p),
    )
    print()
    print(table)
    print()
    print(topk_table)
    print(f"\ntotal {total:.0f}s; wrote {out}/summary.json, results.md, results.png")
    return 0


def _plot(results: dict, teacher_loss: float, topk: list[dict], path: Path) -> None:
    import numpy as np

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, r in results.items():
        steps = [s for s, _ in r["runs"][0]["curve"]]
        curves = np.array([[v for _, v in run["curve"]] for run in r["runs"]])
        mean = curves.mean(0)
        label = f"{m} ({format_mean_std([run['val_loss'] for run in r['runs']], 3)})"
        ax.plot(steps, mean, marker="o", ms=3, label=label)
        if len(curves) > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(teacher_loss, color="k", ls="--", lw=1, label=f"teacher ({teacher_loss:.3f})")
    ax.set_xlabel("student step")
    ax.set_ylabel("validation CE (nats / token)")
    ax.set_title("students on stdlib docstrings (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    for kind, style in (("kl", "-"), ("ikl", "--")):
        for tail, marker in (("renormalize", "o"), ("uniform", "s")):
            pts = [
                (r["k"], r["loss_rel_err"]) for r in topk if r["loss"] == kind and r["tail"] == tail
            ]
            if pts:
                ks, errs = zip(*pts)
                ax2.plot(ks, [100 * e for e in errs], style, marker=marker, label=f"{kind}, {tail}")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("k (teacher entries kept per token)")
    ax2.set_ylabel("relative loss error (%)")
    ax2.set_title("top-k teacher vs full loss", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
