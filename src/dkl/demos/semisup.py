"""``dkl demo --recipe semisup``: supervised vs FixMatch vs FixMatch-IKL on digits with 3 labels
per class."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dkl.api import make_trainer
from dkl.config import load_config
from dkl.demos._stats import mean_std

__all__ = ["add_arguments", "main", "run_demo"]

DEMO_METHODS = ("supervised", "fixmatch", "fixmatch_ikl")
_TABLE_HEAD = (
    "| method | top-1 (%) mean ± std | per seed | mask ratio (last) | pseudo-label acc. (last, %) |"
)


def run_demo(
    out: str | Path = "runs/demo_ssl",
    *,
    seeds: int = 3,
    methods: Iterable[str] = DEMO_METHODS,
    overrides: Iterable[str] = (),
    log: Any = print,
) -> tuple[str, dict[str, list[dict]]]:
    """Train ``semisup/digits_<method>`` for each method and seed; return (markdown table, runs).

    The seed picks the labeled subset as well as the initialisation, so the spread includes the
    luck of the labels. Top-1 is the final model's (no best-of-run picking).
    """
    runs: dict[str, list[dict]] = {}
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
    lines = [
        _TABLE_HEAD,
        "|---|---|---|---|---|",
    ]
    for method, rs in runs.items():
        m, s = mean_std([r["top1"] for r in rs])
        per = ", ".join(f"{r['top1']:.1f}" for r in rs)
        masks = [r["mask_ratio"] for r in rs if r["mask_ratio"] is not None]
        pls = [r["pl_acc"] for r in rs if r["pl_acc"] is not None]
        mask = "–" if not masks else "{:.2f} ± {:.2f}".format(*mean_std(masks))
        pl = "–" if not pls else "{:.1f} ± {:.1f}".format(*mean_std(pls))
        lines.append(f"| {method} | {m:.2f} ± {s:.2f} | {per} | {mask} | {pl} |")
    table = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ssl_table.md").write_text(table + "\n")
    return table, runs


def main(args: Any) -> int:
    # The digits models are tiny: one thread is faster than two, and immune to oversubscription.
    torch.set_num_threads(1)
    seeds = int(getattr(args, "seeds", 3))
    out = Path(getattr(args, "out", "runs/demo"))
    if out.name == "demo":  # the shared default: keep the SSL runs apart from the KD demo's
        out = out.parent / "demo_ssl"
    overrides = list(getattr(args, "ssl_set", None) or [])
    print(f"SSL demo on digits: {', '.join(DEMO_METHODS)}; {seeds} seed(s); runs in {out}")
    table, _ = run_demo(out, seeds=seeds, overrides=overrides)
    print(table)
    print(f"(table saved to {out / 'ssl_table.md'})")
    return 0


def add_arguments(p: Any) -> None:
    p.add_argument(
        "--ssl-set",
        action="append",
        metavar="KEY=VALUE",
        help="semisup demo: a config override for every run (repeatable), "
        "e.g. --ssl-set train.iterations=300",
    )
