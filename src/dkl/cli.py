"""Command line: ``dkl train``, ``show``, ``eval``, ``robust``, ``demo``, ``list`` (and
``python -m dkl ...``).

::

    dkl train kd/digits_ikl                       # a bundled preset, by name
    dkl train my.yaml distill.beta=0.5 seed=1     # a file + dotted overrides
    dkl train my.yaml --out /tmp/runs --resume    # flags go anywhere; runs in /tmp/runs/<name>
    dkl show kd/digits_ikl distill.beta=2         # the resolved config, every key
    torchrun --nproc_per_node=4 -m dkl train kd/cifar100_resnet32x4_resnet8x4_ikl
    dkl eval runs/digits_ikl                      # a run folder or a checkpoint file
    dkl robust runs/digits_ikl_at                 # clean / PGD-20 / AutoAttack accuracy
    dkl demo                                      # the digits KD demo (--recipe to pick another)
    dkl list [GROUP]                              # bundled presets, with what each one is

A user error (a bad config, file, checkpoint or data set, a full disk, a diverged run) ends with
one line ``dkl: error: ...`` and a non-zero exit; ``--debug`` (or ``DKL_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_parser", "main"]

_KEYS_EPILOG = (
    "Every setting is a dotted key=value override (optim.lr=0.1, distill.beta=2, "
    "data.root=/data). `dkl show CONFIG` prints all keys of a config with their values."
)


def _version() -> str:
    """The installed distribution's version, else the package's own (a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("dkl")
    except metadata.PackageNotFoundError:
        import dkl

        return dkl.__version__


def _fail(msg: str, code: int = 2) -> int:
    print(f"dkl: error: {msg}", file=sys.stderr)
    return code


def _fmt(x: object, spec: str = ".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def _load(args: argparse.Namespace):
    """The config named on the command line, with its overrides and ``--out``."""
    from dkl.config import load_config

    overrides = list(args.overrides)
    ref = args.config
    run = Path(ref)
    if run.is_dir() and (run / "config.yaml").is_file():  # a run folder: its own config
        ref = str(run / "config.yaml")
        overrides = [f"name={run.name}", f"train.out_dir={run.parent}", *overrides]
    if getattr(args, "out", None):
        overrides.append(f"train.out_dir={args.out}")
    return load_config(ref, overrides)


# --------------------------------------------------------------------------------------------
# train / eval / list
# --------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name (kd/digits_ikl), YAML path, or a run folder")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    p.add_argument("--out", metavar="DIR", help="parent folder of the run (default: runs); "
                   "the run goes to DIR/<name>")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue DIR/<name>/last.pt")
    p.add_argument(
        "--new-epoch",
        action="store_true",
        help="with --resume: apply settings that change the run (data, batch size mid-epoch, "
        "the recipe's settings) from the start of the next epoch instead of refusing them",
    )


def _run_train(args: argparse.Namespace) -> int:
    from dkl.api import train

    if args.new_epoch and not args.resume:
        return _fail("--new-epoch goes with --resume (it says how a run continues)")
    cfg = _load(args)
    summary = train(cfg, resume=args.resume, new_epoch=args.new_epoch)
    if int(os.environ.get("RANK", "0")) == 0:
        last, best = summary["last"], summary["best"]
        print(
            f"done: {summary['name']}  last top1={_fmt(last.get('top1'))} "
            f"top5={_fmt(last.get('top5'))}  best top1={_fmt(best.get('top1'))} "
            f"(epoch {best.get('epoch', 'n/a')})  wall {summary['wall_time_s']:.1f}s  "
            f"-> {cfg.run_dir}"
        )
    return 0


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name (kd/digits_ikl), YAML path, or a run folder")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    p.add_argument("--out", metavar="DIR", help="as for dkl train (sets train.out_dir)")


def _run_show(args: argparse.Namespace) -> int:
    import yaml

    from dkl.config import config_to_dict, config_warnings

    cfg = _load(args)
    for warning in config_warnings(cfg):
        print(f"dkl: warning: {warning}", file=sys.stderr)
    print(f"# {args.config} {' '.join(args.overrides)}".rstrip())
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", help="a run folder (final.pt, else last.pt, else best.pt) or a dkl checkpoint"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides (data.root=..., device=cpu)")
    p.add_argument("--json", action="store_true", help="print JSON only")


