"""``dkl demo`` (``--recipe kd``): knowledge distillation on digits, ce / kd / dkd / ikl.

The setting is one where a teacher is known to help (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network", section 2): the teacher was trained with every label, the student sees the
labels of 5 % of the training images (``distill.label_fraction`` in ``kd/_digits_student``) and
the teacher's outputs on all of them. With every label, digits is too easy for a teacher to add
anything to a student trained alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dkl.api import train
from dkl.config import load_config
from dkl.data import build_datasets
from dkl.demos._stats import format_mean_std, markdown_table, mean_std, pyplot, write_results

__all__ = ["DEMO_METHODS", "add_arguments", "main", "run_demo"]

DEMO_METHODS = ("ce", "kd", "dkd", "ikl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: the presets' 30)"
    )


def main(args: argparse.Namespace) -> int:
    return run_demo(args)


def run_demo(args) -> int:
    """Teacher once, then ce / kd / dkd / ikl students over ``args.seeds`` seeds, on digits.

    Writes ``<out>/summary.json``, ``<out>/results.md`` and ``<out>/results.png`` (test top-1
    per epoch); each run's own folder (config, metrics, checkpoints) sits under ``<out>/``.
    The seed picks the student's labeled images as well as its initialisation.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"train.out_dir={out}",
        "train.overwrite=true",
        "train.progress=false",
        "train.plot=false",
    ]
    if getattr(args, "epochs", None) is not None:  # 0 too: the config refuses it in one line
        common.append(f"train.epochs={args.epochs}")
    quiet = lambda msg: None
    t0 = time.time()
    scfg = load_config("kd/digits_ce", common)
    train_set, test_set, _ = build_datasets(scfg.data.name)
    n_train, n_test = len(train_set), len(test_set)
    print(
        f"dkl demo: knowledge distillation on digits ({n_train:,} train / {n_test} test "
        f"images); the student sees the labels of {scfg.distill.label_fraction:.0%} of the "
        f"training images and the teacher's outputs on all; {args.seeds} seed(s) per method "
        f"-> {out}/",
        flush=True,
    )
    tcfg = load_config("kd/digits_teacher", common)
    teacher = train(tcfg, log=quiet)
    # the teacher's last weights, as the students' reported accuracy is their last epoch's (a
    # best.pt would be picked on the test images)
    teacher_ckpt = out / tcfg.name / "final.pt"
    print(
        f"  teacher  {tcfg.model.name} {dict(tcfg.model.kwargs)}  {teacher['params']:,} params, "
        f"all labels  top-1 {teacher['last']['top1']:.2f}  ({teacher['wall_time_s']:.1f}s)",
        flush=True,
    )

    def runs_of(preset: str, tag: str, extra: tuple[str, ...] = ()) -> dict:
        runs = []
        for seed in range(args.seeds):
            cfg = load_config(
                preset,
                [
                    *common,
                    f"name=digits_{tag}_s{seed}",
                    f"seed={seed}",
                    f"distill.teacher.checkpoint={teacher_ckpt}",
                    *extra,
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
                    "labeled_images": s.get("labeled_images", n_train),
                }
            )
            print(
                f"  {tag:<13} seed {seed}  top-1 {s['last']['top1']:.2f}  "
                f"({s['wall_time_s']:.1f}s)",
                flush=True,
            )
        m, sd = mean_std([r["top1"] for r in runs])
        return {
            "top1_mean": m,
            "top1_std": sd,
            "time_s_mean": mean_std([r["time_s"] for r in runs])[0],
            "params": runs[0]["params"],
            "runs": runs,
            "config": preset + "".join(f" {o}" for o in extra),
        }

    results = {m: runs_of(f"kd/digits_{m}", m) for m in DEMO_METHODS}
    # what the labels the student lacks are worth: the same student trained alone on all of them
    reference = runs_of("kd/digits_ce", "ce_all_labels", ("distill.label_fraction=1",))

    labeled = results["ce"]["runs"][0]["labeled_images"]
    student = scfg.model
    head = (
        f"Digits, teacher `{tcfg.model.name}` {dict(tcfg.model.kwargs)} ({teacher['params']:,} "
        f"params, trained on all {n_train:,} labels, top-1 {teacher['last']['top1']:.2f}) -> "
        f"student `{student.name}` {dict(student.kwargs)} ({results['ce']['params']:,} params) "
        f"that sees the labels of {labeled} of the {n_train:,} training images (chosen by the "
        f"seed) and the teacher's outputs on all of them; {tcfg.train.epochs} epochs, "
        f"{args.seeds} seed(s); last-epoch top-1 (%) on the {n_test} test images"
        + (", mean ± sample std." if args.seeds > 1 else ".")
    )
    rows = [
        [
            m,
            format_mean_std([x["top1"] for x in r["runs"]]),
            ", ".join(f"{x['top1']:.1f}" for x in r["runs"]),
            f"{r['time_s_mean']:.1f} s",
        ]
        for m, r in [*results.items(), (f"ce, all {n_train:,} labels (reference)", reference)]
    ]
    table = head + "\n\n" + markdown_table(["method", "top-1", "per seed", "time / run"], rows)
    total = time.time() - t0
    summary = {
        "demo": "kd",
        "teacher": {
            "model": tcfg.model.name,
            "kwargs": tcfg.model.kwargs,
            "params": teacher["params"],
            "top1": teacher["last"]["top1"],
        },
        "student": {"model": student.name, "kwargs": student.kwargs},
        "label_fraction": scfg.distill.label_fraction,
        "labeled_images": labeled,
        "train_images": n_train,
        "epochs": tcfg.train.epochs,
        "seeds": args.seeds,
        "methods": results,
        "reference_ce_all_labels": reference,
        "total_time_s": round(total, 1),
    }
    write_results(
        out,
        summary,
        table,
        lambda p: _plot_curves(results, reference, p, teacher["last"]["top1"], labeled),
    )
    print()
    print(table)
    print(f"\ntotal {total:.0f}s; wrote {out}/summary.json, results.md, results.png")
    return 0


def _plot_curves(
    results: dict, reference: dict, path: Path, teacher_top1: float, labeled: int
) -> None:
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m, r in results.items():
        curves = np.array([run["curve"] for run in r["runs"]], dtype=float)
        x = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(0)
        ax.plot(x, mean, label=f"{m} ({format_mean_std([run['top1'] for run in r['runs']])})")
        if len(curves) > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ref = np.array([run["curve"] for run in reference["runs"]], dtype=float).mean(0)
    ax.plot(
        np.arange(1, len(ref) + 1),
        ref,
        color="0.5",
        ls=":",
        label=f"ce, all labels ({format_mean_std([r['top1'] for r in reference['runs']])})",
    )
    ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher ({teacher_top1:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"digits: student with {labeled} labels + the teacher on all images", fontsize=10)
    tail = [v for r in results.values() for run in r["runs"] for v in run["curve"][2:]]
    ax.set_ylim(max(min(tail, default=0.0) - 2, 0), 100.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
