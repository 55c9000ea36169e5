"""Answer extraction and grading: every grader maps ``(completion, reference)`` to a
:class:`Grade` (conventions: docs/eval.md; tests/data/grader_pairs.jsonl pins math verdicts)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from probsft_megatron.errors import ConfigError
from probsft_megatron.tasks_gen import number_words

# answer extraction
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# What may stand between two boxes that together state one answer ("x = \boxed{2} or
# x = \boxed{3}"): math delimiters, spacing, a separator word, and an "x =" label.
_BOX_GAP_NOISE = re.compile(r"\$|\\[(\[\])]|\\q?quad|\\[,;: ]|\\text\s*\{|[{}\s~]")
_BOX_GAP = re.compile(r"^(?:,|;|and|or|,and|,or|&)?(?:[A-Za-z](?:_\{?\w+\}?)?=)?$")
_STATEMENT = re.compile(r"(?i)(?:final\s+answer\s+is|the\s+answer\s+is|\banswer\s*:)[\s:*]*")
_DELIMITED = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_CHOICE_PATTERNS = (
    re.compile(r"(?i:answer\s+is)\s*:?\s*\(?\s*([A-Z])\b"),
    re.compile(r"(?i:answer)\s*:\s*\(?\s*([A-Z])\b"),
    re.compile(r"^\s*\(?([A-Z])[).:]?\s*$"),
)


@dataclass(frozen=True)
class Grade:
    """One graded completion; ``source``: where a math answer came from (boxed, statement)."""

    extracted: str | None
    correct: bool
    score: float
    source: str | None = None


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """Every complete ``\\boxed``/``\\fbox`` as (start, end, content), in order."""
    found = []
    for match in _BOXED.finditer(text):
        pos = match.end()
        if pos < len(text) and text[pos] == "{":
            depth = 0
            for end in range(pos, len(text)):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                if depth == 0:
                    found.append((match.start(), end + 1, text[pos + 1 : end].strip()))
                    break
        elif match.group(0).endswith(" "):
            if token := re.match(r"[^\s$]+", text[pos:]):
                found.append((match.start(), pos + token.end(), token.group(0)))
    return found


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}``, or ``None``."""
    boxes = _boxes(text)
    return boxes[-1][2] if boxes else None


def _final_boxed(text: str) -> str | None:
    """The last boxed answer with the boxes only separators precede (``2, 3``), or ``None``."""
    boxes = _boxes(text)
    if not boxes:
        return None
    parts = [boxes[-1][2]]
    for (_, prev_end, prev), (start, _, _) in zip(reversed(boxes[:-1]), reversed(boxes[1:])):
        gap = _BOX_GAP_NOISE.sub("", text[prev_end:start])
        if not _BOX_GAP.match(gap):
            break
        if prev != parts[0]:
            parts.insert(0, prev)
    return ", ".join(parts)


