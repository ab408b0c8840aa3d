"""Loading configs: YAML presets, ``_base_`` includes, dotted overrides, validation.

A run is described by one :class:`~dkl.config.Config`, built from

1. a preset, given by name (``kd/digits_ikl`` -> ``src/dkl/configs/kd/digits_ikl.yaml``) or by
   path (``my/run.yaml``); a preset may start from others with ``_base_: name`` (or a list of
   names; later ones win, the preset's own keys win over all of them);
2. command-line overrides ``section.key=value`` (values parsed as YAML: ``0.05``, ``[150, 180]``,
   ``true``, ``null``). A key without a dot that is not a top-level field is looked up in the
   run's sections (the shared ones and its recipe's): ``method=ikl`` means ``distill.method`` in
   a distillation run. A short key that more than one of them has is an error naming the full
   keys (``warmup`` is ``sched.warmup`` or ``distill.warmup``).

Everything is validated against dataclasses: an unknown key, a value of the wrong type or out of
its range (:data:`dkl.config.RANGES`), a key written twice in one YAML file, a run name that is a
path or a missing preset raises :class:`~dkl.config.ConfigError` with one line naming the key.
YAML is read as 1.2 reads numbers (``5e-4`` is a number; a quoted ``"4"`` is a string).

>>> cfg = load_config("kd/digits_ikl", ["distill.beta=0.5", "seed=3"])
>>> cfg.distill.method, cfg.distill.beta, cfg.seed, cfg.adversarial
('ikl', 0.5, 3, None)
>>> load_config("kd/digits_ikl", ["train.epochz=3"])
Traceback (most recent call last):
...
dkl.config.schema.ConfigError: unknown key 'train.epochz' (known: amp, deterministic, device, ...)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dkl._files import atomic_write, sniff
from dkl.config.ranges import check_values
from dkl.config.schema import (
    BUILTIN_SECTIONS,
    COMMON_SECTIONS,
    TOP_LEVEL,
    Config,
    ConfigError,
)

__all__ = [
    "PRESET_DIR",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "known_recipes",
    "list_presets",
    "load_config",
    "preset_description",
    "preset_file",
    "preset_for_run",
    "register_recipe_config",
    "save_config",
]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

# recipe name -> its section's dataclass (None: the recipe has no section of its own)
_RECIPE_SECTIONS: dict[str, type | None] = dict(BUILTIN_SECTIONS)


def register_recipe_config(recipe: str, section: type | None = None) -> None:
    """Declare a recipe name (and the dataclass of its own section, if it has one).

    :func:`dkl.recipes.register_recipe` calls this, so a config may name any registered recipe;
    its section is read from the YAML key of the recipe's name into ``cfg.sections[recipe]``.
    """
    if section is not None and not dataclasses.is_dataclass(section):
        raise TypeError(f"a recipe section must be a dataclass, got {section!r}")
    if recipe in COMMON_SECTIONS or recipe in TOP_LEVEL:
        raise ValueError(f"recipe name {recipe!r} is reserved")
    if recipe in BUILTIN_SECTIONS and section is not BUILTIN_SECTIONS[recipe]:
        raise ValueError(f"recipe name {recipe!r} is taken by a built-in recipe")
    _RECIPE_SECTIONS[recipe] = section


def known_recipes() -> list[str]:
    return sorted(_RECIPE_SECTIONS)


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
        return _plain(value)
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
        return _plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            _check_written(value, key)
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_written(value, key)
            return float(value)
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (a string, not a number: drop the quotes; YAML writes NaN and infinity .nan, .inf)"
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}{hint}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return getattr(value, "source", None) or str(value)  # as written: 010, 1e2
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            return _plain(value)
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _plain(dict(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return _plain(value)


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


def _section_keys(recipe: str) -> dict[str, type]:
    """The sections a run of ``recipe`` has: the shared ones and the recipe's own."""
    own = _RECIPE_SECTIONS.get(recipe)
    return {**COMMON_SECTIONS, **({recipe: own} if own is not None else {})}


