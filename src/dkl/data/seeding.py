"""One way to derive a seed from a run's seed and two integers (epoch, index, stream, rank).

``mix_seed(seed, a, b) = (seed · 1,000,003 + a · 10,000,019 + b) mod (2⁶³ − 1)``: ``seed`` and
``a`` are scaled by two primes so that neighbouring seeds, streams and draws land on different
values, and the modulus keeps the result a valid ``torch.manual_seed`` argument. Every seeded
stream of :mod:`dkl.data` is one of these.
"""

from __future__ import annotations

__all__ = ["mix_seed"]

_SEED_PRIME = 1_000_003
_STREAM_PRIME = 10_000_019
_MODULUS = 2**63 - 1


def mix_seed(seed: int, a: int = 0, b: int = 0) -> int:
    """``(seed * 1_000_003 + a * 10_000_019 + b) % (2**63 - 1)``.

    ``a`` names a stream (the epoch of :class:`~dkl.data.SeededDataset`, the labeled / unlabeled
    stream of :class:`~dkl.data.ViewDataset`), ``b`` a draw within it (a sample index, a draw
    number, ``7_919 * rank``).

    >>> mix_seed(0, 0, 5), mix_seed(2, 1, 3)
    (5, 12000028)
    """
    return (int(seed) * _SEED_PRIME + int(a) * _STREAM_PRIME + int(b)) % _MODULUS