def extract_statement(text: str) -> str | None:
    """X of the last "the answer is X" / "final answer is X" / "Answer: X", or ``None``."""
    matches = list(_STATEMENT.finditer(text))
    if not matches:
        return None
    tail = text[matches[-1].end() :]
    for opening, closing in _DELIMITED:
        if tail.startswith(opening):
            end = tail.find(closing, len(opening))
            answer = tail[len(opening) : end] if end > 0 else ""
            break
    else:
        answer = re.split(r"\.(?:\s|$)|\n|\s+I hope", tail, maxsplit=1)[0]
        answer = answer.strip().strip("*").strip()
        number = re.match(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?\s*(?:\\?%)?(?=\s+[A-Za-z]|$)", answer)
        if number:
            answer = number.group(0)
    return answer.strip().rstrip(".").strip() or None


def _normalized(answer: str) -> str:
    """``answer`` without unescaped ``$``, ``\\dfrac``/``\\tfrac`` as ``\\frac``."""
    return re.sub(r"\\[dt]frac", r"\\frac", _UNESCAPED_DOLLAR.sub("", answer)).strip()


def boxed_answer(text: str) -> str | None:
    """The normalized last boxed answer, or ``None``."""
    boxed = extract_boxed(text)
    return None if boxed is None else _normalized(boxed)


def extract_math_answer(text: str) -> tuple[str | None, str | None]:
    """``(answer, source)``: the final boxed answer, else the last answer statement."""
    answer, source = _final_boxed(text), "boxed"
    if answer is None:
        answer, source = extract_statement(text), "statement"
    return (None, None) if answer is None else (_normalized(answer), source)


# answer equivalence: what math_equal's cleaning, units, numbers and percents match
_NUMBER_WORDS = {number_words(i): str(i) for i in range(21)}  # "seven" -> "7"
_UNIT_WORDS = (
    "cm|mm|km|nm|kg|mg|ml|mL|eV|keV|MeV|GeV|Hz|kHz|MHz|GHz|AU|pc|kpc|Mpc|yr|yrs|years?|days?|"
    "hours?|hrs?|minutes?|mins?|seconds?|secs?|meters?|metres?|inches|inch|feet|foot|ft|yards?|"
    "miles?|mph|degrees?|deg|cents?|dollars?|units?|square units|sq units|cubic units|kelvin|"
    "liters?|litres?|grams?|kilograms?|ohms?|watts?|joules?|newtons?|volts?|amps?|pounds?|lbs?|"
    "ounces?|oz|gallons?|acres?|hectares?|percentage points"
)
_UNIT_GROUP = re.compile(
    r"(?:\s*(?:/|\\cdot|\\times))?\s*\\(?:text|textrm|textnormal|mathrm|mbox|rm|operatorname)\s*"
    r"\{([^{}()\d=]*[A-Za-z][^{}()\d=]*)\}(?:\s*\^\s*(?:\{\s*-?\d+\s*\}|-?\d))?\s*$"
)
_UNIT_WORD = re.compile(
    rf"(?<=[\d}}\s])\s*(?:{_UNIT_WORDS})(?:\s*\^\s*(?:\{{\s*-?\d\s*\}}|-?\d))?\s*$"
)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")
_SCI_E = re.compile(r"^([-+]?)(\d+(?:\.\d*)?|\.\d+)\s*[eE]\s*([-+]?\d+)$")
_SCI_TEN = re.compile(
    r"^([-+]?)(\d+(?:\.\d*)?|\.\d+)\s*(?:\\times|\\cdot|\*|×|x)\s*10\s*\^\s*(?:\{\s*([-+]?\s*\d+)\s*\}|([-+]?\d))$"
)
_PERCENT = re.compile(r"\s*(?:\\%|%|\\text\{\s*\\?%\s*\})\s*$")
MATH_TIMEOUT_S = 10  # per math-verify parse or comparison (past it: not equal), a wide margin


def _repeating_fraction(match: re.Match) -> str:
    """``0.1\\overline{6}`` -> ``\\frac{1}{6}`` (a repeating decimal as its exact fraction)."""
    whole, fixed, period = match.group(1) or "0", match.group(2), match.group(3)
    value = Fraction(int(whole)) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _clean(text: str) -> str:
    """``text`` without what never changes an answer's value (delimiters, spacing, ...)."""
    s = text.strip()
    s = re.sub(r"(\d)\s*(?:,\s*\\!|\{,\})\s*(?=\d{3})", r"\1", s)  # 32,\!348 and 32{,}348
    s = _UNESCAPED_DOLLAR.sub("", s)
    s = re.sub(r"\\[()\[\]]", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\displaystyle|\\!", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)\b\s*", "", s)
    s = re.sub(r"(?<!\\)\\[,;: ]|~", " ", s)
    s = re.sub(r"(?<![\d.])(\d*)\.(\d*)\\overline\{(\d+)\}", _repeating_fraction, s)
    s = s.replace("\\$", "").replace("−", "-")
    s = re.sub(r"\bnp\.(?=[a-z])", r"\\", s)  # np.arcsin(x) in a reference
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)  # 1./3 -> 1/3, 5. -> 5
    s = re.sub(r"(?<![A-Za-z\\])E_", r"\\mathcal{E}_", s)  # E_1 (math-verify cannot parse it)
    s = re.sub(r"^\s*(?:\\approx|\\sim|≈|=)\s*", "", s)  # "\approx 41.8" states 41.8
    s = s.strip().rstrip(".").strip()
    return _NUMBER_WORDS.get(s.lower(), s)


