"""The demos behind ``dkl demo``: each trains on the embedded digits data in minutes on a CPU.

``DEMOS`` maps ``--recipe`` names to ``(help, module)``; a demo module has ``main(args) -> int``
and ``add_arguments(parser)`` (its options join the shared ``dkl demo`` parser).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["DEMOS", "demo_module"]

DEMOS: dict[str, str] = {
    "kd": "knowledge distillation on digits: ce / kd / dkd / ikl",
    "adversarial": "digits adversarial training: standard vs IKL-AT, robustness",
    "semisup": "semi-supervised digits: supervised vs FixMatch vs FixMatch-IKL",
    "llm": "causal-LM distillation on stdlib docstrings: ce / kd / ikl students",
}


def demo_module(name: str) -> ModuleType:
    """The module of demo ``name`` (``KeyError`` for an unknown one)."""
    if name not in DEMOS:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")
