"""dkl: Decoupled and Improved Kullback-Leibler divergence losses for PyTorch.

The losses (:func:`kl_loss`, :func:`dkl_loss`, :func:`ikl_loss`, :func:`gkl_loss` and their
modules) are exact and O(B·C); :class:`ClassPrior` is the class-wise prior (GI) of IKL and GKL.
"""

from dkl.losses import (
    DKLLoss,
    GKLLoss,
    IKLLoss,
    KLLoss,
    dkl_loss,
    gkl_loss,
    ikl_loss,
    kl_loss,
    soft_cross_entropy,
    weighted_mse,
)
from dkl.prior import ClassPrior

__version__ = "0.1.0"

__all__ = [
    "ClassPrior",
    "DKLLoss",
    "GKLLoss",
    "IKLLoss",
    "KLLoss",
    "dkl_loss",
    "gkl_loss",
    "ikl_loss",
    "kl_loss",
    "soft_cross_entropy",
    "weighted_mse",
]