def _one_process(command: str) -> None:
    """``eval``, ``robust`` and ``demo`` run in one process: under torchrun every rank ran the
    whole command on its own shard and wrote the same files."""
    from dkl.train.distributed import env_world_size

    world = env_world_size()
    if world > 1:
        from dkl.config import ConfigError

        raise ConfigError(
            f"dkl {command} runs in one process, got WORLD_SIZE={world} (torchrun): run it as "
            f"`dkl {command} ...` (training is what torchrun distributes)"
        )


def _run_eval(args: argparse.Namespace) -> int:
    from dkl.api import evaluate_checkpoint

    _one_process("eval")
    res = evaluate_checkpoint(args.target, args.overrides)
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
    from dkl.config import PRESET_DIR, list_presets, preset_description

    groups = sorted(p.name for p in PRESET_DIR.iterdir() if p.is_dir())
    if args.group and args.group not in groups:
        return _fail(f"no preset group '{args.group}' (groups: {', '.join(groups)})")
    names = list_presets(args.group)
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {preset_description(name)}".rstrip())
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    from dkl.demos import DEMOS, demo_module

    p.add_argument("--recipe", default="kd", choices=sorted(DEMOS), help="which demo (default kd)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/demo, runs/demo_adversarial, runs/demo_ssl, "
        "runs/demo_llm, runs/demo_llm_onpolicy: one per demo, so none replaces another's)",
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per method (default: kd 5, others 3)"
    )
    for name in sorted(DEMOS):
        demo_module(name).add_arguments(p)


def _run_demo(args: argparse.Namespace) -> int:
    from dkl.demos import demo_module

    _one_process("demo")
    on_policy = args.recipe == "llm" and getattr(args, "llm_mode", "offline") == "on-policy"
    if getattr(args, "quick", False) and not on_policy:
        return _fail("--quick: only the on-policy LLM demo has a quick form (--llm-mode on-policy)")
    if args.out is None:
        args.out = {
            "kd": "runs/demo",
            "adversarial": "runs/demo_adversarial",
            "semisup": "runs/demo_ssl",
            "llm": "runs/demo_llm_onpolicy" if on_policy else "runs/demo_llm",
        }.get(args.recipe, f"runs/demo_{args.recipe}")
    if args.seeds is None:
        args.seeds = 5 if args.recipe == "kd" else 3
    if args.seeds < 1:
        return _fail(f"--seeds: expected a number >= 1, got {args.seeds}")

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
    from dkl.api import evaluate_run
    from dkl.robust import format_table

    _one_process("robust")
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
    "show": ("print a config with every key resolved (YAML)", _show_args, _run_show),
    "eval": ("evaluate a run folder or checkpoint", _eval_args, _run_eval),
    "robust": ("clean / PGD-20 / AutoAttack accuracy of a run", _robust_args, _run_robust),
    "demo": ("run a demo end to end (digits, minutes on a CPU)", _demo_args, _run_demo),
    "list": ("list the bundled presets", _list_args, _run_list),
}


