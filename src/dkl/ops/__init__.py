"""Optional fused kernels (Triton). The torch implementations in :mod:`dkl.losses` stay the
reference and the fallback; nothing here imports triton until a kernel is actually launched."""

from dkl.ops.divergence import (
    divergence_loss_and_grad,
    fused_divergence,
    triton_available,
    triton_unavailable_reason,
)

__all__ = [
    "divergence_loss_and_grad",
    "fused_divergence",
    "triton_available",
    "triton_unavailable_reason",
]
