"""Command line: ``dkl train``, ``dkl eval``, ``dkl demo`` (and ``python -m dkl ...``).

::

    dkl train kd/digits_ikl                       # a bundled preset, by name
    dkl train my.yaml distill.beta=0.5 seed=1     # a file + dotted overrides
    dkl train kd/digits_ikl --resume              # continue runs/<name>/last.pt
    torchrun --nproc_per_node=4 -m dkl train kd/cifar100_resnet32x4_resnet8x4_ikl
    dkl eval runs/digits_ikl                      # a run folder or a checkpoint file
    dkl demo                                      # the digits KD demo (--recipe to pick another)
    dkl list [GROUP]                              # bundled presets

Other recipes add subcommands with :func:`register_command` and demos with :func:`register_demo`
(call them at import time of their module in ``dkl.recipes``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

__all__ = ["main", "register_command", "register_demo"]

_COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}
_DEMOS: dict[str, tuple[str, Callable, Callable | None]] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
) -> None:
    """Add ``dkl <name>``: ``add_arguments(parser)`` declares options, ``run(args)`` runs it."""
    _COMMANDS[name] = (help, add_arguments, run)


def register_demo(
    name: str,
    help: str,
    run: Callable[[argparse.Namespace], int | None],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Add ``dkl demo --recipe <name>``; options from every demo share the demo parser."""
    _DEMOS[name] = (help, run, add_arguments)


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
    from dkl.config import ConfigError, load_config
    from dkl.engine import Interrupted, NonFiniteLossError, train

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
    p.add_argument("target", help="a run folder (uses best.pt) or a checkpoint written by dkl")
    p.add_argument("overrides", nargs="*", help="key=value overrides (data.root=..., device=cpu)")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _run_eval(args: argparse.Namespace) -> int:
    from dkl.config import ConfigError
    from dkl.engine import evaluate_checkpoint

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
    p.add_argument("--recipe", default="kd", help="which demo (default kd)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    for _, (_, _, add) in sorted(_DEMOS.items()):
        if add is not None:
            add(p)


def _run_demo(args: argparse.Namespace) -> int:
    if args.recipe not in _DEMOS:
        return _fail(f"unknown demo {args.recipe!r}; expected one of {', '.join(sorted(_DEMOS))}")
    return _DEMOS[args.recipe][1](args) or 0


register_command("train", "train a model from a preset or YAML file", _train_args, _run_train)
register_command("eval", "evaluate a run folder or checkpoint", _eval_args, _run_eval)
register_command("demo", "run a demo end to end (digits, minutes on a CPU)", _demo_args, _run_demo)
register_command("list", "list the bundled presets", _list_args, _run_list)


def build_parser() -> argparse.ArgumentParser:
    import dkl.recipes  # noqa: F401  (recipes register their commands and demos on import)

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
