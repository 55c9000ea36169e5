"""Sampling metrics: avg@n accuracy, the unbiased pass@k estimator, and answer-format rates.

For a problem with ``n`` samples of which ``c`` are correct, pass@k (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code") is the probability that at least one
of ``k`` samples drawn without replacement from the ``n`` is correct:
``1 - C(n - c, k) / C(n, k)``. avg@n is the mean fraction of correct samples.

Graders that extract an answer (math, choice) also report the fraction of samples with an
extracted final answer and the accuracy among those samples, which tells a formatting
failure (no answer found) apart from a wrong answer; math adds the fraction with a
``\\boxed{}`` answer.
"""

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
    ks = [1]
    while ks[-1] * 2 < n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return ks


def summarize(
    correct: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]] | None = None,
    extracted: Sequence[Sequence[bool]] | None = None,
    boxed: Sequence[Sequence[bool]] | None = None,
) -> dict:
    """Aggregate per-problem sample outcomes.

    Args:
        correct: ``correct[i][j]`` is whether sample ``j`` of problem ``i`` is correct;
            every problem has the same number of samples ``n``.
        scores: optional graded scores in [0, 1] of the same shape (e.g. similarity).
        extracted: optional, same shape: whether a final answer was extracted from the
            sample (a correct sample always has one).
        boxed: optional, same shape: whether the answer came from a ``\\boxed{}``.

    Returns:
        ``{"problems", "n", "avg@n", "pass@k": {k: value}}``, plus ``"mean_score"`` when
        ``scores`` is given; with ``extracted``, ``"extracted"`` (fraction of samples with
        an extracted answer) and ``"accuracy_extracted"`` (correct samples / samples with
        an extracted answer; ``None`` when there are none); with ``boxed``, ``"boxed"``.
        Values are fractions in [0, 1].
    """
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
