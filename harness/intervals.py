"""Mean ± 95% interval over training seeds (Student's t), as the report and the parent run show them.

    est = estimate([0.141, 0.128, 0.150])      # Estimate(mean=0.1397, half=0.0276, n=3, sd=0.0111)
    f"{est:pct}"                                # "14.0 ± 2.8%"

With one value there is no interval (``half`` is NaN): a single seed says nothing about seed-to-seed spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float
    half: float  # half-width of the 95% t-interval (NaN with fewer than two values)
    n: int
    sd: float  # sample standard deviation (NaN with fewer than two values)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def __format__(self, spec: str) -> str:
        """``pct``: "14.1 ± 1.2%" (or "14.1%" for one value); ``pts``: the same in points, no % sign."""
        if math.isnan(self.mean):
            return "–"
        unit = "%" if spec == "pct" else ""
        if spec not in ("pct", "pts"):
            return format(self.mean, spec)
        if self.n < 2:
            return f"{100 * self.mean:.1f}{unit}"
        return f"{100 * self.mean:.1f} ± {100 * self.half:.1f}{unit}"


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def estimate(values: Iterable[float]) -> Estimate:
    """Mean, 95% t-interval half-width and SD of the finite ``values`` (NaN fields when there are none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, 1, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Estimate(mean, t_quantile(n - 1) * sd / math.sqrt(n), n, sd)
