"""ViT for 32×32 images (USB's ViT-S/2, ViT-Ti/2) built with timm, and USB's pretrained weights.

USB's semi-supervised ViTs are timm ``VisionTransformer`` s with the same parameter names:
ViT-Small = embed 384, depth 12, 6 heads, patch 2 at 32×32 (16×16 patches + a class token),
``qkv_bias``, LayerNorm ε = 1e-6, class-token pooling, drop-path 0.2 (ViT-Tiny: 192 / 3 heads /
drop-path 0.1). Both are registered under USB's names, family ``cifar`` (32×32 inputs). timm is
imported only when a model is built (``pip install 'dkl[timm]'``).

:func:`load_usb_pretrained` reads USB's released checkpoint layout from a local file, the way USB's
``load_checkpoint`` does: the state dict under ``["model"]``, a leading ``module.`` removed, the
classifier keys (``head``, ``fc``, ``classifier``, ``mlp`` at top level) dropped, the position
embedding resized (bicubic) when the patch grid differs; ``torch.load(weights_only=True)``.
Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl._files import load_torch_file

from .registry import register_model

__all__ = [
    "USB_HEAD_PREFIXES",
    "load_usb_pretrained",
    "resize_pos_embed",
    "vit_small_patch2_32",
    "vit_tiny_patch2_32",
]

USB_HEAD_PREFIXES = ("head", "fc", "classifier", "mlp")


def _vit(
    num_classes: int,
    embed_dim: int,
    num_heads: int,
    drop_path_rate: float,
    *,
    img_size: int = 32,
    patch_size: int = 2,
    depth: int = 12,
    in_chans: int = 3,
    pretrained: str = "",
    **kwargs,
) -> nn.Module:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the ViT models need timm: pip install 'dkl[timm]'") from e
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        global_pool="token",
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
    if pretrained:
        load_usb_pretrained(model, pretrained)
    return model


@register_model("vit_small_patch2_32", family="cifar")
def vit_small_patch2_32(
    num_classes: int = 100, *, drop_path_rate: float = 0.2, in_chans: int = 3, **kwargs
) -> nn.Module:
    """USB's ``vit_small_patch2_32``: ViT-S/2 at 32×32. ``pretrained=path`` loads USB weights."""
    return _vit(num_classes, 384, 6, drop_path_rate, in_chans=in_chans, **kwargs)


@register_model("vit_tiny_patch2_32", family="cifar")
def vit_tiny_patch2_32(
    num_classes: int = 100, *, drop_path_rate: float = 0.1, in_chans: int = 3, **kwargs
) -> nn.Module:
    """USB's ``vit_tiny_patch2_32``: ViT-Ti/2 at 32×32."""
    return _vit(num_classes, 192, 3, drop_path_rate, in_chans=in_chans, **kwargs)


def resize_pos_embed(posemb: Tensor, num_tokens_new: int, num_prefix_tokens: int = 1) -> Tensor:
    """Resize a ``(1, prefix + g², D)`` position embedding to ``num_tokens_new`` tokens.

    The prefix (class token) rows are kept; the square grid is interpolated bicubically
    (``align_corners=False``, as USB / the original ViT code do).

    >>> resize_pos_embed(torch.zeros(1, 1 + 14 * 14, 8), 1 + 16 * 16).shape
    torch.Size([1, 257, 8])
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"Expected a position embedding (1, N, D), got {tuple(posemb.shape)}")
    g_old = math.isqrt(posemb.shape[1] - num_prefix_tokens)
    g_new = math.isqrt(num_tokens_new - num_prefix_tokens)
    if (
        g_old**2 != posemb.shape[1] - num_prefix_tokens
        or g_new**2 != num_tokens_new - num_prefix_tokens
    ):
        raise ValueError(
            f"Expected square patch grids after {num_prefix_tokens} prefix token(s), got "
            f"{posemb.shape[1]} -> {num_tokens_new} tokens"
        )
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    if g_old == g_new:
        return posemb.clone()
    grid = grid.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def _usb_state_dict(ckpt: object, path: str) -> dict[str, Tensor]:
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        sd = ckpt["model"]
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected USB's layout {{'model': state_dict}}, got {keys}")
    return sd


def load_usb_pretrained(
    model: nn.Module, path: str | Path, *, num_prefix_tokens: int = 1
) -> dict[str, list[str]]:
    """Load USB's released ViT weights from ``path`` into ``model`` (in place).

    Returns ``{"dropped": [...], "missing": [...], "resized": [...]}``: checkpoint keys dropped as
    classifier, model keys left at their initialisation (the head), position embeddings resized.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not in USB's layout, it has keys the model lacks, or it leaves a
            non-head model parameter unset (a different architecture).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained ViT weights not found: {path}")
    ckpt = load_torch_file(path, what="pretrained ViT weights")
    sd = _usb_state_dict(ckpt, str(path))
    target = model.state_dict()
    new: dict[str, Tensor] = {}
    dropped, resized = [], []
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.split(".")[0] in USB_HEAD_PREFIXES:
            dropped.append(key)
            continue
        if key == "pos_embed" and key in target and value.shape != target[key].shape:
            value = resize_pos_embed(value, target[key].shape[1], num_prefix_tokens)
            resized.append(key)
        new[key] = value
    unexpected = sorted(set(new) - set(target))
    if unexpected:
        raise ValueError(f"{path}: keys the model does not have: {unexpected[:8]}")
    missing = sorted(set(target) - set(new))
    not_head = [k for k in missing if k.split(".")[0] not in USB_HEAD_PREFIXES + ("fc_norm",)]
    if not_head:
        raise ValueError(
            f"{path}: leaves model weights unset (another architecture?): {not_head[:8]}"
        )
    model.load_state_dict(new, strict=False)
    return {"dropped": dropped, "missing": missing, "resized": resized}
