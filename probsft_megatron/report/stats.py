"""Seed statistics: a group's mean with a two-sided Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= t) = confidence`` for ``df`` >= 1."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got {df}, {confidence}")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def summarize_values(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a Student-t interval: ``mean``, ``n``, ``std`` (sample),
    ``half_width``, ``low``, ``high``, ``values``. One value has no interval (n=1)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    n = len(vals)
    mean = sum(vals) / n
    out: dict[str, Any] = {"mean": mean, "n": n, "values": vals}
    out.update(std=None, half_width=None, low=None, high=None, confidence=confidence)
    if n > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, low=mean - half, high=mean + half)
    return out
