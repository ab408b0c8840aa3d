"""Mean ± sample standard deviation over seeds, as every demo table reports it."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["format_mean_std", "mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)``; the std is 0.0 for a single value.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"m ± s"`` (just ``"m"`` for a single value).

    >>> format_mean_std([97.5, 97.0]), format_mean_std([97.5])
    ('97.25 ± 0.35', '97.50')
    """
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"
