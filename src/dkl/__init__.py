"""dkl: Decoupled and Improved Kullback-Leibler divergence losses for PyTorch.

The losses (:func:`kl_loss`, :func:`dkl_loss`, :func:`ikl_loss`, :func:`gkl_loss` and their
modules) are exact and O(B·C); :class:`ClassPrior` is the class-wise prior (GI) of IKL and GKL.
"""

from importlib import metadata as _metadata

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

try:  # one version, pyproject.toml's, as installed
    __version__ = _metadata.version("dkl")
except _metadata.PackageNotFoundError:  # a source tree on the path, not installed
    __version__ = "0+unknown"

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
