"""Sampling metrics: avg@n, the unbiased pass@k of Chen et al. 2021 (``1 - C(n - c, k) /
C(n, k)`` for ``c`` correct of ``n``), and the answer-format rates of extracting graders."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def default_ks(n: int) -> list[int]:
    """The k values reported for ``n`` samples: powers of two below ``n``, and ``n``."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def summarize(
    correct: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]] | None = None,
    extracted: Sequence[Sequence[bool]] | None = None,
    boxed: Sequence[Sequence[bool]] | None = None,
) -> dict:
    """``{"problems", "n", "avg@n", "pass@k": {k: value}}`` of ``correct[problem][sample]``, with
    ``mean_score``, the ``extracted``/``boxed`` fractions and ``accuracy_extracted`` if given."""
    if not correct:
        raise ValueError("no problems to summarize")
    n = len(correct[0])
    if n == 0 or any(len(row) != n for row in correct):
        raise ValueError("every problem needs the same, non-zero number of samples")
    problems = len(correct)
    summary = {
        "problems": problems,
        "n": n,
        "avg@n": sum(sum(row) / n for row in correct) / problems,
        "pass@k": {
            str(k): sum(pass_at_k(n, sum(row), k) for row in correct) / problems
            for k in default_ks(n)
        },
    }
    if scores is not None:
        summary["mean_score"] = sum(sum(row) / n for row in scores) / problems
    for name, flags in (("extracted", extracted), ("boxed", boxed)):
        if flags is None:
            continue
        if len(flags) != problems or any(len(row) != n for row in flags):
            raise ValueError(f"{name} must have the shape of correct ({problems} x {n})")
        summary[name] = sum(sum(row) for row in flags) / (problems * n)
    if extracted is not None:
        answered = sum(sum(row) for row in extracted)
        hits = sum(c and e for crow, erow in zip(correct, extracted) for c, e in zip(crow, erow))
        summary["accuracy_extracted"] = hits / answered if answered else None
    return summary
