"""``dkl demo`` (``--recipe kd``): knowledge distillation on digits, ce / kd / dkd / ikl."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dkl.api import train
from dkl.config import load_config
from dkl.demos._stats import mean_std

__all__ = ["add_arguments", "main", "run_demo"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs", type=int, default=0, help="epochs per run (default: the presets' 30)"
    )


def main(args: argparse.Namespace) -> int:
    return run_demo(args)


DEMO_METHODS = ("ce", "kd", "dkd", "ikl")


def run_demo(args) -> int:
    """Teacher once, then ce / kd / dkd / ikl students over ``args.seeds`` seeds, on digits.

    Writes ``<out>/summary.json``, ``<out>/results.md`` and ``<out>/accuracy.png``; each run's
    own folder (config, metrics, checkpoints, curves) sits under ``<out>/``.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"train.out_dir={out}",
        "train.overwrite=true",
        "train.progress=false",
        "train.plot=false",
    ]
    if getattr(args, "epochs", 0):
        common.append(f"train.epochs={args.epochs}")
    quiet = lambda msg: None
    t0 = time.time()
    print(
        f"dkl demo: knowledge distillation on digits (1,347 train / 450 test images), "
        f"{args.seeds} seed(s) per method -> {out}/",
        flush=True,
    )
    tcfg = load_config("kd/digits_teacher", common)
    teacher = train(tcfg, log=quiet)
    teacher_ckpt = out / tcfg.name / "best.pt"
    print(
        f"  teacher  {tcfg.model.name}{tcfg.model.kwargs}  {teacher['params']:,} params  "
        f"top-1 {teacher['last']['top1']:.2f}  ({teacher['wall_time_s']:.1f}s)",
        flush=True,
    )

    results: dict = {}
    for method in DEMO_METHODS:
        runs = []
        for seed in range(args.seeds):
            cfg = load_config(
                f"kd/digits_{method}",
                [
                    *common,
                    f"name=digits_{method}_s{seed}",
                    f"seed={seed}",
                    f"distill.teacher.checkpoint={teacher_ckpt}",
                ],
            )
            s = train(cfg, log=quiet)
            hist = [json.loads(line) for line in (out / cfg.name / "metrics.jsonl").open()]
            runs.append(
                {
                    "seed": seed,
                    "top1": s["last"]["top1"],
                    "best_top1": s["best"]["top1"],
                    "time_s": s["wall_time_s"],
                    "curve": [h["top1"] for h in hist],
                    "params": s["params"],
                }
            )
            print(
                f"  {method:<4} seed {seed}  top-1 {s['last']['top1']:.2f}  "
                f"({s['wall_time_s']:.1f}s)",
                flush=True,
            )
        top1_mean, top1_std = mean_std([r["top1"] for r in runs])
        results[method] = {
            "top1_mean": top1_mean,
            "top1_std": top1_std,
            "time_s_mean": mean_std([r["time_s"] for r in runs])[0],
            "params": runs[0]["params"],
            "runs": runs,
            "config": f"kd/digits_{method}",
        }

    student = load_config("kd/digits_ce").model
    lines = [
        (
            f"Digits, teacher `{tcfg.model.name}` {dict(tcfg.model.kwargs)} "
            f"({teacher['params']:,} params, top-1 {teacher['last']['top1']:.2f}) -> student "
            f"`{student.name}` {dict(student.kwargs)} ({results['ce']['params']:,} params), "
            f"{tcfg.train.epochs} epochs, {args.seeds} seeds (last-epoch top-1 on the 450 test "
            f"images)."
        ),
        "",
        "| method | top-1 (mean ± std) | time / run |",
        "|---|---|---|",
    ]
    for m, r in results.items():
        lines.append(
            f"| {m} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['time_s_mean']:.1f} s |"
        )
    table = "\n".join(lines)
    total = time.time() - t0
    summary = {
        "teacher": {
            "model": tcfg.model.name,
            "kwargs": tcfg.model.kwargs,
            "params": teacher["params"],
            "top1": teacher["last"]["top1"],
        },
        "student": {"model": student.name, "kwargs": student.kwargs},
        "epochs": tcfg.train.epochs,
        "seeds": args.seeds,
        "methods": results,
        "total_time_s": round(total, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    _plot_demo(results, out / "accuracy.png", teacher["last"]["top1"])
    print()
    print(table)
    print(f"\ntotal {total:.0f}s; wrote {out}/summary.json, results.md, accuracy.png")
    return 0


def _plot_demo(results: dict, path, teacher_top1: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, r in results.items():
        curves = np.array([run["curve"] for run in r["runs"]], dtype=float)
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, label=f"{m} ({r['top1_mean']:.2f})")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher ({teacher_top1:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("digits: student test accuracy per epoch (mean ± std over seeds)")
    lo = min(
        float(
            np.min(
                [
                    run["curve"][len(run["curve"]) // 3 :]
                    for r in results.values()
                    for run in r["runs"]
                ]
            )
        )
        - 1,
        95,
    )
    ax.set_ylim(lo, 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
