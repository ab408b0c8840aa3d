r"""The class-wise prior ("global information", GI) of IKL (Cui et al., NeurIPS 2024).

Row :math:`c` of :math:`P \in \mathbb{R}^{C \times C}` is the mean of :math:`\sigma(z_t / T_p)`
over the training samples of class :math:`c` seen in the *previous* epoch. It starts uniform; at
the end of every epoch

.. math::

    P_c \leftarrow m \cdot \frac{S_c}{n_c} + (1 - m) \cdot P_c \qquad (n_c > 0),

with running sums :math:`S_c` and counts :math:`n_c`; classes not seen in the epoch keep their row.
Under ``torch.distributed`` the sums and counts are all-reduced first, so every rank ends with the
same prior. Sums are kept in float64: the result does not depend on how the data was split.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dkl._checks import as_number, check_positive

__all__ = ["ClassPrior"]


class ClassPrior(nn.Module):
    r"""Running class-wise mean of target probabilities, used as IKL's ``class_weights``.

    Args:
        num_classes: :math:`C \ge 2`.
        temperature: :math:`T_p > 0` of the softmax that is averaged.
        momentum: :math:`m \in (0, 1]`; the authors use 1 (the new epoch replaces the old rows).

    The prior, the running sums and counts are buffers: ``state_dict()`` carries them, so a run
    stopped mid-epoch resumes exactly, and ``.to(device)`` moves them.

    Example:
        >>> prior = ClassPrior(3, temperature=1.0)
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
        >>> prior.update(logits, torch.tensor([0, 1, 0]))
        >>> prior.step()
        >>> prior.prior[2]  # class 2 was not seen: still uniform
        tensor([0.3333, 0.3333, 0.3333])
        >>> prior.weights(torch.tensor([1])).shape
        torch.Size([1, 3])
    """

    prior: Tensor
    sums: Tensor
    counts: Tensor

    def __init__(self, num_classes: int, *, temperature: float = 1.0, momentum: float = 1.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise TypeError(f"Expected num_classes an integer >= 2, got {num_classes!r}")
        num_classes = int(num_classes)  # a NumPy integer too
        if num_classes < 2:
            raise ValueError(f"Expected num_classes >= 2, got {num_classes!r}")
        # the losses' rule: a finite number, and 1 / T finite in float32 (inf would freeze the
        # prior at uniform rows)
        temperature = check_positive("temperature", temperature, torch.finfo(torch.float32).tiny)
        if not 0 < as_number("momentum", momentum, "a number in (0, 1]") <= 1:
            raise ValueError(f"Expected momentum in (0, 1], got {momentum}")
        self.num_classes, self.temperature, self.momentum = num_classes, temperature, momentum
        self.register_buffer("prior", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("sums", torch.zeros(num_classes, num_classes, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    def _check_labels(self, labels: Tensor, batch: int | None = None) -> None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"Expected labels as an integer tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"Expected integer class labels, got {labels.dtype}")
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
            want = "(B,)" if batch is None else f"(B,) = ({batch},)"
            raise ValueError(f"Expected labels of shape {want}, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"Expected labels in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )

    @torch.no_grad()
    def update(self, target_logits: Tensor, labels: Tensor) -> None:
        """Accumulate ``σ(target_logits / T)`` of a batch into the rows of its labels.

        A ``-inf`` logit gives its class probability 0. Values are not read here (no host sync
        per step): a row with NaN, ``+inf`` or only ``-inf`` makes :meth:`step` raise, and the
        loss computed from the same logits is NaN in that step already.
        """
        if not isinstance(target_logits, Tensor) or target_logits.dim() != 2:
            got = (
                tuple(target_logits.shape)
                if isinstance(target_logits, Tensor)
                else type(target_logits)
            )
            raise ValueError(f"Expected target_logits of shape (B, C), got {got}")
        if target_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Expected target_logits with C = {self.num_classes} classes, "
                f"got {target_logits.shape[1]}"
            )
        if not target_logits.is_floating_point():
            raise TypeError(f"Expected floating-point target_logits, got {target_logits.dtype}")
        self._check_labels(labels, target_logits.shape[0])
        labels = labels.to(self.sums.device, torch.long)  # uint8 would index as a mask
        probs = F.softmax(
            target_logits.detach().to(self.sums.device, torch.float64) / self.temperature, dim=1
        )
        self.sums.index_add_(0, labels, probs)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    @torch.no_grad()
    def step(self) -> None:
        """End of epoch: all-reduce, normalise, blend with momentum, reset the running sums."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)
            dist.all_reduce(self.counts)
        seen = self.counts > 0
        new = self.sums[seen] / self.counts[seen].unsqueeze(1)
        if not torch.isfinite(new).all():
            raise FloatingPointError(
                "ClassPrior.step: non-finite values in the class means (non-finite target logits?)"
            )
        old = self.prior[seen].to(torch.float64)
        self.prior[seen] = (self.momentum * new + (1 - self.momentum) * old).to(self.prior.dtype)
        self.sums.zero_()
        self.counts.zero_()

    def running_state(self) -> dict:
        """This process's running ``sums`` and ``counts`` since the last :meth:`step`, before
        any all-reduce (what a distributed resume must give back to each rank)."""
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_running_state(self, state: dict) -> None:
        for name in ("sums", "counts"):
            buf, value = getattr(self, name), state[name]
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(
                    f"Expected running {name} of shape {tuple(buf.shape)}, got {tuple(value.shape)}"
                )
            buf.copy_(value)

    def _apply(self, fn, recurse=True):
        # The running sums stay float64 when the module is cast (``model.half()``): the prior
        # must not depend on how the data was split, and counts in float16 stop at 2048. Their
        # float64 values follow the device only.
        running = {name: self._buffers[name] for name in ("sums", "counts")}
        super()._apply(fn, recurse)
        for name, before in running.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float64:
                self._buffers[name] = before.to(after.device)
        return self

    def weights(self, labels: Tensor) -> Tensor:
        """Rows of the prior for ``labels``: ``(B, C)`` class weights for :func:`dkl.ikl_loss`."""
        self._check_labels(labels)
        return self.prior[labels.to(self.prior.device, torch.long)]  # not as a uint8 mask

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, temperature={self.temperature}, momentum={self.momentum}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint from elsewhere must not bring a broken prior in silently.
        key = prefix + "prior"
        if key in state_dict:
            value = state_dict[key]
            if tuple(value.shape) != (self.num_classes, self.num_classes):
                raise ValueError(
                    f"Expected a prior of shape ({self.num_classes}, {self.num_classes}), "
                    f"got {tuple(value.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError("ClassPrior state_dict holds non-finite values in 'prior'")
            if (value < 0).any():
                raise ValueError(
                    "ClassPrior state_dict holds negative values in 'prior' (its rows are "
                    f"class-mean probabilities), down to {value.min().item():.3g}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
