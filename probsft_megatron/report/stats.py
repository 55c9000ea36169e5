"""Seed statistics: the mean of a group's runs with a two-sided Student-t interval.

The t quantile is computed from the closed form of Student's t distribution for integer
degrees of freedom (bisection on its two-sided mass), so the report needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df``: the closed forms in
    ``theta = atan(t / sqrt(df))`` for odd and even ``df``."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, s * c  # sin*cos * (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + total)
    total, term = 0.0, s  # sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= t) = confidence`` for ``df`` >= 1."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got {df}, {confidence}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < confidence else (lo, mid)
    return 0.5 * (lo + hi)


def summarize_values(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a Student-t interval: ``mean``, ``n``, ``std`` (sample),
    ``half_width``, ``low``, ``high``, ``values``. One value has no interval (n=1)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    n = len(vals)
    mean = sum(vals) / n
    out: dict[str, Any] = {"mean": mean, "n": n, "values": vals}
    if n > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(
            std=std, half_width=half, low=mean - half, high=mean + half, confidence=confidence
        )
    else:
        out.update(std=None, half_width=None, low=None, high=None, confidence=confidence)
    return out
