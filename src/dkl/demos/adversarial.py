"""``dkl demo --recipe adversarial``: standard vs IKL-AT training on digits, then clean, PGD-20
and AutoAttack accuracy of each."""

from __future__ import annotations

import argparse
from pathlib import Path

from dkl.api import evaluate_run, train
from dkl.config import load_config
from dkl.demos._stats import format_mean_std
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
    log=print,
) -> str:
    """Train the digits presets, evaluate clean / PGD-20 / AutoAttack, return a markdown table."""
    rows = []
    for method in methods:
        per_seed = []
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
                ],
            )
            log(f"== training {name}")
            train(cfg, log=lambda m: None)
            res = evaluate_run(
                Path(out) / name, n_examples=n_examples, version=version, progress=False, log=None
            )
            log(
                f"   clean {res['clean']:.2f}  PGD-20 {res['pgd20']:.2f}  "
                f"{res['label'].split(' (')[0]} {res['autoattack']:.2f}"
            )
            per_seed.append(res)

        cols = [format_mean_std([r[k] for r in per_seed]) for k in ("clean", "pgd20", "autoattack")]
        rows.append((method, per_seed[0], *cols))
    r0 = rows[0][1]
    aa = "AutoAttack" + ("" if r0["standard"] else " (fast, NON-STANDARD)")
    head = (
        f"Digits, MLP, L∞ ε = {r0['eps']:g}, {r0['n_examples']} of {r0['n_total']} test points, "
        f"{seeds} seed(s), evaluated model: EMA of the weights; {r0['label']}, "
        f"backend {r0['backend']}\n\n| method | clean | PGD-20 | {aa} |\n|---|---|---|---|"
    )
    table = "\n".join([head] + [f"| {m} | {c} | {p} | {a} |" for m, _, c, p, a in rows])
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "robust_table.md").write_text(table + "\n")
    log(table)
    return table


def main(args: argparse.Namespace) -> int:
    out = args.out if args.out != "runs/demo" else "runs/demo_adversarial"
    methods = [m.strip() for m in args.adv_methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"dkl: error: unknown method(s) {bad}; expected some of {METHODS}")
        return 2
    run_demo(
        out,
        methods=methods,
        seeds=args.seeds,
        n_examples=args.adv_n_examples,
        version=args.adv_version,
    )
    return 0
