"""ImageNet models from torchvision (``tv:<name>``) and timm (``timm:<name>``), random init only.

Pretrained weights are never downloaded: pass a local file (for example a torchvision
``resnet34-b627a593.pth``, which is a raw state_dict) as ``create_model(..., checkpoint=path)``.
"""

from __future__ import annotations

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


def timm_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)``."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm:{name} needs timm: pip install 'dkl[timm]'") from err
    _reject_downloads("timm", kwargs)
    known = timm.list_models()
    if name not in known:
        raise ValueError(_unknown_message(name, list(known), "timm model"))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


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