def config_from_dict(data: dict) -> Config:
    """Validate a plain mapping (e.g. a loaded YAML) into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    recipe = _coerce(data.get("recipe", Config.recipe), str, "recipe")
    if recipe not in _RECIPE_SECTIONS:
        raise ConfigError(
            f"recipe: unknown recipe {recipe!r} (known: {', '.join(known_recipes())})"
        )
    sections = _section_keys(recipe)
    top: dict[str, Any] = {}
    for k, v in data.items():
        if k in TOP_LEVEL:
            top[k] = _coerce(v, TOP_LEVEL[k], k)
        elif k in sections:
            top[k] = _build(sections[k], v, k)
        elif k in _RECIPE_SECTIONS:
            raise ConfigError(
                f"section '{k}' belongs to recipe '{k}', but this run's recipe is '{recipe}'"
            )
        else:
            known = sorted([*TOP_LEVEL, *sections])
            raise ConfigError(f"unknown key '{k}' (known: {', '.join(known)})")
    own = _RECIPE_SECTIONS[recipe]
    if own is not None:
        top.setdefault(recipe, own())  # the recipe's section, at its defaults if left out
    extra = {} if recipe in BUILTIN_SECTIONS or own is None else {recipe: top.pop(recipe)}
    cfg = Config(**top, sections=extra)
    t = cfg.train
    if t.iterations < 0:
        raise ConfigError(f"train.iterations: must be >= 0 (0 = epoch-based), got {t.iterations}")
    if t.iterations == 0 and t.epochs < 1:
        raise ConfigError(
            f"train.epochs: must be >= 1 (or set train.iterations > 0), got {t.epochs}"
        )
    if t.iterations > 0 and t.eval_every <= 0:
        cfg.train.eval_every = t.iterations
    check_values(cfg, config_to_dict(cfg))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The plain mapping form of ``cfg`` (what ``config.yaml`` holds); round-trips."""
    out: dict[str, Any] = {k: getattr(cfg, k) for k in TOP_LEVEL}
    for k in COMMON_SECTIONS:
        out[k] = dataclasses.asdict(getattr(cfg, k))
    if cfg.section is not None:
        out[cfg.recipe] = dataclasses.asdict(cfg.section)
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text), "config")


# --------------------------------------------------------------------------------------------
# Presets, includes and overrides
# --------------------------------------------------------------------------------------------


def list_presets(group: str = "", fragments: bool = False) -> list[str]:
    """Names of the bundled presets (``kd/digits_ikl``, ...), optionally under one group.

    Fragments (files whose name starts with ``_``, e.g. ``kd/_digits_base``) hold settings that
    presets include with ``_base_``; they are not runs of their own and are left out unless
    ``fragments=True``.
    """
    root = PRESET_DIR / group if group else PRESET_DIR
    paths = (p for p in root.rglob("*.yaml") if fragments or not p.name.startswith("_"))
    return sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in paths)


def preset_description(name: str) -> str:
    """The first comment line of a bundled preset (what ``dkl list`` shows beside its name)."""
    for line in _resolve_preset(name).read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""


def preset_for_run(run_name: str) -> str | None:
    """The bundled preset whose run is called ``run_name`` (``digits_teacher`` ->
    ``kd/digits_teacher``), or ``None``: what to train when a run's files are missing."""
    names = list_presets()
    for n in names:
        if n.rsplit("/", 1)[-1] == run_name:
            return n
    for n in names:
        data = yaml.safe_load(_resolve_preset(n).read_text()) or {}
        if isinstance(data, dict) and data.get("name") == run_name:
            return n
    return None


def preset_file(name: str) -> Path | None:
    """The YAML file of the bundled preset ``name`` (``kd/digits_teacher``), or ``None``."""
    path = PRESET_DIR / f"{name.removesuffix('.yaml')}.yaml"
    return path.resolve() if path.is_file() else None


