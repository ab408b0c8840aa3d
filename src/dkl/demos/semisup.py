"""``dkl demo --recipe semisup``: supervised vs FixMatch vs FixMatch-IKL on digits with 3 labels
per class."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dkl.api import make_trainer
from dkl.config import load_config
from dkl.demos._stats import (
    format_mean_std,
    markdown_table,
    mean_std,
    plot_bars,
    write_results,
)

__all__ = ["add_arguments", "main", "run_demo"]

DEMO_METHODS = ("supervised", "fixmatch", "fixmatch_ikl")
_TABLE_HEAD = ("method", "top-1", "per seed", "mask ratio", "pseudo-label acc. (%)")


def run_demo(
    out: str | Path = "runs/demo_ssl",
    *,
    seeds: int = 3,
    methods: Iterable[str] = DEMO_METHODS,
    overrides: Iterable[str] = (),
    log: Any = print,
) -> tuple[str, dict[str, list[dict]]]:
    """Train ``semisup/digits_<method>`` for each method and seed; return (markdown table, runs).

    Writes ``<out>/summary.json``, ``<out>/results.md`` (the table) and ``<out>/results.png``.

    The seed picks the labeled subset as well as the initialisation, so the spread includes the
    luck of the labels. Top-1 is the final model's (no best-of-run picking).
    """
    runs: dict[str, list[dict]] = {}
    labeled = None
    for method in methods:
        for seed in range(seeds):
            cfg = load_config(
                f"semisup/digits_{method}",
                [
                    f"seed={seed}",
                    f"name={method}_seed{seed}",
                    f"train.out_dir={out}",
                    "train.overwrite=true",
                    "train.progress=false",
                    *overrides,
                ],
            )
            trainer = make_trainer(cfg, log=lambda m: None)
            summary = trainer.fit()
            last = trainer.history[-1]
            labeled = summary.get("num_labeled", labeled)
            runs.setdefault(method, []).append(
                {
                    "seed": seed,
                    "top1": summary["last"]["top1"],
                    "time_s": summary["wall_time_s"],
                    "mask_ratio": last.get("mask_ratio"),
                    "pl_acc": last.get("pl_acc"),
                }
            )
            log(
                f"  {method:13s} seed {seed}: top-1 {summary['last']['top1']:.2f}  "
                f"({summary['wall_time_s']:.0f} s)"
            )

    def column(rs: list[dict], key: str, digits: int) -> str:
        vals = [r[key] for r in rs if r[key] is not None]
        return format_mean_std(vals, digits) if vals else "–"

    spread = ", mean ± sample std" if seeds > 1 else ""
    head = (
        f"Digits, {labeled} labeled training images, {seeds} seed(s){spread} (the seed picks "
        f"the labeled images too); final model's test top-1 (%), mask ratio and pseudo-label "
        f"accuracy at the last evaluation"
    )
    rows = [
        [
            method,
            column(rs, "top1", 2),
            ", ".join(f"{r['top1']:.1f}" for r in rs),
            column(rs, "mask_ratio", 2),
            column(rs, "pl_acc", 1),
        ]
        for method, rs in runs.items()
    ]
    table = head + "\n\n" + markdown_table(_TABLE_HEAD, rows)
    summary = {
        "demo": "semisup",
        "num_labeled": labeled,
        "seeds": seeds,
        "overrides": list(overrides),
        "methods": {
            m: {
                "top1_mean": mean_std([r["top1"] for r in rs])[0],
                "top1_std": mean_std([r["top1"] for r in rs])[1],
                "runs": rs,
                "config": f"semisup/digits_{m}",
            }
            for m, rs in runs.items()
        },
    }
    bars = {"test top-1": {m: [r["top1"] for r in rs] for m, rs in runs.items()}}
    write_results(
        out,
        summary,
        table,
        lambda p: plot_bars(
            p, bars, ylabel="test top-1 (%)", title=f"digits, {labeled} labeled images"
        ),
    )
    return table, runs


def main(args: Any) -> int:
    # The digits models are tiny: one thread is faster than two, and immune to oversubscription.
    torch.set_num_threads(1)
    seeds = int(getattr(args, "seeds", 3))
    out = Path(getattr(args, "out", None) or "runs/demo_ssl")
    if out.name == "demo":  # the shared default: keep the SSL runs apart from the KD demo's
        out = out.parent / "demo_ssl"
    overrides = list(getattr(args, "ssl_set", None) or [])
    print(f"SSL demo on digits: {', '.join(DEMO_METHODS)}; {seeds} seed(s); runs in {out}")
    table, _ = run_demo(out, seeds=seeds, overrides=overrides)
    print(table)
    print(f"wrote {out}/summary.json, results.md, results.png")
    return 0


def add_arguments(p: Any) -> None:
    p.add_argument(
        "--ssl-set",
        action="append",
        metavar="KEY=VALUE",
        help="semisup demo: a config override for every run (repeatable), "
        "e.g. --ssl-set train.iterations=300",
    )
