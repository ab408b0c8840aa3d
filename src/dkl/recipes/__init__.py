"""Training recipes: a recipe = its models + its loss + its config section, run by the engine.

Every module in this package is imported on first use, so a new recipe only needs a file here
that calls :func:`register_recipe` (and :func:`dkl.config.register_section` for its own config
section); see :mod:`dkl.engine` for the interface a recipe implements.

>>> "distill" in list_recipes()
True
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["get_recipe", "list_recipes", "register_recipe"]

_RECIPES: dict[str, type] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_recipe(name: str):
    """Class decorator: ``@register_recipe("distill") class DistillRecipe(Recipe): ...``."""

    def deco(cls: type) -> type:
        if name in _RECIPES and _RECIPES[name] is not cls:
            raise ValueError(f"recipe {name!r} is already registered by {_RECIPES[name]!r}")
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
    if name not in _RECIPES:
        hint = f" (import failed: {_IMPORT_ERRORS[name]})" if name in _IMPORT_ERRORS else ""
        raise KeyError(
            f"unknown recipe {name!r}{hint}; expected one of {', '.join(list_recipes())}"
        )
    return _RECIPES[name]


_discover()
