"""Answer extraction and grading.

Every grader maps ``(completion, reference)`` to a :class:`Grade`: the extracted answer
(``None`` when nothing could be extracted), whether it is correct, and a score in [0, 1]
(equal to ``float(correct)`` except for Jaro-Winkler similarity).

Conventions (see docs/eval.md):

* math: the answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``)
  in the completion, braces matched so nested groups survive; no boxed answer means
  ``None`` and wrong. Equivalence is decided by math-verify, so ``1/2 == 0.5`` but
  ``1/3 != 0.33``; ``\\dfrac`` equals ``\\frac``; units in text form (``5 \\text{ cm}``,
  ``5 cm``) are dropped, so ``5 cm`` equals ``5``; comma-separated answers are sets, so
  ``1, 2`` equals ``2, 1`` and ``\\{1, 2\\}``, while parenthesized tuples stay ordered.
* choice: the option letter from ``\\boxed{X}``, "answer is X", "Answer: X", or a
  completion that is just the letter (``X``, ``(X)``, ``X.``).
* exact: equality after stripping surrounding whitespace.
* jaro_winkler: Jaro-Winkler similarity (prefix scale 0.1, prefix up to 4) of the
  stripped, upper-cased strings; correct when they are equal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from probsft_megatron.errors import ConfigError

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one completion."""

    extracted: str | None
    correct: bool
    score: float


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (braces matched).

    ``\\boxed 5`` (no braces) yields the following token. Returns ``None`` when there is
    no complete boxed expression.
    """
    result = None
    for match in _BOXED.finditer(text):
        pos = match.end()
        if pos < len(text) and text[pos] == "{":
            depth = 0
            for end in range(pos, len(text)):
                if text[end] == "{":
                    depth += 1
                elif text[end] == "}":
                    depth -= 1
                    if depth == 0:
                        result = text[pos + 1 : end].strip()
                        break
        elif match.group(0).endswith(" "):
            token = re.match(r"[^\s$]+", text[pos:])
            if token:
                result = token.group(0)
    return result


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def normalize_latex(answer: str) -> str:
    """Light normalization for display and parsing: ``\\dfrac``/``\\tfrac`` -> ``\\frac``."""
    return re.sub(r"\\[dt]frac", r"\\frac", answer).strip()


def boxed_answer(text: str) -> str | None:
    """The normalized last boxed answer: math delimiters (``$``) inside the box, which is
    already math mode, are dropped; ``None`` when there is no boxed answer."""
    boxed = extract_boxed(text)
    return None if boxed is None else normalize_latex(_UNESCAPED_DOLLAR.sub("", boxed))


def _as_latex(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify's LaTeX extractor sees it whole
    (text that already has math delimiters, like ``$69$,$84$``, is left as is)."""
    return text if _UNESCAPED_DOLLAR.search(text) else f"${text}$"


def math_equal(reference: str, answer: str) -> bool:
    """Whether ``answer`` is mathematically equivalent to ``reference`` (math-verify)."""
    from math_verify import parse, verify

    try:
        gold = parse(_as_latex(normalize_latex(reference)))
        pred = parse(_as_latex(normalize_latex(answer)))
        return bool(gold) and bool(pred) and bool(verify(gold, pred))
    except Exception:  # math-verify raises on pathological input or timeouts: count as wrong
        return False


def grade_math(completion: str, reference: str) -> Grade:
    """Last boxed answer of ``completion`` checked against ``reference`` with math-verify."""
    answer = boxed_answer(completion)
    if answer is None:
        return Grade(None, False, 0.0)
    correct = math_equal(reference, answer)
    return Grade(answer, correct, float(correct))


_CHOICE_PATTERNS = (
    re.compile(r"(?i:answer\s+is)\s*:?\s*\(?\s*([A-Z])\b"),
    re.compile(r"(?i:answer)\s*:\s*\(?\s*([A-Z])\b"),
    re.compile(r"^\s*\(?([A-Z])[).:]?\s*$"),
)


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter a completion commits to, or ``None``.

    Tried in order: last ``\\boxed{X}``; the last "answer is X"; the last "Answer: X";
    a completion that is only the letter. Letters outside ``letters`` are ignored.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        stripped = re.sub(r"\\text\{([^}]*)\}", r"\1", boxed).strip(" ().")
        if len(stripped) == 1 and stripped.upper() in letters:
            return stripped.upper()
    for pattern in _CHOICE_PATTERNS:
        found = [m.group(1).upper() for m in pattern.finditer(text) if m.group(1).upper() in letters]
        if found:
            return found[-1]
    return None


def grade_choice(completion: str, reference: str) -> Grade:
    """Multiple choice: extracted option letter equals the reference letter."""
    letter = extract_choice(completion)
    correct = letter is not None and letter == reference.strip().strip("()").upper()
    return Grade(letter, correct, float(correct))


def grade_exact(completion: str, reference: str) -> Grade:
    """Exact match after stripping surrounding whitespace."""
    answer = completion.strip()
    correct = answer == reference.strip()
    return Grade(answer, correct, float(correct))


def jaro_winkler(a: str, b: str, prefix_scale: float = 0.1, max_prefix: int = 4) -> float:
    """Jaro-Winkler similarity of two strings (1.0 identical, 0.0 nothing in common).

    Jaro: characters match when equal and at most ``max(len)//2 - 1`` positions apart;
    with ``m`` matches and ``t`` half the number of matched characters out of order,
    ``jaro = (m/|a| + m/|b| + (m - t)/m) / 3``. Winkler adds
    ``l * prefix_scale * (1 - jaro)`` for a common prefix of length ``l <= max_prefix``.
    """
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    window = max(max(len(a), len(b)) // 2 - 1, 0)
    a_matched = [False] * len(a)
    b_matched = [False] * len(b)
    matches = 0
    for i, ch in enumerate(a):
        for j in range(max(0, i - window), min(len(b), i + window + 1)):
            if not b_matched[j] and b[j] == ch:
                a_matched[i] = b_matched[j] = True
                matches += 1
                break
    if matches == 0:
        return 0.0
    a_seq = [ch for ch, hit in zip(a, a_matched) if hit]
    b_seq = [ch for ch, hit in zip(b, b_matched) if hit]
    transpositions = sum(x != y for x, y in zip(a_seq, b_seq)) / 2
    jaro = (matches / len(a) + matches / len(b) + (matches - transpositions) / matches) / 3
    prefix = 0
    for x, y in zip(a[:max_prefix], b[:max_prefix]):
        if x != y:
            break
        prefix += 1
    return jaro + prefix * prefix_scale * (1 - jaro)


def grade_jaro_winkler(completion: str, reference: str) -> Grade:
    """Jaro-Winkler similarity as the score; correct on a (case-insensitive) exact match."""
    answer = completion.strip().upper()
    target = reference.strip().upper()
    return Grade(answer, answer == target, jaro_winkler(answer, target))


GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "exact": grade_exact,
    "math": grade_math,
    "jaro_winkler": grade_jaro_winkler,
    "choice": grade_choice,
}

CONTINUOUS_GRADERS = frozenset({"jaro_winkler"})
"""Graders whose score is not just ``float(correct)``; summaries report their mean score."""


def get_grader(name: str) -> Callable[[str, str], Grade]:
    """The grader registered as ``name``; a ConfigError lists the valid names."""
    try:
        return GRADERS[name]
    except KeyError:
        raise ConfigError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}") from None
