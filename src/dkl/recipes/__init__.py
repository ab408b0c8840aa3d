"""Training recipes: each one a config section, pure loss functions and one :class:`~dkl.train.Task`.

Every module in this package is imported on first use, so a new built-in recipe only needs a file
here whose task class is decorated with :func:`register_recipe`. A recipe outside dkl registers
the same way; import its module before loading a config that names it.

>>> "distill" in list_recipes()
True
"""

from __future__ import annotations

import importlib
import pkgutil

from dkl.config import register_recipe_config

__all__ = ["get_recipe", "list_recipes", "register_recipe"]

_RECIPES: dict[str, type] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_recipe(name: str, *, config: type | None = None):
    """Class decorator: ``@register_recipe("distill", config=DistillConfig) class ...(Task)``.

    ``config``: the dataclass of the recipe's own config section, read from the YAML key
    ``name`` (``cfg.sections[name]`` for a recipe outside dkl).
    """

    def deco(cls: type) -> type:
        if name in _RECIPES and _RECIPES[name] is not cls:
            raise ValueError(f"recipe {name!r} is already registered by {_RECIPES[name]!r}")
        register_recipe_config(name, config)
        _RECIPES[name] = cls
        cls.name = name
        return cls

    return deco


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as e:  # an optional dependency is missing: report when asked for
            _IMPORT_ERRORS[info.name] = str(e)


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> type:
    """The task class registered as ``name`` (``KeyError`` naming the known ones otherwise)."""
    if name not in _RECIPES:
        hint = f" (import failed: {_IMPORT_ERRORS[name]})" if name in _IMPORT_ERRORS else ""
        raise KeyError(
            f"unknown recipe {name!r}{hint}; expected one of {', '.join(list_recipes())}"
        )
    return _RECIPES[name]


_discover()
