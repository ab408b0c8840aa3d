"""ImageNet models from torchvision (``tv:<name>``) and timm (``timm:<name>``).

Pretrained weights are never downloaded. Load a local file either way:

- any model: ``create_model(..., checkpoint=path)`` (for example a torchvision
  ``resnet34-b627a593.pth``, a raw state_dict), loaded strictly by :func:`dkl.models.load_weights`;
- timm models: timm's own ``pretrained_cfg_overlay={"file": path}`` (``pretrained=True`` is
  implied), which lets timm adapt the file to the model: its classifier is loaded when its size
  fits ``num_classes`` and left out (randomly initialised) otherwise, and the first convolution
  follows ``in_chans``. The file is read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .registry import _unknown_message, register_model, register_prefix

__all__ = ["timm_model", "torchvision_model"]

_DOWNLOAD_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_cfg_overlay")


def _reject_downloads(kind: str, kwargs: dict) -> None:
    for key in _DOWNLOAD_KWARGS:
        if kwargs.get(key) not in (None, False):
            raise ValueError(
                f"{kind} option {key}={kwargs[key]!r} would download weights; dkl builds models "
                "randomly initialised and loads weights from local files: "
                "create_model(name, num_classes, checkpoint='path/to/weights.pth')"
            )
        kwargs.pop(key, None)


def torchvision_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``."""
    try:
        import torchvision
    except ImportError as err:  # pragma: no cover - torchvision is in the 'vision' extra
        raise ImportError(f"tv:{name} needs torchvision: pip install 'dkl[vision]'") from err
    _reject_downloads("torchvision", kwargs)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(_unknown_message(name, known, "torchvision model"))
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


# keys of timm's pretrained_cfg that point at a download
_TIMM_REMOTE_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "source")


def _local_overlay(name: str, kwargs: dict) -> dict | None:
    """timm's ``pretrained_cfg_overlay`` when it names a local ``file`` (popped from ``kwargs``
    with ``pretrained``); ``None`` when there is none; an error for anything that downloads."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay is None:
        return None
    if not isinstance(overlay, Mapping) or not overlay.get("file"):
        raise ValueError(
            f"timm:{name}: pretrained_cfg_overlay must name a local weight file, "
            f"{{'file': 'path/to/weights.pth'}}, got {overlay!r}"
        )
    remote = [k for k in _TIMM_REMOTE_KEYS if overlay.get(k)]
    if remote:
        raise ValueError(
            f"timm:{name}: pretrained_cfg_overlay keys {remote} would download weights; give "
            f"only a local 'file'"
        )
    path = Path(str(overlay["file"])).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Weight file not found: {path} (timm:{name} pretrained_cfg_overlay)"
        )
    if kwargs.get("pretrained") not in (None, True):
        raise ValueError(f"timm:{name}: pretrained={kwargs['pretrained']!r} with a weight file")
    del kwargs["pretrained_cfg_overlay"]
    kwargs.pop("pretrained", None)
    return {**overlay, "file": str(path.resolve()), "source": ""}


def _read_local(timm: Any, name: str, overlay: dict) -> dict:
    """The overlay with the file's state dict under ``state_dict`` (read once, by timm's reader:
    ``weights_only=True`` or safetensors) and ``num_classes`` = the file's classifier size, so
    that timm keeps a classifier that fits the model and leaves out one that does not (timm
    compares the model's class count with ``num_classes`` of the pretrained config)."""
    from timm.models import get_pretrained_cfg, load_state_dict

    sd = load_state_dict(overlay["file"])
    default = get_pretrained_cfg(name)
    heads = overlay.get("classifier") or getattr(default, "classifier", None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    out = {**overlay, "state_dict": sd}
    weight = sd.get(f"{heads[0]}.weight") if heads else None
    if weight is not None and "num_classes" not in overlay:
        out["num_classes"] = int(weight.shape[0])
    return out


def timm_model(name: str, num_classes: int, *, in_chans: int = 3, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
    **kwargs)``, or with ``pretrained_cfg_overlay={"file": path}`` the same model built by timm
    from that local file (see the module docstring)."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm:{name} needs timm: pip install 'dkl[timm]'") from err
    overlay = _local_overlay(name, kwargs)
    _reject_downloads("timm", kwargs)
    known = timm.list_models()
    if name not in known:
        raise ValueError(_unknown_message(name, list(known), "timm model"))
    if overlay is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=_read_local(timm, name, overlay))
    else:
        kwargs["pretrained"] = False
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _register_alias(name: str) -> None:
    def build(num_classes: int, **kwargs) -> nn.Module:
        return torchvision_model(name, num_classes, **kwargs)

    build.__name__ = name
    build.__doc__ = f"torchvision ``{name}`` (same as ``tv:{name}``)."
    register_model(name, family="imagenet")(build)


# plain names that no CIFAR model spells the same way (CIFAR's is "ResNet50", "MobileNetV2")
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"):
    _register_alias(_name)

register_prefix("tv", torchvision_model)
register_prefix("timm", timm_model)
