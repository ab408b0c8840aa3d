"""One rule for every number a config holds: the range each key allows, checked where the config
is loaded, and the combinations of keys that cannot do what they say within the run.

:func:`check_values` raises :class:`~dkl.config.ConfigError` with one line naming the key, the
value and the allowed range. Every float anywhere in the config (custom recipe sections too) must
be finite and within float32's range (training runs in float32, where a larger weight is ``inf``);
the keys in :data:`RANGES` must also lie in their range. :func:`config_warnings` lists the
combinations that are valid key by key but cannot reach what they ask for in the run's length (a
warm-up longer than the run), one line each, naming the keys.

>>> from dkl.config import load_config
>>> load_config("kd/digits_ikl", ["sched.gamma=-0.1"])
Traceback (most recent call last):
...
dkl.config.schema.ConfigError: sched.gamma: must be in (0, 1], got -0.1
>>> config_warnings(load_config("kd/digits_ikl", ["train.epochs=5", "distill.warmup=20"]))
... # doctest: +ELLIPSIS
['distill.warmup=20 epochs is longer than the run (train.epochs=5): the distillation term ...']
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dkl.config.schema import Config, ConfigError

__all__ = ["FLOAT32_MAX", "RANGES", "Range", "check_values", "config_warnings"]

#: the largest finite float32 (training runs in float32: a larger number is inf there)
FLOAT32_MAX = 3.4028234663852886e38


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (``<`` where open; ``None``: unbounded); ``zero`` also admits 0."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    zero: str = ""  # what 0 means where 0 is allowed outside [lo, hi]

    def __contains__(self, x: float) -> bool:
        if self.zero and x == 0:
            return True
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def text(self, is_float: bool) -> str:
        if self.lo is not None and self.hi is not None:
            body = (
                f"in {'(' if self.lo_open else '['}{_num(self.lo)}, "
                f"{_num(self.hi)}{')' if self.hi_open else ']'}"
            )
        elif self.lo is None and self.hi is None:
            body = "a finite number (float32)" if is_float else "a whole number"
        else:
            bound = self.lo if self.lo is not None else self.hi
            op = (
                (">" if self.lo_open else ">=")
                if self.lo is not None
                else ("<" if self.hi_open else "<=")
            )
            body = f"{'a finite number ' if is_float else ''}{op} {_num(bound)}"
        return f"0 ({self.zero}) or {body}" if self.zero else body


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
SHARE = Range(0, 1)  # [0, 1]
SHARE_OPEN_TOP = Range(0, 1, hi_open=True)  # [0, 1)
SHARE_OPEN_BOTTOM = Range(0, 1, lo_open=True)  # (0, 1]
#: a temperature divides logits: below 1e-3 the logits of a float32 model overflow (or a T^2
#: factor underflows), above 1e4 every softmax is uniform to float32 precision
TEMPERATURE = Range(1e-3, 1e4)

#: dotted key (``[]``: each element of a list) -> allowed range
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**63 - 1),
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.num_workers": Range(0, 256),  # loader processes: more only thrash (and can exhaust pids)
    "data.std[]": POSITIVE,
    "data.image_size": NON_NEGATIVE,  # 0: as stored
    "data.crop_padding": Range(-1),  # -1: a side / 8
    "data.crop_scale[]": SHARE_OPEN_BOTTOM,
    "data.ra_ops": NON_NEGATIVE,
    "data.ra_magnitude": Range(0, 30),  # RandAugment's magnitude bins
    "data.val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "optim.lr": POSITIVE,
    "optim.momentum": SHARE_OPEN_TOP,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas[]": SHARE_OPEN_TOP,
    "sched.milestones[]": NON_NEGATIVE,
    "sched.gamma": Range(0, 1, lo_open=True),
    "sched.warmup": NON_NEGATIVE,
    "sched.warmup_start": SHARE,
    "sched.total": NON_NEGATIVE,
    "sched.min_lr_ratio": SHARE,
    # usb_cosine: max(0, cos(pi * cycles * x)), x in [0, 1]: above 1/2 the lr is 0 at the end
    "sched.cycles": Range(0, 0.5, lo_open=True),
    "sched.offset": Range(),  # any finite shift
    "train.epochs": NON_NEGATIVE,  # >= 1 unless train.iterations > 0 (the loader checks)
    "train.iterations": NON_NEGATIVE,
    "train.eval_every": NON_NEGATIVE,
    "train.threads": Range(0, 1024),  # 0: torch's default
    "train.save_every": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.log_every": NON_NEGATIVE,
    "train.max_steps_per_epoch": NON_NEGATIVE,
    "train.divergence_factor": NON_NEGATIVE,
    "train.dist_timeout": NON_NEGATIVE,
    "distill.temperature": TEMPERATURE,
    "distill.weight_temperature": TEMPERATURE,
    "distill.prior_temperature": Range(1e-3, 1e4, zero="distill.weight_temperature"),
    "distill.ce_weight": NON_NEGATIVE,
    "distill.kd_weight": NON_NEGATIVE,
    "distill.alpha": NON_NEGATIVE,
    "distill.beta": NON_NEGATIVE,
    "distill.warmup": NON_NEGATIVE,
    "distill.gamma": NON_NEGATIVE,
    "distill.prior_momentum": SHARE_OPEN_BOTTOM,
    "distill.label_fraction": SHARE_OPEN_BOTTOM,
    "adversarial.alpha": NON_NEGATIVE,
    "adversarial.beta": NON_NEGATIVE,
    "adversarial.gamma": NON_NEGATIVE,
    "adversarial.trades_beta": NON_NEGATIVE,
    "adversarial.prior_temperature": TEMPERATURE,
    "adversarial.aug_weight": NON_NEGATIVE,
    "adversarial.attack.eps": SHARE,  # pixels are in [0, 1]
    "adversarial.attack.alpha": NON_NEGATIVE,
    "adversarial.attack.beta": NON_NEGATIVE,
    "adversarial.attack.gamma": NON_NEGATIVE,
    "adversarial.attack.step_size": SHARE,
    "adversarial.awp.gamma": NON_NEGATIVE,
    "adversarial.awp.start_epoch": NON_NEGATIVE,
    "adversarial.awp.lr": NON_NEGATIVE,
    "adversarial.ema.tau": SHARE_OPEN_TOP,
    "adversarial.ema.start_epoch": NON_NEGATIVE,
    "adversarial.eval.pgd_examples": NON_NEGATIVE,
    "adversarial.eval.pgd_steps": AT_LEAST_ONE,
    "semisup.num_labels_per_class": AT_LEAST_ONE,
    "semisup.uratio": AT_LEAST_ONE,
    "semisup.threshold": SHARE,
    "semisup.lambda_u": NON_NEGATIVE,
    "semisup.unsup_warmup": SHARE,
    "semisup.pl_temperature": TEMPERATURE,
    "semisup.alpha": NON_NEGATIVE,
    "semisup.beta": NON_NEGATIVE,
    "semisup.temperature": TEMPERATURE,
    "semisup.weight_temperature": TEMPERATURE,
    "semisup.ema_momentum": SHARE_OPEN_TOP,
    "semisup.layer_decay": SHARE_OPEN_BOTTOM,
    "semisup.crop_ratio": SHARE_OPEN_BOTTOM,
    "semisup.randaugment_ops": NON_NEGATIVE,
}

#: train.device: auto, cpu, cuda, cuda:N, mps, xpu, xpu:N
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


_MAX_DEPTH = 32  # a config is a few levels deep; model.kwargs may nest a little more


def _leaves(node: Any, key: str, seen: set[int] | None = None, depth: int = 0):
    """``(dotted key, pattern key, value)`` for every number in a config dict. A container met
    again (YAML aliases share them) is walked once."""
    seen = set() if seen is None else seen
    if isinstance(node, (dict, list, tuple)):
        if id(node) in seen:
            return
        if depth > _MAX_DEPTH:
            raise ConfigError(f"{key}: nested more than {_MAX_DEPTH} levels deep")
        seen.add(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k), seen, depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            for full, pattern, x in _leaves(v, f"{key}[{i}]", seen, depth + 1):
                yield full, pattern.replace(f"{key}[{i}]", f"{key}[]", 1), x
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, key, node


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}: must be {expected}, got {value!r}")


def check_values(cfg: Config, data: dict) -> None:
    """Every number of ``data`` (the config's dict form) in its range; the run's name a name."""
    for key, pattern, x in _leaves(data, ""):
        is_float = isinstance(x, float)
        rng = RANGES.get(pattern)
        if (
            is_float
            and not (math.isfinite(x) and abs(x) <= FLOAT32_MAX)
            and (rng is None or not (rng.zero and x == 0))
        ):
            raise _fail(key, x, rng.text(True) if rng else "a finite number (float32)")
        if not is_float and not -(2**63) <= x < 2**63:
            raise _fail(key, x, f"{rng.text(False)} and fit in 64 bits" if rng else
                        "a whole number that fits in 64 bits")  # fmt: skip
        if rng is not None and x not in rng:
            raise _fail(key, x, rng.text(is_float))
    betas = cfg.optim.betas
    if len(betas) != 2:
        raise ConfigError(f"optim.betas: must be [beta1, beta2], got {betas!r}")
    _check_name(cfg.name)
    if not _DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(
            f"train.device: must be auto, cpu, cuda, cuda:N, mps or xpu, got {cfg.train.device!r}"
        )


def _check_name(name: str) -> None:
    """A run's name is one folder under ``train.out_dir``: never a path out of it."""
    bad = (
        not name.strip()
        or name in (".", "..")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name != name.strip()
        or len(name.encode("utf-8", "surrogatepass")) > 255  # a folder name's limit
    )
    if bad:
        raise ConfigError(
            f"name: must be a run name (one folder under train.out_dir: not empty, not '.' or "
            f"'..', no '/' or '\\', no control characters or edge spaces, at most 255 bytes), got {name!r}"
        )


# --------------------------------------------------------------------------------------------
# Combinations
# --------------------------------------------------------------------------------------------


def config_warnings(cfg: Config, steps_per_epoch: int | None = None) -> list[str]:
    """One line per combination of keys that cannot do what it says within the run.

    The run is ``train.epochs`` epochs or ``train.iterations`` iterations (the schedule's unit);
    the recipes' epoch counts (a loss warm-up) need ``steps_per_epoch`` in an iteration run.
    """
    out: list[str] = []
    t, s = cfg.train, cfg.sched
    iterations = t.iterations > 0
    unit = "iterations" if iterations else "epochs"
    length, length_key = (
        (t.iterations, "train.iterations") if iterations else (t.epochs, "train.epochs")
    )
    run = f"{length_key}={length}"
    cosine = s.name in ("cosine", "usb_cosine")
    limit, where = (
        (s.total, f"sched.total={_num(s.total)}") if cosine and s.total else (length, run)
    )
    if s.warmup > 0 and s.warmup >= limit:
        out.append(
            f"sched.warmup={_num(s.warmup)} {unit} is not shorter than the schedule ({where}): "
            f"the lr never gets past its warm-up to the schedule's peak"
        )
    if cosine and 0 < s.total < length:
        out.append(
            f"sched.total={_num(s.total)} is shorter than the run ({run}): the lr stays at the "
            f"schedule's final value for the last {_num(length - s.total)} {unit}"
        )
    if s.name == "multistep":
        late = [m for m in s.milestones if m >= length]
        if late:
            out.append(
                f"sched.milestones {late} lie at or after the end of the run ({run}): never applied"
            )
    if iterations:
        unused_epochs = t.epochs != type(t).__dataclass_fields__["epochs"].default
        if unused_epochs or t.max_steps_per_epoch > 0:
            given = "train.epochs" if unused_epochs else "train.max_steps_per_epoch"
            value = t.epochs if unused_epochs else t.max_steps_per_epoch
            out.append(
                f"{given}={value} does not shorten the run: {run} sets its length (an iteration "
                f"run); set train.iterations=N for a shorter one"
            )
    d = cfg.distill
    if d is not None and d.gi and d.method not in ("ikl", "gkl"):
        out.append(
            f"distill.gi=true only acts with ikl or gkl; distill.method={d.method} ignores it"
        )
    u = cfg.semisup
    if u is not None and u.method.startswith("fixmatch") and u.threshold >= 1:
        out.append(
            f"semisup.threshold={_num(u.threshold)}: a pseudo-label needs a confidence of exactly "
            f"1, so (almost) no unlabeled image counts (semisup.method={u.method})"
        )
    epochs = t.epochs
    if iterations:
        epochs = -(-t.iterations // steps_per_epoch) if steps_per_epoch else 0
    if not epochs:
        return out
    run_epochs = run if not iterations else f"{run}, {epochs} data epochs"
    if d is not None and d.method in ("dkd", "ikl", "gkl") and d.warmup > epochs:
        out.append(
            f"distill.warmup={_num(d.warmup)} epochs is longer than the run ({run_epochs}): the "
            f"distillation term ramps to only {100 * epochs / d.warmup:.0f}% of its weight"
        )
    a = cfg.adversarial
    if a is not None:
        if a.awp.gamma > 0 and a.awp.start_epoch > epochs:
            out.append(
                f"adversarial.awp.start_epoch={a.awp.start_epoch} is after the run's end "
                f"({run_epochs}): AWP (adversarial.awp.gamma={_num(a.awp.gamma)}) never starts"
            )
        if a.ema.tau > 0 and a.ema.start_epoch > epochs:
            out.append(
                f"adversarial.ema.start_epoch={a.ema.start_epoch} is after the run's end "
                f"({run_epochs}): the EMA (adversarial.ema.tau={_num(a.ema.tau)}) never starts"
            )
    return out
