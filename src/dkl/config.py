"""Typed run configuration: YAML presets + dotted ``key=value`` overrides.

A run is described by one :class:`Config`. It is built from

1. a preset, given by name (``kd/digits_ikl`` -> ``src/dkl/configs/kd/digits_ikl.yaml``) or by
   path (``my/run.yaml``); a preset may start from others with ``_base_: name`` (or a list of
   names; later ones win, the preset's own keys win over all of them);
2. command-line overrides ``section.key=value`` (values parsed as YAML: ``0.05``, ``[150, 180]``,
   ``true``, ``null``). A key without a dot that is not a top-level field is looked up in the
   sections: ``seed=1`` is top-level, ``method=ikl`` means ``distill.method`` and ``device=cpu``
   means ``train.device`` as long as exactly one section has that key.

Everything is validated against dataclasses: an unknown key, a value of the wrong type or a missing
preset raises :class:`ConfigError` with one line naming the key. Recipes add their own section
(``distill:``, ``adversarial:``, ...) with :func:`register_section`.

>>> cfg = load_config("kd/digits_ikl", ["distill.beta=0.5", "seed=3"])
>>> cfg.distill.method, cfg.distill.beta, cfg.seed
('ikl', 0.5, 3)
>>> load_config("kd/digits_ikl", ["train.epochz=3"])
Traceback (most recent call last):
...
dkl.config.ConfigError: unknown key 'train.epochz' (known: amp, deterministic, device, ...)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

__all__ = [
    "PRESET_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config",
    "register_section",
    "save_config",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the offending key."""


# --------------------------------------------------------------------------------------------
# Sections shared by every recipe
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Which data set and how it is batched. ``batch_size`` is the GLOBAL batch (all ranks)."""

    name: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    root: str = "data"
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True  # standard train augmentation (crop + flip) where the data set has one
    image_size: int = 224  # imagefolder only
    drop_last: bool = False


@dataclass
class ModelConfig:
    """A model built by ``dkl.models.create_model(name, num_classes, **kwargs)``."""

    name: str = "mlp"
    kwargs: dict = field(default_factory=dict)
    normalize: bool = True  # wrap with the data set's Normalize(mean, std): inputs stay in [0, 1]
    checkpoint: str = ""  # optional initial weights (dkl.models.load_weights)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: list = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedConfig:
    """Learning-rate schedule, in the run's unit: epochs (epoch-based) or iterations.

    ``multistep``: ``lr * gamma ** (number of milestones passed)``; ``cosine``:
    ``lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * t / total)))`` with ``total``
    defaulting to the run length; ``constant``. ``warmup`` units of linear warm-up from
    ``warmup_start`` * lr. With ``per_step: false`` (default for epochs) the lr changes only at
    epoch boundaries; ``per_step: true`` interpolates within an epoch. ``offset`` shifts the cosine's
    position: with ``total: 201, offset: 1`` epoch ``e`` (from 1) gets ``0.5 (1 + cos(pi e / 201))``,
    the adversarial-training schedule of the IKL-AT authors. ``usb_cosine``:
    ``lr * max(0, cos(pi * cycles * x))`` with ``x`` the position after warm-up over the rest of
    the run (USB's and FixMatch's schedule; with ``cycles = 7/16`` it ends at ``cos(7 pi / 16)``
    ≈ 0.195 of the peak, not at 0).
    """

    name: Literal["constant", "multistep", "cosine", "usb_cosine"] = "multistep"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    warmup: float = 0.0
    warmup_start: float = 0.0
    total: float = 0.0
    offset: float = 0.0
    min_lr_ratio: float = 0.0
    cycles: float = 7.0 / 16.0
    per_step: bool = False


@dataclass
class TrainConfig:
    """The loop. Set ``epochs`` for epoch-based runs or ``iterations`` (+ ``eval_every``)."""

    epochs: int = 10
    iterations: int = 0  # > 0: iteration-based; evaluation every `eval_every` iterations
    eval_every: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    amp: Literal["none", "bf16", "fp16"] = "none"
    deterministic: bool = False
    threads: int = 0  # torch CPU threads; 0 = torch's default. Tiny models run fastest on 1.
    out_dir: str = "runs"
    save_every: int = 1  # checkpoint every N evaluation points (last.pt); 0 = only at the end
    keep_best: bool = True
    progress: bool = True
    tensorboard: bool = False
    grad_clip: float = 0.0
    log_every: int = 20  # progress-bar refresh, in steps
    max_steps_per_epoch: int = 0  # > 0: cut every epoch short (smoke tests)
    plot: bool = True
    overwrite: bool = False  # allow a new run to replace runs/<name>/ (otherwise: --resume)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "train": TrainConfig,
}
_RECIPE_SECTIONS: dict[str, type] = {}
_TOP_LEVEL = {"name": str, "recipe": str, "seed": int, "description": str}


def register_section(name: str, cls: type) -> type:
    """Register a recipe's own config section (a dataclass) under ``name``.

    The section appears in :class:`Config` as an attribute (``cfg.distill``) and in YAML as a
    mapping under that key. Usable as ``register_section("distill", DistillConfig)``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_section expects a dataclass, got {cls!r}")
    if name in _SECTIONS or name in _TOP_LEVEL:
        raise ValueError(f"section name {name!r} is reserved")
    _RECIPE_SECTIONS[name] = cls
    return cls


def _ensure_recipes_registered() -> None:
    # The recipes register their sections at import; importing here keeps `load_config` usable
    # without the caller knowing which recipes exist.
    import dkl.recipes  # noqa: F401