def _strip_units(s: str, bare_units: frozenset[str] = frozenset()) -> tuple[str, frozenset[str]]:
    """``s`` without trailing units, and their letters (bare letters only in ``bare_units``)."""
    s = _DEGREES.sub("", s).strip()
    removed: set[str] = set()
    bare = "|".join(re.escape(u) for u in sorted(bare_units, key=len, reverse=True))
    patterns = [_UNIT_GROUP, _UNIT_WORD]
    if bare:
        patterns.append(re.compile(rf"(?<=[\d}}\s])\s*(?:{bare})\s*$"))
    changed = True
    while changed:
        changed = False
        for pattern in patterns:
            match = pattern.search(s)
            rest = s[: match.start()].rstrip() if match else ""
            if not rest or rest[-1] in "=+-*/^_,({[":
                continue
            unit = match.group(1) if match.groups() else match.group(0)
            removed.add(re.sub(r"[^A-Za-z]", "", unit))
            s, changed = rest, True
    return s, frozenset(u for u in removed if u)


def _scientific(s: str):
    """``(value, half a unit in the last digit)`` of ``4.5e33``/``4.5\\times 10^{33}``, or None."""
    match = _SCI_E.match(s.strip()) or _SCI_TEN.match(s.strip())
    if not match:
        return None
    sign, mantissa = match.group(1), match.group(2)
    exponent = int(re.sub(r"\s", "", next(g for g in match.groups()[2:] if g is not None)))
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    value = Decimal(sign + mantissa).scaleb(exponent)
    return value, Decimal(5).scaleb(exponent - decimals - 1)


def _numeric_value(s: str):
    """``s`` as a Decimal (plain, scientific, or a number math-verify parses), else ``None``."""
    if _NUMBER.match(s):
        return Decimal(s)
    if (sci := _scientific(s)) is not None:
        return sci[0]
    for item in _parse(s):
        if getattr(item, "is_number", False) and getattr(item, "is_real", False):
            try:
                return Decimal(str(float(item.evalf(20))))
            except (TypeError, ValueError, ArithmeticError):
                return None
    return None


def _percent_forms(s: str, both: bool) -> list[str]:
    """``s`` without its percent sign, with ``both`` also as a fraction of 100 (25 or 1/4)."""
    bare = _PERCENT.sub("", s).strip()
    if bare == s.strip() or not bare:
        return [s]
    if not both:
        return [bare]
    if _NUMBER.match(bare):
        return [bare, f"{Decimal(bare).scaleb(-2):f}"]
    return [bare, f"\\frac{{{bare}}}{{100}}"]


def _parse(s: str) -> list:
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    flags = dict(basic_latex=True, units=False, malformed_operators=True, nits=True)
    normalization = NormalizationConfig(**flags, boxed="all", equations=False)
    config = LatexExtractionConfig(normalization_config=normalization)
    try:
        return parse(f"${s}$", extraction_config=[config], parsing_timeout=MATH_TIMEOUT_S)
    except Exception:  # math-verify raises on pathological input: no parse
        return []


def _symbolic_equal(reference: str, answer: str) -> bool:
    from math_verify import verify

    gold, pred = _parse(reference), _parse(answer)
    if not gold or not pred:
        return False
    # a reference that is surely an interval: infinite ends, a union, closed or mixed brackets
    interval = bool(re.search(r"\\infty|\\cup|^\s*(?:\[.*,.*[)\]]|\(.*,.*\])\s*$", reference))
    options = dict(float_rounding=10, timeout_seconds=MATH_TIMEOUT_S)
    try:
        return bool(verify(gold, pred, allow_set_relation_comp=interval, **options))
    except Exception:  # timeouts and sympy failures count as not equal
        return False