def _resolve_preset(ref: str, relative_to: Path | None = None) -> Path:
    candidates = []
    p = Path(ref)
    name = ref.removesuffix(".yaml")
    if relative_to is not None and not p.is_absolute():
        candidates += [relative_to / p, relative_to / f"{name}.yaml"]
    candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    preset = preset_file(ref)
    if preset is not None:
        return preset
    raise ConfigError(
        f"config '{ref}': no such file or preset (looked in {PRESET_DIR}; try `dkl list`)"
    )


def _is_section(path: tuple) -> bool:
    """Whether the dotted ``path`` (``("distill",)``, ``("distill", "teacher")``) names a section
    of settings (a dataclass), rather than a value (``model.kwargs`` is a value: a free mapping)."""
    sections = {**COMMON_SECTIONS, **{k: v for k, v in _RECIPE_SECTIONS.items() if v}}
    tp = sections.get(path[0]) if path else None
    for name in path[1:]:
        tp = typing.get_type_hints(tp).get(name) if dataclasses.is_dataclass(tp) else None
    return dataclasses.is_dataclass(tp)


def _deep_merge(
    base: dict, over: dict, where: str = "", path: tuple = (), *, values: bool = True
) -> dict:
    """``over`` laid over ``base``. A mapping given for a section (``distill: {beta: 2}``) merges
    into it key by key, at any depth, keeping the settings it does not name. A mapping that is a
    value (``model.kwargs``, ``data.options``: the options of one model or source) merges too
    with ``values`` (a YAML file over its ``_base_``, which may change one option of several),
    and replaces the old one otherwise (a command-line override: ``model.name=X
    model.kwargs={...}`` gives the new model its own options). ``null`` for a whole section that
    holds settings would silently reset them all: a ConfigError."""
    out = dict(base)
    for k, v in over.items():
        old, here = out.get(k), (*path, k)
        merge = values or not path or _is_section(here)
        if isinstance(v, dict) and isinstance(old, dict) and merge:
            out[k] = _deep_merge(old, v, where, here, values=values)
            continue
        if v is None and isinstance(old, dict) and old and _is_section(here):
            key = ".".join(map(str, here))
            leaf = next((n for n, x in old.items() if not isinstance(x, dict)), next(iter(old)))
            raise ConfigError(
                f"{where}: {key}: null would reset every {key} setting given "
                f"({', '.join(map(str, old))}) to its default; set the keys to change one at a "
                f"time (e.g. {key}.{leaf}=...)"
            )
        out[k] = v
    return out


def _duplicate_keys(
    node: yaml.Node, where: str, prefix: str = "", visited: set[int] | None = None
) -> None:
    """A key written twice in one mapping (YAML keeps the last one silently): an error. A node
    reached again through an alias is checked once (no exponential walk of aliased aliases)."""
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            if isinstance(key, yaml.ScalarNode) and name != "<<":
                line = key.start_mark.line + 1
                if name in lines:
                    raise ConfigError(
                        f"{where}: key '{prefix}{name}' is written twice (lines {lines[name]} and "
                        f"{line}); YAML would silently keep only the second: keep one"
                    )
                lines[name] = line
            _duplicate_keys(value, where, f"{prefix}{name}.", visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, where, f"{prefix.rstrip('.')}[{i}].", visited)