@dataclass
class Config:
    """A whole run: top-level fields, the shared sections and the recipe sections."""

    name: str = "run"
    recipe: str = "distill"
    seed: int = 0
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sections: dict = field(default_factory=dict)  # recipe sections, by name

    def __getattr__(self, item: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if item in sections:
            return sections[item]
        raise AttributeError(f"Config has no field or section {item!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / self.name


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"unknown key '{prefix}.{k}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{prefix}: {e}") from None
    return obj


def config_from_dict(data: dict) -> Config:
    """Validate a plain mapping (e.g. a loaded YAML) into a :class:`Config`."""
    _ensure_recipes_registered()
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    top: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for k, v in data.items():
        if k in _TOP_LEVEL:
            top[k] = _coerce(v, _TOP_LEVEL[k], k)
        elif k in _SECTIONS:
            top[k] = _build(_SECTIONS[k], v, k)
        elif k in _RECIPE_SECTIONS:
            sections[k] = _build(_RECIPE_SECTIONS[k], v, k)
        else:
            known = sorted([*_TOP_LEVEL, *_SECTIONS, *_RECIPE_SECTIONS])
            raise ConfigError(f"unknown key '{k}' (known: {', '.join(known)})")
    from dkl.recipes import list_recipes

    recipe = top.get("recipe", Config.recipe)
    if recipe not in list_recipes():
        raise ConfigError(f"recipe: unknown recipe {recipe!r} (known: {', '.join(list_recipes())})")
    cfg = Config(**top, sections=sections)
    # every recipe sees its own section even if the YAML left it out
    for name, cls in _RECIPE_SECTIONS.items():
        cfg.sections.setdefault(name, cls())
    t = cfg.train
    if t.iterations < 0 or t.epochs < 0:
        raise ConfigError("train.epochs / train.iterations: must be >= 0")
    if t.iterations > 0 and t.eval_every <= 0:
        cfg.train.eval_every = t.iterations
    if cfg.data.batch_size <= 0:
        raise ConfigError(f"data.batch_size: must be > 0, got {cfg.data.batch_size}")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The plain mapping form of ``cfg`` (what ``config.yaml`` holds); round-trips."""
    out: dict[str, Any] = {k: getattr(cfg, k) for k in _TOP_LEVEL}
    for k in _SECTIONS:
        out[k] = dataclasses.asdict(getattr(cfg, k))
    for k, v in cfg.sections.items():
        out[k] = dataclasses.asdict(v)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Presets, includes and overrides
# --------------------------------------------------------------------------------------------


def list_presets(group: str = "") -> list[str]:
    """Names of the bundled presets (``kd/digits_ikl``, ...), optionally under one group."""
    root = PRESET_DIR / group if group else PRESET_DIR
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in root.rglob("*.yaml"))


def _resolve_preset(ref: str, relative_to: Path | None = None) -> Path:
    candidates = []
    p = Path(ref)
    name = ref.removesuffix(".yaml")
    if relative_to is not None and not p.is_absolute():
        candidates += [relative_to / p, relative_to / f"{name}.yaml"]
    candidates.append(p)
    candidates.append(PRESET_DIR / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(
        f"config '{ref}': no such file or preset (looked in {PRESET_DIR}; try `dkl list`)"
    )


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_yaml(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"_base_: include cycle {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise ConfigError(f"config '{path}': invalid YAML ({msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path}': expected a mapping at top level")
    bases = data.pop("_base_", None)
    if bases is None:
        bases = data.pop("defaults", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, _load_yaml(_resolve_preset(b, path.parent), (*stack, path)))
    return _deep_merge(merged, data)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _recipe_sections(recipe: str | None) -> set[str]:
    """Section names that belong to ``recipe``: its own name and the class's ``section``."""
    if not recipe:
        return set()
    from dkl.recipes import get_recipe

    try:
        cls = get_recipe(recipe)
    except KeyError:
        return {recipe}
    return {recipe, getattr(cls, "section", recipe)}


def _expand_key(key: str, recipe: str | None = None) -> list[str]:
    parts = key.split(".")
    if len(parts) > 1 or key in _TOP_LEVEL or key in _SECTIONS or key in _RECIPE_SECTIONS:
        return parts
    owners = [
        name
        for name, cls in {**_SECTIONS, **_RECIPE_SECTIONS}.items()
        if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if len(owners) > 1:  # the running recipe's own section wins (method= -> distill.method)
        mine = [o for o in owners if o in _recipe_sections(recipe)]
        owners = mine or owners
    if len(owners) == 1:
        return [owners[0], key]
    if len(owners) > 1:
        raise ConfigError(
            f"override '{key}' is ambiguous: write one of "
            + ", ".join(f"{o}.{key}" for o in owners)
        )
    known = sorted([*_TOP_LEVEL, *_SECTIONS, *_RECIPE_SECTIONS])
    raise ConfigError(f"unknown key '{key}' (known: {', '.join(known)})")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key=value`` strings to a plain mapping (before validation)."""
    data = dict(data)
    for item in overrides:
        key, value = _parse_override(item)
        parts = _expand_key(key, data.get("recipe", Config.recipe))
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(ref: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (name or path, or an already-loaded mapping) and apply overrides."""
    _ensure_recipes_registered()
    if isinstance(ref, dict):
        data = dict(ref)
    else:
        path = _resolve_preset(str(ref))
        data = _load_yaml(path)
        if "name" not in data:  # default run name: the preset's file name
            data["name"] = path.stem
    return config_from_dict(apply_overrides(data, overrides))
