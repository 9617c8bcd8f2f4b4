"""Statistics over training seeds: means with Student-t intervals, paired method differences.

Two methods trained on the same seeds share each seed's data order and initialisation, so
their difference is measured per seed and the interval is that of the mean difference
(a paired t interval), much narrower than comparing the two methods' own intervals.

The t quantile is computed here exactly for integer degrees of freedom (the closed-form
Student-t distribution function of Abramowitz & Stegun 26.7.3-4, inverted by bisection),
which avoids importing SciPy for one number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Optional

__all__ = ["t_cdf", "t_quantile", "describe", "paired_difference", "interval_verdict"]


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df >= 1`` (integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df}")
    theta = math.atan(abs(x) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # A(t|df) = 2/pi * (theta + sin(theta) * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...))
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c * c
            total += term
        central = 2.0 / math.pi * (theta + s * total)
    else:  # A(t|df) = sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= (k - 1) / k * c * c
            total += term
        central = s * total
    return 0.5 + math.copysign(central / 2.0, x)


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def _interval(values: Sequence[float], level: float) -> tuple[float, Optional[float], Optional[list[float]]]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    std = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, len(values) - 1) * std / math.sqrt(len(values))
    return mean, std, [mean - half, mean + half]


def describe(values: Sequence[float], level: float = 0.95) -> dict:
    """``{"mean", "std", "ci95", "n"}`` of per-seed values.

    ``std`` is the sample standard deviation (n - 1 in the denominator); ``ci95`` is
    ``mean ± t_{(1+level)/2, n-1} * std / sqrt(n)``. With one value ``std`` and ``ci95``
    are None: one seed says nothing about the spread.
    """
    if not values:
        raise ValueError("no values to describe")
    mean, std, ci = _interval(list(values), level)
    return {"mean": mean, "std": std, "ci95": ci, "n": len(values)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], level: float = 0.95) -> dict:
    """Mean of ``a[seed] - b[seed]`` over the seeds both hold, with its paired t interval.

    Returns ``{"mean", "std", "ci95": [lo, hi] or None, "n", "per_seed": {seed: a - b},
    "contains_zero": bool or None}``; ``contains_zero`` is True when the interval includes 0
    (the difference is inside the seed-to-seed noise), None without an interval (n = 1).
    """
    seeds = [seed for seed in a if seed in b]
    if not seeds:
        raise ValueError("the two methods share no seed")
    per_seed = {seed: a[seed] - b[seed] for seed in seeds}
    result = describe(list(per_seed.values()), level)
    ci = result["ci95"]
    result["per_seed"] = per_seed
    result["contains_zero"] = None if ci is None else bool(ci[0] <= 0.0 <= ci[1])
    return result


def interval_verdict(stat: Mapping) -> str:
    """A plain-words reading of a :func:`paired_difference` result."""
    if stat["contains_zero"] is None:
        return "one seed: no interval"
    if stat["contains_zero"]:
        return "interval contains 0: inside the seed noise"
    return "interval excludes 0"