#: a config holds a few hundred values; more once YAML's aliases are expanded is an alias bomb
_MAX_VALUES = 100_000


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for with every alias expanded (linear in the graph)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a node that contains itself counts once
    if isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        n = 1
    memo[id(node)] = n
    return n


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``5e-4`` as a number as YAML 1.2 does (1.1 wants ``5.0e-4``).
    Numbers keep the text they were written as (:class:`_Int`, :class:`_Float`), for the keys
    that take text: ``name=010`` is the run ``010``, not ``8`` (YAML 1.1 reads 010 as octal,
    0x10 as hex, 12:30 as 750)."""


class _Int(int):
    """An int read from YAML, with its text (``source``); made a plain int when coerced."""


class _Float(float):
    """A float read from YAML, with its text (``source``); made a plain float when coerced."""


def _sourced(kind: type, construct: Any) -> Any:
    def constructor(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        value = kind(construct(loader, node))
        value.source = str(node.value)
        return value

    return constructor


_Loader.add_constructor("tag:yaml.org,2002:int", _sourced(_Int, yaml.SafeLoader.construct_yaml_int))
_Loader.add_constructor(
    "tag:yaml.org,2002:float", _sourced(_Float, yaml.SafeLoader.construct_yaml_float)
)


_YAML11_NUMBER = re.compile(r"^[-+]?(0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)$")


def _check_written(value: Any, key: str) -> None:
    """Refuse a number written as YAML 1.1 octal (``010`` = 8) or base 60 (``12:30`` = 750),
    which nobody means in a config."""
    source = getattr(value, "source", None)
    if source is not None and _YAML11_NUMBER.match(source):
        raise ConfigError(
            f"{key}: expected a decimal number, got {source} (YAML 1.1 reads it as {value!r}); "
            f"write {value!r} if that is meant"
        )


def _plain(value: Any) -> Any:
    """``value`` with the numbers read from YAML made plain ints and floats, all the way down."""
    if isinstance(value, _Int):
        return int(value)
    if isinstance(value, _Float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` (``5e-4`` a number), refusing duplicate keys; errors name
    ``where``."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is not None:
            _duplicate_keys(node, where)
            if _expanded_size(node, {}) > _MAX_VALUES:
                raise ConfigError(
                    f"{where}: expands to more than {_MAX_VALUES:,} values (YAML aliases of "
                    f"aliases?); a config is a few hundred"
                )
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{where}: invalid YAML ({msg})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None


def _load_yaml(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"_base_: include cycle {chain}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config '{path}': expected a YAML file, got {sniff(path)}") from None
    data = _parse_yaml(text, f"config '{path}'") or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config '{path}': expected a mapping (key: value lines) at top level, got "
            f"{type(data).__name__}"
        )
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"config '{path}': _base_: expected a preset name or path, or a list of them, got "
            f"{bases!r}"
        )
    merged: dict = {}
    for b in bases:
        base = _load_yaml(_resolve_preset(b, path.parent), (*stack, path))
        merged = _deep_merge(merged, base, f"config '{path}'")
    return _deep_merge(merged, data, f"config '{path}'")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': empty key")
    try:
        value = _parse_yaml(raw, f"override '{key}'") if raw != "" else ""
    except ConfigError as e:
        if "written twice" in str(e):
            raise
        value = raw
    return key, value


def _expand_key(key: str, recipe: str) -> list[str]:
    parts = key.split(".")
    sections = _section_keys(recipe)
    if len(parts) > 1 or key in TOP_LEVEL or key in sections:
        return parts
    owners = [
        name for name, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if len(owners) == 1:
        return [owners[0], key]
    if len(owners) > 1:
        raise ConfigError(
            f"override '{key}' is ambiguous: write one of "
            + ", ".join(f"{o}.{key}" for o in owners)
        )
    known = sorted([*TOP_LEVEL, *sections])
    raise ConfigError(f"unknown key '{key}' (known: {', '.join(known)})")


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key=value`` strings to a plain mapping (before validation)."""
    data = dict(data)
    for item in overrides:
        key, value = _parse_override(item)
        parts = _expand_key(key, str(data.get("recipe", Config.recipe)))
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node[p] = child = dict(child)
            node = child
        # a mapping merges into a section as a _base_ does; null for a section is refused
        merged = _deep_merge(
            node, {parts[-1]: value}, f"override '{item}'", tuple(parts[:-1]), values=False
        )
        node[parts[-1]] = merged[parts[-1]]
    return data


def load_config(ref: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (name or path, or an already-loaded mapping) and apply overrides."""
    if isinstance(ref, dict):
        data = dict(ref)
    else:
        path = _resolve_preset(str(ref))
        data = _load_yaml(path)
        if "name" not in data:  # default run name: the preset's file name
            data["name"] = path.stem
    return config_from_dict(apply_overrides(data, overrides))
