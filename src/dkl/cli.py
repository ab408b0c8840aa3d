"""Command line: ``dkl train``, ``dkl eval``, ``dkl demo`` (and ``python -m dkl ...``).

::

    dkl train kd/digits_ikl                       # a bundled preset, by name
    dkl train my.yaml distill.beta=0.5 seed=1     # a file + dotted overrides
    dkl train kd/digits_ikl --resume              # continue runs/<name>/last.pt
    torchrun --nproc_per_node=4 -m dkl train kd/cifar100_resnet32x4_resnet8x4_ikl
    dkl eval runs/digits_ikl                      # a run folder or a checkpoint file
    dkl robust runs/digits_ikl_at                 # clean / PGD-20 / AutoAttack accuracy
    dkl demo                                      # the digits KD demo (--recipe to pick another)
    dkl list [GROUP]                              # bundled presets
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

__all__ = ["build_parser", "main"]


def _fail(msg: str, code: int = 2) -> int:
    print(f"dkl: error: {msg}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------------------------
# train / eval / list
# --------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name (kd/digits_ikl), YAML path, or a run folder")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/last.pt")


def _resolve_run_folder(ref: str) -> str:
    from pathlib import Path

    p = Path(ref)
    if p.is_dir() and (p / "config.yaml").is_file():
        return str(p / "config.yaml")
    return ref


def _run_train(args: argparse.Namespace) -> int:
    from dkl.api import train
    from dkl.config import ConfigError, load_config
    from dkl.train import Interrupted, NonFiniteLossError

    try:
        overrides = list(args.overrides)
        ref = _resolve_run_folder(args.config)
        if ref != args.config:
            from pathlib import Path

            run = Path(args.config)
            overrides = [f"name={run.name}", f"train.out_dir={run.parent}", *overrides]
        cfg = load_config(ref, overrides)
        summary = train(cfg, resume=args.resume)
    except ConfigError as e:
        return _fail(str(e))
    except (FileNotFoundError, FileExistsError) as e:
        return _fail(str(e))
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except Interrupted as e:
        print(f"dkl: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        last, best = summary["last"], summary["best"]
        print(
            f"done: {summary['name']}  last top1={last['top1']:.2f} top5={last['top5']:.2f}  "
            f"best top1={best['top1']:.2f} (epoch {best['epoch']})  "
            f"wall {summary['wall_time_s']:.1f}s  -> {cfg.run_dir}"
        )
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", help="a run folder (final.pt, else last.pt, else best.pt) or a dkl checkpoint"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides (data.root=..., device=cpu)")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _run_eval(args: argparse.Namespace) -> int:
    from dkl.api import evaluate_checkpoint
    from dkl.config import ConfigError

    try:
        res = evaluate_checkpoint(args.target, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print("| checkpoint | top-1 | top-5 | loss |\n|---|---|---|---|")
        print(
            f"| {res['checkpoint']} | {res['top1']:.2f} | {res['top5']:.2f} | "
            f"{res['test_loss']:.4f} |"
        )
    return 0


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("group", nargs="?", default="", help="kd, adversarial, semisup, ...")


def _run_list(args: argparse.Namespace) -> int:
    from dkl.config import list_presets

    for name in list_presets(args.group):
        print(name)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    from dkl.demos import DEMOS, demo_module

    p.add_argument("--recipe", default="kd", choices=sorted(DEMOS), help="which demo (default kd)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    for name in sorted(DEMOS):
        demo_module(name).add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from dkl.demos import demo_module

    return demo_module(args.recipe).main(args) or 0


def _robust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run folder (uses final.pt: the EMA) or a dkl checkpoint")
    p.add_argument("overrides", nargs="*", help="key=value overrides (data.root=..., device=cpu)")
    p.add_argument(
        "--n-examples", type=int, default=None, help="first N test points (default: all)"
    )
    p.add_argument(
        "--version",
        choices=["standard", "fast"],
        default="standard",
        help="AutoAttack version; 'fast' (APGD-CE + APGD-T) is NON-STANDARD",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="L-inf radius (default: the run's adversarial.attack.eps, else 8/255)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "official", "torchattacks"], default="auto")
    p.add_argument(
        "--sanity",
        choices=["raise", "warn", "off"],
        default="raise",
        help="gradient-masking check (default: fail loudly)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_robust(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dkl.api import evaluate_run
    from dkl.config import ConfigError
    from dkl.robust import GradientMaskingError, format_table

    try:
        res = evaluate_run(
            args.target,
            n_examples=args.n_examples,
            version=args.version,
            eps=args.eps,
            batch_size=args.batch_size,
            seed=args.seed,
            backend=args.backend,
            sanity=args.sanity,
            overrides=args.overrides,
            log=None if args.json else print,
        )
    except GradientMaskingError as e:
        print(f"dkl: gradient masking: {e}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"dkl: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table({res["run"]: res}))
        print(
            f"{res['label']}; L∞ ε = {res['eps']:.5f}; {res['n_examples']} of {res['n_total']} "
            f"test points; backend {res['backend']}; seed {res['seed']}; "
            f"-> {Path(res['checkpoint']).parent / 'robust.json'}"
        )
    return 0


#: name -> (help, add_arguments, run)
_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train a model from a preset or YAML file", _train_args, _run_train),
    "eval": ("evaluate a run folder or checkpoint", _eval_args, _run_eval),
    "robust": ("clean / PGD-20 / AutoAttack accuracy of a run", _robust_args, _run_robust),
    "demo": ("run a demo end to end (digits, minutes on a CPU)", _demo_args, _run_demo),
    "list": ("list the bundled presets", _list_args, _run_list),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkl", description="Decoupled / Improved KL losses: training recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
