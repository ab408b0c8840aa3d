r"""Exponential moving average of a model's weights, shared by the recipes.

.. math::

    \theta_{ema} \leftarrow \tau\,\theta_{ema} + (1 - \tau)\,\theta

Used two ways:

* adversarial training (the IKL-AT authors' weight averaging): once per **epoch**, τ = 0.9, from
  a start epoch; the EMA is the model that is evaluated and exported;
* Mean Teacher (as in USB): once per **iteration**, τ = 0.999; the EMA is the teacher.

Buffers. ``buffers="ema"`` (default) averages floating-point buffers (BatchNorm running mean and
variance) like the parameters, which is what averaging the whole ``state_dict`` does in the authors'
weight-averaging script; ``buffers="copy"`` copies them from the live model instead (the averaged
weights then meet the live model's statistics). Integer buffers (``num_batches_tracked``) are always
copied: an average of counters means nothing. The EMA copy never requires grad and stays in eval
mode.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelEMA"]

_BUFFER_MODES = ("ema", "copy")


class ModelEMA:
    """EMA of ``model``'s parameters and buffers, held in a detached copy (``.module``).

    Args:
        model: the live model; its current weights initialise the average.
        decay: τ in [0, 1): the weight of the old average.
        buffers: ``"ema"`` or ``"copy"`` (see the module docstring).

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> _ = net.weight.data.fill_(0.0)
        >>> ema = ModelEMA(net, decay=0.9)
        >>> _ = net.weight.data.fill_(1.0)
        >>> ema.update(net)
        >>> ema.module.weight.item()  # 0.9 * 0 + 0.1 * 1
        0.1
    """

    def __init__(self, model: nn.Module, decay: float, *, buffers: str = "ema") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Expected decay in [0, 1), got {decay}")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"Expected buffers in {_BUFFER_MODES}, got {buffers!r}")
        self.decay = float(decay)
        self.buffers = buffers
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, Tensor, Tensor, bool]]:
        live = dict(model.named_parameters())
        live_buffers = dict(model.named_buffers())
        for name, p in self.module.named_parameters():
            if name not in live:
                raise KeyError(f"ModelEMA: parameter {name!r} missing from the live model")
            yield name, p, live[name], True
        for name, b in self.module.named_buffers():
            if name not in live_buffers:
                raise KeyError(f"ModelEMA: buffer {name!r} missing from the live model")
            yield name, b, live_buffers[name], False

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards ``model``'s current weights (``decay`` overrides τ once)."""
        tau = self.decay if decay is None else float(decay)
        for _, ema_t, live_t, is_param in self._pairs(model):
            live_t = live_t.detach().to(ema_t.device)
            if ema_t.is_floating_point() and (is_param or self.buffers == "ema"):
                ema_t.mul_(tau).add_(live_t.to(ema_t.dtype), alpha=1.0 - tau)
            else:
                ema_t.copy_(live_t)
        self.num_updates += 1

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights (an update with τ = 0)."""
        self.update(model, decay=0.0)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights and buffers into ``model`` (same architecture)."""
        for _, ema_t, live_t, _ in self._pairs(model):
            live_t.data.copy_(ema_t.to(live_t.device, live_t.dtype))

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.apply(model):`` runs ``model`` with the averaged weights, restored after."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "buffers": self.buffers,
            "num_updates": self.num_updates,
            "module": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"decay", "num_updates", "module"} - set(state)
        if missing:
            raise KeyError(f"ModelEMA.load_state_dict: missing keys {sorted(missing)}")
        self.decay = float(state["decay"])
        self.buffers = state.get("buffers", self.buffers)
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])

    def __repr__(self) -> str:
        return f"ModelEMA(decay={self.decay}, buffers={self.buffers!r}, updates={self.num_updates})"
