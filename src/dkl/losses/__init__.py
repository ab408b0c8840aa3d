r"""KL, DKL, IKL and GKL losses from logits, exact and O(B·C) in time and memory.

Notation: ``input`` holds the logits :math:`z_s` of the side being trained (student,
adversarial example, strongly augmented view) and ``target`` the logits :math:`z_t` it is pulled
towards (teacher, natural example, weak view). Both are ``(B, C)``. :math:`\sigma` is the softmax
over classes and :math:`\mathrm{sg}` a stop-gradient.

The weighted MSE between logit vectors is written pairwise in the paper,

.. math::

    \mathrm{wMSE}_i = \tfrac14 \sum_{j,k} w_{ij} w_{ik}
        \big((z_{t,ij} - z_{t,ik}) - (z_{s,ij} - z_{s,ik})\big)^2,

which needs ``(B, C, C)`` tensors. With :math:`e = z_t - z_s`, :math:`W_i = \sum_j w_{ij}` and
:math:`\bar e_i = \sum_j w_{ij} e_{ij} / W_i` it equals half the weighted variance of :math:`e`,

.. math::

    \mathrm{wMSE}_i = \tfrac12 W_i \sum_j w_{ij} (e_{ij} - \bar e_i)^2,

and that centred form is what this module computes (it does not cancel catastrophically). Its
gradient is :math:`\partial/\partial e_{ij} = W_i w_{ij} (e_{ij} - \bar e_i)`, applied with a plus
sign to :math:`z_t` and a minus sign to :math:`z_s`.

All reductions go through one ``reduce``: ``"none"`` gives ``(B,)``, ``"mean"`` the mean over
the (valid) rows, ``"sum"`` the sum. Half-precision inputs (``float16``, ``bfloat16``) are computed in
``float32`` and the loss comes back as ``float32``; ``float32`` and ``float64`` inputs give a loss
of their own dtype, and an input and target of different float dtypes are computed in the wider
one (exact). Gradients reach the inputs in the inputs' dtype.

Non-finite logits follow one rule in every loss (and in the fused kernel):

- a ``-inf`` target logit marks a class the target rules out: its probability is 0, so it adds 0 to
  the KL / soft-label CE and carries no wMSE weight, whatever ``class_weights`` say (the loss
  equals the one computed on the finite classes alone, as ``F.kl_div`` does);
- a ``-inf`` student logit on a class whose target logit is finite makes that row's loss ``+inf``
  (the student gives zero probability to a possible class); its gradient is then not meaningful;
- a row whose target logits are all ``-inf``, or any NaN / ``+inf`` logit, gives NaN for that row:
  the target is not a distribution. Pass ``mask`` for rows without a target: rows outside the mask
  are never read, so whatever they hold gives 0 loss and 0 gradient.

An empty batch ``(0, C)`` gives what an all-False mask gives: 0 for ``"mean"`` and ``"sum"``, a
``(0,)`` tensor for ``"none"``, with a gradient graph when the inputs require grad.

Second derivatives (``create_graph=True``: gradient penalties, meta-learning, Hessian-vector
products) are exact on the torch path, for every loss and part; the fused Triton kernel refuses
them with an error that says to use ``impl="torch"``.

Hyper-parameters go through one validator in functions and modules alike: temperatures are finite
numbers of at least the smallest normal float32 (``1 / T`` must be finite), ``alpha``, ``beta``
and ``gamma`` finite numbers ``>= 0``; a string, ``None``, a bool or a tensor with more than one
entry is a ``TypeError`` that names the parameter.

The package, by concept: ``kl`` (KL), ``dkl`` (DKL), ``ikl`` (IKL), ``gkl`` (GKL), ``parts`` (the
wMSE and the soft-label CE they are built from), ``_function`` (the autograd function they share:
fast closed form, exact fallback for non-finite logits, second derivatives) and ``_common``
(argument checks, dtypes, the reduction, the kernel dispatch, the module base class).
"""

from dkl.losses.dkl import DKLLoss, dkl_loss
from dkl.losses.gkl import GKLLoss, gkl_loss
from dkl.losses.ikl import IKLLoss, ikl_loss
from dkl.losses.kl import KLLoss, kl_loss
from dkl.losses.parts import soft_cross_entropy, weighted_mse

__all__ = [
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