def _subparser(name: str, parent=None) -> argparse.ArgumentParser:
    help, add, run = _COMMANDS[name]
    kw = {"description": help, "epilog": _KEYS_EPILOG}
    if parent is not None:
        p = parent.add_parser(name, help=help, **kw)
    else:
        p = argparse.ArgumentParser(prog=f"dkl {name}", **kw)
    add(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(_run=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkl",
        description="Decoupled / Improved KL losses: training recipes.",
        epilog=_KEYS_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dkl {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        _subparser(name, sub)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Options may come anywhere: ``dkl train cfg --resume a=1`` = ``dkl train cfg a=1 --resume``."""
    if argv and argv[0] in _COMMANDS:
        p = _subparser(argv[0])
        # argparse's intermixed parsing calls a missing `overrides` (nargs="*") required too
        first = next((a for a in p._actions if not a.option_strings and a.nargs is None), None)
        asks_help = any(a in ("-h", "--help") for a in argv[1:])
        if first is not None and not asks_help and all(a.startswith("-") for a in argv[1:]):
            p.error(f"the following arguments are required: {first.dest}")
        return p.parse_intermixed_args(argv[1:])
    return build_parser().parse_args(argv)  # --help, or an unknown command: argparse says so


#: the extra that brings a module dkl imports only where it is used
_EXTRAS = {
    "timm": "timm",
    "datasets": "hf",
    "transformers": "llm",
    "tokenizers": "llm",
    "accelerate": "llm",
    "trl": "llm",
    "deepspeed": "deepspeed",
    "peft": "peft",
    "tensorboard": "tensorboard",
    "scipy": "robust",
    "mkdocs": "docs",
}


def _user_error(e: BaseException) -> tuple[int, str] | None:
    """``(exit code, one line)`` for an error a user can cause; ``None`` for a programming error."""
    from dkl.config import ConfigError

    if isinstance(e, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(e, ConfigError):
        return 2, str(e)
    if isinstance(e, ImportError):
        missing = (e.name or "").split(".")[0]
        if missing == "dkl":
            return None
        if "dkl[" in str(e) or "pip install" in str(e):  # the message names its install already
            return 2, str(e)
        extra = _EXTRAS.get(missing)
        how = f"pip install 'dkl[{extra}]'" if extra else f"pip install {missing or '...'}"
        return (
            2,
            f"{e} (an optional dependency: {how}; the extras: docs/getting-started.md#install)",
        )
    if isinstance(e, OSError):
        if isinstance(e, (FileNotFoundError, FileExistsError)) and not e.filename:
            return 2, _without_worker_traceback(str(e))
        reason = e.strerror or _without_worker_traceback(str(e))
        where = f": '{e.filename}'" if e.filename else ""
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = (
            "; free some space and run again with --resume"
            if full and "resume" not in reason
            else ""
        )
        return (1 if full else 2), f"{reason}{where}{hint}"
    if _lost_rank(e):
        return 1, (
            f"lost contact with another rank ({_first_line(e)}): a rank stopped, was killed or "
            "hung past train.dist_timeout; the last checkpoint is intact, run again with --resume"
        )
    if _out_of_memory(e):
        return 1, (
            f"out of memory ({_first_line(e)}); lower data.batch_size, data.image_size or the "
            "model's size"
        )
    from dkl.robust import GradientMaskingError
    from dkl.train import Interrupted, NonFiniteLossError

    if isinstance(e, Interrupted):
        return 128 + int(e.signum), str(e)
    if isinstance(e, NonFiniteLossError):
        return 1, str(e)
    if isinstance(e, GradientMaskingError):
        return 3, f"gradient masking: {e}"
    if isinstance(e, ValueError):  # our checks of data, checkpoints and arguments
        return 2, _without_worker_traceback(str(e))
    return None


def _without_worker_traceback(text: str) -> str:
    """The error's own message where a DataLoader worker re-raised it with the worker's whole
    traceback in the text (``data.num_workers >= 1``): its last line, without the type name."""
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type where it has none), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _lost_rank(e: BaseException) -> bool:
    """A collective that failed because another rank went away or timed out (gloo's "Connection
    closed by peer", a timeout, NCCL's errors): torch raises DistError or RuntimeError."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo/transport", "Connection closed by peer", "NCCL error")
    )


def _out_of_memory(e: BaseException) -> bool:
    """A host or GPU allocation that failed (torch raises RuntimeError or OutOfMemoryError)."""
    if isinstance(e, MemoryError):
        return True
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    debug = args.debug or os.environ.get("DKL_DEBUG", "") not in ("", "0")
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `dkl list | head`: the reader has gone; nothing more to say
        _silence_stdout()
        return 128 + 13  # as a process ended by SIGPIPE
    except (Exception, KeyboardInterrupt) as e:
        if debug:
            raise
        handled = _user_error(e)
        if handled is None:
            raise
        code, msg = handled
        msg = " ".join(msg.split())  # one line, whatever the message
        prefix = "dkl: " if code >= 128 else "dkl: error: "
        print(f"{prefix}{msg}", file=sys.stderr)
        return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