def _words(s: str) -> str | None:
    """Lower-cased words of a text answer (``\\text{Evelyn}`` -> ``evelyn``), else ``None``."""
    inner = re.sub(r"\\(?:text|textbf|textit|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s).strip()
    if re.fullmatch(r"[A-Za-z]{2,}(?:\s+[A-Za-z]+)*", inner):
        return " ".join(inner.lower().split())
    return None


def _choice(s: str, parenthesized: bool = True) -> str | None:
    """The option letter of ``(C)`` or ``\\text{(C)}`` (bare ``C`` unless ``parenthesized``)."""
    inner = re.sub(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}", r"\1", s).strip()
    match = re.fullmatch(r"\(\s*([A-E])\s*\)" if parenthesized else r"\(?\s*([A-E])\s*\)?", inner)
    return match.group(1) if match else None


def math_equal(reference: str, answer: str) -> bool:
    """Whether ``answer`` is mathematically equivalent to ``reference`` (docs/eval.md)."""
    ref, ans = _clean(reference), _clean(answer)
    if not ans or not ref:
        return False
    if re.sub(r"\s", "", ref) == re.sub(r"\s", "", ans):
        return True
    if (ref_letter := _choice(ref)) is not None:
        return ref_letter == _choice(ans, parenthesized=False)
    if (ref_words := _words(ref)) is not None and ref_words == _words(ans):
        return True
    ref, ref_units = _strip_units(ref)
    ans, _ = _strip_units(ans, frozenset(u for u in ref_units if len(u) == 1))
    if not ans:
        return False
    if (sci := _scientific(ref)) is not None:
        value, half_ulp = sci
        got = _numeric_value(ans)
        return got is not None and abs(got - value) <= half_ulp * Decimal("1.000000001")
    if match := _SCI_E.match(ans.strip()):  # math-verify reads the e of 4.5e33 as Euler's number
        ans = f"{match.group(1)}{match.group(2)}\\times10^{{{int(match.group(3))}}}"
    # a percent on one side only may be a unit or a fraction of 100; on both, compare numbers
    both = bool(_PERCENT.search(ref)) != bool(_PERCENT.search(ans))
    return any(
        _symbolic_equal(r, a) for r in _percent_forms(ref, both) for a in _percent_forms(ans, both)
    )


def grade_math(completion: str, reference: str) -> Grade:
    """The final answer of ``completion`` checked with :func:`math_equal`."""
    answer, source = extract_math_answer(completion)
    correct = answer is not None and math_equal(reference, answer)
    return Grade(answer, correct, float(correct), source)


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter of the last ``\\boxed{X}``, "answer is X", "Answer: X" or bare letter."""
    if (boxed := extract_boxed(text)) is not None:
        stripped = re.sub(r"\\text\{([^}]*)\}", r"\1", boxed).strip(" ().")
        if len(stripped) == 1 and stripped.upper() in letters:
            return stripped.upper()
    for pattern in _CHOICE_PATTERNS:
        if found := [m.upper() for m in pattern.findall(text) if m.upper() in letters]:
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
    """Jaro-Winkler similarity in [0, 1], the prefix bonus at any Jaro value (no 0.7 threshold)."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    window = max(max(len(a), len(b)) // 2 - 1, 0)
    b_matched, a_seq = [False] * len(b), []  # a's matched characters, in order
    for i, ch in enumerate(a):
        for j in range(max(0, i - window), min(len(b), i + window + 1)):
            if not b_matched[j] and b[j] == ch:
                b_matched[j] = True
                a_seq.append(ch)
                break
    if not (matches := len(a_seq)):
        return 0.0
    b_seq = [ch for ch, hit in zip(b, b_matched) if hit]
    transpositions = sum(x != y for x, y in zip(a_seq, b_seq)) / 2
    jaro = (matches / len(a) + matches / len(b) + (matches - transpositions) / matches) / 3
    prefix = len(os.path.commonprefix([a[:max_prefix], b[:max_prefix]]))
    return jaro + prefix * prefix_scale * (1 - jaro)


def grade_jaro_winkler(completion: str, reference: str) -> Grade:
    """Jaro-Winkler similarity as the score; correct on a (case-insensitive) exact match."""
    answer, target = completion.strip().upper(), reference.strip().upper()
    return Grade(answer, answer == target, jaro_winkler(answer, target))


GRADERS: dict[str, Callable[[str, str], Grade]] = {
    "exact": grade_exact,
    "math": grade_math,
    "jaro_winkler": grade_jaro_winkler,
    "choice": grade_choice,
}

# summaries report the mean score of continuous graders, the extracted fraction of extracting ones
CONTINUOUS_GRADERS = frozenset({"jaro_winkler"})
EXTRACTING_GRADERS = frozenset({"math", "choice"})


def get_grader(name: str) -> Callable[[str, str], Grade]:
    """The grader registered as ``name``; a ConfigError lists the valid names."""
    try:
        return GRADERS[name]
    except KeyError:
        raise ConfigError(f"unknown grader {name!r}; choose one of {', '.join(GRADERS)}") from None
