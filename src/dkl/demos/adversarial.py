"""``dkl demo --recipe adversarial``: standard vs IKL-AT training on digits, then clean, PGD-20
and AutoAttack accuracy of each."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from dkl.api import evaluate_run, train
from dkl.config import load_config
from dkl.demos._stats import format_mean_std, markdown_table, mean_std, plot_bars, write_results
from dkl.recipes.adversarial import METHODS

__all__ = ["add_arguments", "main", "run_demo"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adversarial demo")
    g.add_argument(
        "--adv-methods",
        default="standard,ikl_at",
        help="digits presets to compare (default standard,ikl_at; also trades, pgd_at)",
    )
    g.add_argument(
        "--adv-n-examples",
        type=int,
        default=None,
        help="test points for AutoAttack (default: all 450)",
    )
    g.add_argument("--adv-version", choices=["standard", "fast"], default="standard")


def run_demo(
    out: str = "runs/demo_adversarial",
    *,
    methods=("standard", "ikl_at"),
    seeds: int = 1,
    n_examples: int | None = None,
    version: str = "standard",
    overrides: Iterable[str] = (),
    log=print,
) -> str:
    """Train the digits presets, evaluate clean / PGD-20 / AutoAttack; return a Markdown table.

    Writes ``<out>/summary.json``, ``<out>/results.md`` and ``<out>/results.png`` (accuracy per
    method under each evaluation); each run's folder sits under ``<out>/``.
    """
    metrics = ("clean", "pgd20", "autoattack")
    per_method: dict[str, list[dict]] = {}
    for method in methods:
        for seed in range(seeds):
            name = f"digits_{method}_s{seed}"
            cfg = load_config(
                f"adversarial/digits_{method}",
                [
                    f"seed={seed}",
                    f"name={name}",
                    f"train.out_dir={out}",
                    "train.overwrite=true",
                    "train.progress=false",
                    *overrides,
                ],
            )
            log(f"== training {name}")
            summary = train(cfg, log=lambda m: None)
            res = evaluate_run(
                Path(out) / name, n_examples=n_examples, version=version, progress=False, log=None
            )
            log(
                f"   clean {res['clean']:.2f}  PGD-20 {res['pgd20']:.2f}  "
                f"{res['label'].split(' (')[0]} {res['autoattack']:.2f}"
            )
            per_method.setdefault(method, []).append(
                {
                    **res,
                    "attack_seed": res["seed"],
                    "seed": seed,
                    "train_time_s": summary["wall_time_s"],
                }
            )

    r0 = next(iter(per_method.values()))[0]
    aa = "AutoAttack" + ("" if r0["standard"] else " (fast, NON-STANDARD)")
    spread = ", mean ± sample std" if seeds > 1 else ""
    head = (
        f"Digits, MLP, L∞ ε = {r0['eps']:g}, {r0['n_examples']} of {r0['n_total']} test points, "
        f"{seeds} seed(s){spread}, evaluated model: EMA of the weights; {r0['label']}, "
        f"backend {r0['backend']}"
    )
    rows = [
        [m, *(format_mean_std([r[k] for r in rs]) for k in metrics)] for m, rs in per_method.items()
    ]
    table = head + "\n\n" + markdown_table(["method", "clean", "PGD-20", aa], rows)
    summary = {
        "demo": "adversarial",
        "eps": r0["eps"],
        "n_examples": r0["n_examples"],
        "autoattack": r0["label"],
        "seeds": seeds,
        "methods": {
            m: {
                **{f"{k}_mean": mean_std([r[k] for r in rs])[0] for k in metrics},
                **{f"{k}_std": mean_std([r[k] for r in rs])[1] for k in metrics},
                "runs": rs,
                "config": f"adversarial/digits_{m}",
            }
            for m, rs in per_method.items()
        },
    }
    names = {"clean": "clean", "pgd20": "PGD-20", "autoattack": aa}
    bars = {names[k]: {m: [r[k] for r in rs] for m, rs in per_method.items()} for k in metrics}
    write_results(
        out,
        summary,
        table,
        lambda p: plot_bars(
            p, bars, ylabel="test accuracy (%)", title=f"digits, L∞ ε = {r0['eps']:g}"
        ),
    )
    log(table)
    return table


def main(args: argparse.Namespace) -> int:
    out = args.out or "runs/demo_adversarial"
    methods = [m.strip() for m in args.adv_methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        what = f"unknown method(s) {bad}" if bad else "no method"
        print(f"dkl: error: {what}; expected some of {METHODS}")
        return 2
    run_demo(
        out,
        methods=methods,
        seeds=args.seeds,
        n_examples=args.adv_n_examples,
        version=args.adv_version,
    )
    return 0
