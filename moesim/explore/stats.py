"""Mean and 95 % confidence interval over routing seeds (Student t)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """``mean ± half_width`` from ``n`` samples; ``half_width`` is 0 when ``n == 1``.

    With ``n >= 2`` the interval is ``mean ± t(0.975, n-1) · s / sqrt(n)`` with
    ``s`` the sample standard deviation: it holds the true mean with 95 %
    probability when the per-seed values are roughly normal.
    """

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: Estimate) -> bool:
        """True when the two intervals overlap (the difference may be noise)."""
        return self.low <= other.high and other.low <= self.high

    def to_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "ci95_low": self.low,
            "ci95_high": self.high,
            "ci95_half_width": self.half_width,
            "n": self.n,
        }


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Estimate:
    """Mean and the two-sided Student-t interval of ``values`` (NaNs ignored)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = int(x.size)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, 0.0, 1)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    from scipy import stats  # imported here: scipy is slow to import

    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return Estimate(mean, t * sem, n)
