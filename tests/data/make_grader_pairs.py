"""Build the labeled math-grader test set: tests/data/grader_pairs.jsonl.

Each line is one (response, reference) pair with the label a careful human grader gives
it under the rules of docs/eval.md ("Grader test set"):

    {"id", "category", "source", "reference", "response", "label", "note"}

``source`` is the benchmark the reference comes from (math500, minerva_math,
olympiadbench: the references exactly as the eval tasks load them) or ``hand`` for the
hand-written cases. ``label`` is true when the response's final answer is correct. The
construction is deterministic (fixed seed): the committed file must equal this script's
output, which tests/test_grader_pairs.py checks.

    python tests/data/make_grader_pairs.py            # rewrite the file
    python tests/data/make_grader_pairs.py --check    # exit 1 if the file is stale

Constructed pairs only use transformations whose effect on the value is certain (an
integer plus one, a terminating fraction written as a decimal, an ordered pair
reversed, ...); the categories and their rules are listed in docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

OUT = Path(__file__).with_name("grader_pairs.jsonl")
SEED = 19

# Response wrappers: a few lines of reasoning, then the boxed answer in the styles models use.
BOXED_TEMPLATES = (
    (
        "We set up the equation from the conditions and solve it step by step.\n\n"
        "After simplifying, the final answer is $\\boxed{ANSWER}$."
    ),
    "Let's compute carefully. Combining the terms gives\n\\[\n\\boxed{ANSWER}\n\\]",
    "Using the given conditions, the answer is \\(\\boxed{ANSWER}\\).",
    (
        "**Step 1.** Write down what is known.\n**Step 2.** Solve.\n\nTherefore the answer is "
        "$\\boxed{ANSWER}$."
    ),
    "Substituting back confirms the result: $\\boxed{ANSWER}$",
)


def boxed(answer: str, rng: random.Random) -> str:
    return rng.choice(BOXED_TEMPLATES).replace("ANSWER", answer)


def load_references() -> dict[str, list[str]]:
    """The references of each benchmark exactly as the eval tasks load them."""
    from probsft_megatron.eval.tasks import DataOptions, get_task

    return {
        name: [ex.reference for ex in get_task(name).load(DataOptions(), None)]
        for name in ("math500", "minerva_math", "olympiadbench")
    }


def display(reference: str) -> str:
    """A reference as a model would box it: without its own ``$`` delimiters."""
    return re.sub(r"(?<!\\)\$", "", reference).strip()


INT = re.compile(r"-?\d+")
DEC = re.compile(r"-?\d*\.\d+")
FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
SCI = re.compile(r"(-?)(\d+(?:\.\d+)?)e(-?\d+)")


def frac_value(ref: str) -> Fraction | None:
    m = FRAC.fullmatch(display(ref))
    if not m:
        return None
    value = Fraction(int(m.group(2)), int(m.group(3)))
    return -value if m.group(1) else value


def terminating(value: Fraction) -> str | None:
    """The exact decimal expansion of ``value`` when it terminates, else None."""
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return None
    text = f"{Decimal(value.numerator) / Decimal(value.denominator):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt_dec(value: Decimal) -> str:
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def numeric_value(ref: str) -> Fraction | None:
    """Exact value of an integer, decimal or simple-fraction reference, else None."""
    text = display(ref)
    if INT.fullmatch(text) or DEC.fullmatch(text):
        return Fraction(Decimal(text))
    return frac_value(text)


def latex_of(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


class Builder:
    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.pairs: list[dict] = []

    def add(
        self, category: str, source: str, reference: str, response: str, label: bool, note: str
    ) -> None:
        self.pairs.append(
            {
                "id": f"{category}-{sum(p['category'] == category for p in self.pairs):03d}",
                "category": category,
                "source": source,
                "reference": reference,
                "response": response,
                "label": label,
                "note": note,
            }
        )

    def sample(self, items: list, k: int) -> list:
        return self.rng.sample(items, min(k, len(items)))

    def box(self, answer: str) -> str:
        return boxed(answer, self.rng)


# ---------------------------------------------------------------- categories
def exact(b: Builder, refs: dict[str, list[str]]) -> None:
    """The reference itself, boxed (OlympiadBench multi-answers as one comma list)."""
    for source, k in (("math500", 60), ("minerva_math", 40), ("olympiadbench", 60)):
        for ref in b.sample(refs[source], k):
            b.add("exact", source, ref, b.box(display(ref)), True, "reference boxed verbatim")


def equivalent(b: Builder, refs: dict[str, list[str]]) -> None:
    """Equal values in other forms: fractions as decimals and a/b, \\dfrac, 5.0."""
    pool = [(s, r) for s in ("math500", "olympiadbench") for r in refs[s]]
    fracs = [(s, r) for s, r in pool if frac_value(r) is not None]
    for source, ref in b.sample(fracs, 40):
        value = frac_value(ref)
        dec = terminating(value)
        forms = [
            (f"{value.numerator}/{value.denominator}", "a/b for \\frac{a}{b}"),
            (f"\\dfrac{{{value.numerator}}}{{{value.denominator}}}", "\\dfrac"),
            (f"\\frac{{{2 * value.numerator}}}{{{2 * value.denominator}}}", "unreduced fraction"),
        ]
        if dec is not None:
            forms.append((dec, "terminating fraction as a decimal"))
        answer, note = b.rng.choice(forms)
        b.add("equivalent", source, ref, b.box(answer), True, note)
    ints = [(s, r) for s, r in pool if INT.fullmatch(r) and abs(int(r)) < 10**6]
    for source, ref in b.sample(ints, 15):
        b.add("equivalent", source, ref, b.box(f"{ref}.0"), True, "integer written n.0")
    decs = [(s, r) for s in refs for r in refs[s] if DEC.fullmatch(r)]
    for source, ref in b.sample(decs, 15):
        value = Fraction(Decimal(ref))
        b.add(
            "equivalent", source, ref, b.box(latex_of(value)), True, "decimal as an exact fraction"
        )
    hand = [
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("3\\sqrt{13}", "\\sqrt{117}"),
        ("2n-2", "2(n-1)"),
        ("x^2-1", "(x-1)(x+1)"),
        ("\\frac{n(n+1)}{2}", "\\frac{n^2+n}{2}"),
        ("10", "\\binom{5}{2}"),
        ("3", "\\log_2 8"),
        ("\\frac{\\pi}{6}", "\\frac{1}{6}\\pi"),
        ("6 - 5i", "-5i + 6"),
        ("1+2i", "2i+1"),
        ("p - q", "-q + p"),
        ("2^{1009}", "2 \\cdot 2^{1008}"),
        ("\\frac{4}{9}", "\\left(\\frac{2}{3}\\right)^2"),
        ("\\sqrt{51}", "51^{1/2}"),
        ("-\\frac{\\pi}{6}", "-\\frac{\\pi}{6}"),
        ("1\\frac{4}{5}", "\\frac{9}{5}"),
        ("\\frac{9}{5}", "1.8"),
        ("\\frac{3\\sqrt{3}}{4}", "\\frac{3}{4}\\sqrt{3}"),
        ("18+2\\pi", "2\\pi+18"),
        ("11\\sqrt{5} + 11", "11(\\sqrt{5}+1)"),
        ("\\frac{-1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}-1}{2}"),
        ("2^{k-1}", "\\frac{2^k}{2}"),
        ("n^{2}-n+1", "n(n-1)+1"),
        ("\\cot x", "\\frac{\\cos x}{\\sin x}"),
        ("0.15", "\\frac{3}{20}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\frac{1}{3}", "0.\\overline{3}"),
        ("e^{t} / 3", "\\frac{e^t}{3}"),
        ("2 \\pi / \\omega", "\\frac{2\\pi}{\\omega}"),
        ("\\frac{14}{3}", "4\\frac{2}{3}"),
        ("\\frac{14}{3}", "14/3"),
        ("1250", "1.25\\times10^{3}"),
        ("np.arcsin(10/13)", "\\arcsin\\left(\\frac{10}{13}\\right)"),
        ("np.arcsin(10/13)", "\\sin^{-1}(10/13)"),
        ("-\\frac{1}{2}", "\\frac{-1}{2}"),
        ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
        ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}/3"),
        ("-13x+3", "y = -13x + 3"),
        ("(a+5)(b+2)", "ab + 2a + 5b + 10"),
        ("6r^2-4r-24", "2(3r^2-2r-12)"),
        ("x^5 - x^4 + x^3 - x^2 + x - 1", "-1 + x - x^2 + x^3 - x^4 + x^5"),
        ("1+274i", "274i + 1"),
        ("3 \\pm 2 \\sqrt{2}", "3+2\\sqrt2, 3-2\\sqrt2"),
        ("1 \\pm \\sqrt{19}", "1 - \\sqrt{19}, 1 + \\sqrt{19}"),
        ("$n(n-1)$", "n^2-n"),
        ("$\\binom{2n}{n}$", "\\frac{(2n)!}{(n!)^2}"),
        ("4.25", "\\frac{17}{4}"),
        ("-\\frac{1}{2} X^{-\\frac{1}{2}}", "-\\frac{1}{2\\sqrt{X}}"),
        ("100 p^{\\frac{1}{2}}", "100\\sqrt{p}"),
        ("I(0) e^{-\\frac{t}{R C}}", "I(0)e^{-t/(RC)}"),
        ("\\frac{10}{11}", "\\dfrac{20}{22}"),
        (
            "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}",
            "\\hbar\\omega\\left(v+\\frac{1}{2}\\right)-\\frac{e^2E_0^2}{2m\\omega^2}",
        ),
        ("$2^{-2 / 3}$, $8$", "8, 2^{-2/3}"),
        ("$\\frac{1}{2},\\sqrt{x}$", "\\sqrt{x}, \\frac12"),
        ("$f(x)=x,f(x)=-x$", "f(x) = -x \\text{ and } f(x) = x"),
        ("-1,0,1", "0, \\pm 1"),
        ("(1,-4,-2),(3,2,3),(13,2,-2)", "(3,2,3),(13,2,-2),(1,-4,-2)"),
        ("$90^{\\circ}$,$60^{\\circ}$", "60^\\circ, 90^\\circ"),
    ]
    for ref, answer in hand:
        b.add("equivalent", "hand", ref, b.box(answer), True, "equivalent expression")


def units(b: Builder, refs: dict[str, list[str]]) -> None:
    """Units and their spellings are dropped; a bare letter is a variable unless the
    reference writes that letter as a unit."""
    ints = [r for r in refs["math500"] + refs["olympiadbench"] if INT.fullmatch(r)]
    spellings = [
        "@\\text{ cm}",
        "@ cm",
        "@\\,\\mathrm{m}",
        "@ \\mathrm{~km}",
        "@ \\text{ meters}",
        "@^\\circ",
        "\\$@",
        "@ \\text{ dollars}",
        "@\\text{ m}^2",
        "@ \\mathrm{~m} / \\mathrm{s}",
        "@ \\text{ inches}",
        "@ \\text{ units}",
        "@\\ \\text{seconds}",
        "@ \\mbox{ cm}^3",
    ]
    for ref in b.sample(ints, 42):
        form = b.rng.choice(spellings)
        b.add(
            "units",
            "math500" if ref in refs["math500"] else "olympiadbench",
            ref,
            b.box(form.replace("@", ref)),
            True,
            "unit spelled " + form.replace("@", "N"),
        )
    for ref in [
        r for r in refs["math500"] if re.search(r"\\(?:text|mbox)\{\s*(?:cents|degrees|inches)", r)
    ]:
        number = re.split(r"\\(?:text|mbox)", ref)[0].strip()
        b.add("units", "math500", ref, b.box(number), True, "reference with a unit, answer without")
    # bare letters: symbols of the reference (Minerva/OlympiadBench answers in a variable)
    symbolic = [
        ("minerva_math", "\\frac{37}{4} m", "9.25", "9.25 m", "9.25 t"),
        ("minerva_math", "7.6 Z", "7.6", "7.6Z", "7.6 K"),
        ("minerva_math", "2.2 \\tau", "2.2", "2.2\\tau", "2.2 t"),
        ("olympiadbench", "$6m$", "6", "6 m", "6t"),
        ("olympiadbench", "$2n$", "2", "2 n", "2m"),
        ("olympiadbench", "$3 n$", "3", "3n", "3k"),
    ]
    for source, ref, number, same, other in symbolic:
        b.add("units", source, ref, b.box(same), True, "same variable, spacing differs")
        b.add("units", source, ref, b.box(number), False, "the reference's variable dropped")
        b.add(
            "units",
            source,
            ref,
            b.box(other),
            False,
            "another single letter in place of the variable",
        )
    hand = [
        ("5 \\text{ m}", "5 m", True, "bare letter matching the reference's unit"),
        ("12 \\mathrm{~s}", "12 s", True, "bare letter matching the reference's unit"),
        ("3 \\text{ g}", "3 g", True, "bare letter matching the reference's unit"),
        ("3 \\text{ g}", "3", True, "reference unit dropped"),
        ("5", "5 m", False, "bare letter, reference has no unit: read as a variable"),
        ("12", "12 s", False, "bare letter, reference has no unit: read as a variable"),
        ("5 \\text{ m}", "5 t", False, "bare letter other than the reference's unit"),
        ("40", "40 \\text{ km/h}", True, "compound unit in \\text"),
        ("40", "40 \\mathrm{~km} \\mathrm{~h}^{-1}", True, "compound unit in \\mathrm"),
        ("1.6", "1.6 \\mathrm{~cm}", True, "Minerva-style unit"),
        ("\\text{Evelyn}", "\\text{Evelyn}", True, "text answer is not a unit"),
        ("90^\\circ", "90", True, "degree mark dropped"),
        ("90", "90^{\\circ}", True, "degree mark dropped"),
        ("30^\\circ", "30°", True, "unicode degree mark"),
        ("4", "4 \\text{ cm}^2", True, "area unit"),
        ("864 \\mbox{ inches}^2", "864 \\text{ in}^2", True, "another spelling of the unit"),
    ]
    for ref, answer, label, note in hand:
        b.add("units", "hand", ref, b.box(answer), label, note)


def percents(b: Builder, refs: dict[str, list[str]]) -> None:
    """A percent equals its fraction of 100 and, with the sign dropped, its number."""
    fracs = [
        (s, r)
        for s in ("math500", "olympiadbench")
        for r in refs[s]
        if (v := numeric_value(r)) is not None and 0 < v < 1 and terminating(v * 100) is not None
    ]
    for source, ref in b.sample(fracs, 24):
        pct = terminating(numeric_value(ref) * 100)
        b.add("percents", source, ref, b.box(f"{pct}\\%"), True, "fraction as a percent")
    for source, ref in b.sample(fracs, 12):
        pct = terminating(numeric_value(ref) * 100)
        b.add(
            "percents",
            source,
            ref,
            b.box(pct),
            False,
            "percent number without the sign for a fraction",
        )
    ints = [
        (s, r)
        for s in ("math500", "olympiadbench")
        for r in refs[s]
        if INT.fullmatch(r) and 0 < int(r) < 100
    ]
    for source, ref in b.sample(ints, 12):
        b.add(
            "percents",
            source,
            ref,
            b.box(f"{ref}\\%"),
            True,
            "percent sign added to the reference number",
        )
    for ref, answers in (
        (
            "$62.5%$",
            (
                ("62.5", True),
                ("0.625", True),
                ("62.5\\%", True),
                ("\\frac{5}{8}", True),
                ("0.625\\%", False),
                ("6250", False),
            ),
        ),
        ("17.5%", (("17.5", True), ("0.175", True), ("17.5 \\%", True), ("1750", False))),
        ("$8 \\%$", (("8", True), ("0.08", True), ("8 \\text{ percent}", True), ("80", False))),
        ("4.2", (("4.2\\%", True), ("0.042", False))),
    ):
        for answer, label in answers:
            b.add(
                "percents",
                "olympiadbench" if ref != "4.2" else "hand",
                ref,
                b.box(answer),
                label,
                "percent reference" if "%" in ref else "percent of a number reference",
            )


def flip_bracket(interval: str) -> str:
    """``interval`` with one finite end's bracket changed (closed <-> open)."""
    for i, ch in enumerate(interval):
        if ch in "[]":
            return interval[:i] + {"[": "(", "]": ")"}[ch] + interval[i + 1 :]
    for i, ch in enumerate(interval):
        if ch == "(" and not interval[i + 1 :].lstrip().startswith("-\\infty"):
            return interval[:i] + "[" + interval[i + 1 :]
        if ch == ")" and not interval[:i].rstrip().endswith("\\infty"):
            return interval[:i] + "]" + interval[i + 1 :]
    raise ValueError(f"no finite end in {interval}")


def sets_intervals(b: Builder, refs: dict[str, list[str]]) -> None:
    """Several answers are a set (order free); intervals keep their brackets."""
    lists = []
    for source in ("math500", "olympiadbench"):
        for ref in refs[source]:
            items = [x.strip() for x in display(ref).split(",")]
            if (
                len(items) >= 2
                and all(INT.fullmatch(x) for x in items)
                and len(set(items)) == len(items)
            ):
                lists.append((source, ref, items))
    for source, ref, items in b.sample(lists, 30):
        shuffled = items[::-1]
        b.add(
            "sets_intervals",
            source,
            ref,
            b.box(", ".join(shuffled)),
            True,
            "answers in another order",
        )
        if b.rng.random() < 0.5:
            b.add(
                "sets_intervals",
                source,
                ref,
                b.box(", ".join(items[:-1])),
                False,
                "one answer missing",
            )
        else:
            extra = str(max(int(x) for x in items) + 1)
            b.add(
                "sets_intervals",
                source,
                ref,
                b.box(", ".join(items + [extra])),
                False,
                "an extra answer",
            )
    several = [r for r in refs["olympiadbench"] if re.fullmatch(r"\$[^$]+\$(?:,\$[^$]+\$)+", r)]
    for ref in b.sample(several, 10):
        first = display(ref.split("$,$")[0])
        b.add(
            "sets_intervals",
            "olympiadbench",
            ref,
            b.box(first),
            False,
            "only the first of several answers",
        )
    intervals = [
        r
        for r in refs["math500"] + refs["olympiadbench"]
        if re.search(r"\\infty|\\cup", r)
        or re.fullmatch(r"\$?\s*\\?(?:left)?[(\[].*,.*\\?(?:right)?[)\]]\s*\$?", r)
        and re.search(r"\]|\[", r)
    ]
    for ref in intervals:
        source = "math500" if ref in refs["math500"] else "olympiadbench"
        text = display(ref)
        b.add(
            "sets_intervals",
            source,
            ref,
            b.box(re.sub(r"\\left|\\right", "", text).replace(" ", "")),
            True,
            "interval rewritten without \\left/\\right and spaces",
        )
        b.add(
            "sets_intervals",
            source,
            ref,
            b.box(flip_bracket(text)),
            False,
            "one end's bracket changed",
        )
    hand = [
        ("(0,9) \\cup (9,36)", "(9,36) \\cup (0,9)", True, "union in another order"),
        ("(2,\\infty)", "x > 2", True, "interval as an inequality"),
        ("(-\\infty, 0]", "x \\le 0", True, "interval as an inequality"),
        ("(5,\\infty)", "[5,\\infty)", False, "closed end instead of open"),
        ("(3,4]", "(3,4)", False, "open end instead of closed"),
        ("x \\in [-2,7]", "[-2,7]", True, "interval without x \\in"),
        ("[-2,7]", "-2 \\le x \\le 7", True, "interval as a double inequality"),
        ("1, 3, 5, 15", "\\{1, 3, 5, 15\\}", True, "set braces"),
        ("1,-2", "-2 \\text{ and } 1", True, "'and' between answers"),
        ("3, 5, 7", "3, 5", False, "one answer missing"),
        ("\\{1,2\\}", "1 \\text{ or } 2", True, "'or' between answers"),
        ("2, 4, 3", "2, 3, 4, 5", False, "an extra answer"),
    ]
    for ref, answer, label, note in hand:
        b.add("sets_intervals", "hand", ref, b.box(answer), label, note)


def tuples(b: Builder, refs: dict[str, list[str]]) -> None:
    """Ordered pairs and triples keep their order."""
    pts = []
    for source in ("math500", "olympiadbench"):
        for ref in refs[source]:
            text = re.sub(r"\\left|\\right", "", display(ref)).strip()
            m = re.fullmatch(r"\((.*)\)", text)
            if m and "(" not in m.group(1) and "[" not in text and "\\infty" not in text:
                items = [x.strip() for x in m.group(1).split(",")]
                if len(items) >= 2 and items != items[::-1]:
                    pts.append((source, ref, items))
    for source, ref, items in pts:
        b.add(
            "tuples",
            source,
            ref,
            b.box("(" + ", ".join(items) + ")"),
            True,
            "tuple with other spacing",
        )
        b.add(
            "tuples",
            source,
            ref,
            b.box("(" + ", ".join(items[::-1]) + ")"),
            False,
            "tuple reversed",
        )
    hand = [
        ("(1,2)", "(2,1)", False, "ordered pair reversed"),
        ("(6,31,-1)", "\\left(6, 31, -1\\right)", True, "\\left( \\right)"),
        (
            "(1,8,19), (2,7,13), (4,5,7)",
            "(4,5,7), (1,8,19), (2,7,13)",
            True,
            "set of tuples reordered",
        ),
        ("(1,8,19), (2,7,13), (4,5,7)", "(1,8,19), (2,7,13)", False, "one tuple missing"),
        ("(3,2)", "(3, 2)", True, "spacing"),
        ("(3,2)", "(2, 3)", False, "reversed"),
    ]
    for ref, answer, label, note in hand:
        b.add("tuples", "hand", ref, b.box(answer), label, note)


def equations(b: Builder, refs: dict[str, list[str]]) -> None:
    """An answer given as "x = value" (or "a+b+c = value") states the value; equation
    references match equivalent equations."""
    ints = [(s, r) for s in ("math500", "olympiadbench") for r in refs[s] if INT.fullmatch(r)]
    lhs = ["x", "n", "a+b+c", "m+n", "k", "AB", "S", "f(2)"]
    for source, ref in b.sample(ints, 30):
        b.add(
            "equations",
            source,
            ref,
            b.box(f"{b.rng.choice(lhs)} = {ref}"),
            True,
            "value stated as an equation",
        )
    for source, ref in b.sample(ints, 10):
        b.add(
            "equations",
            source,
            ref,
            b.box(f"x = {int(ref) + 1}"),
            False,
            "equation with a wrong value",
        )
    hand = [
        ("5x - 7y + 11z + 4 = 0", "-5x + 7y - 11z - 4 = 0", True, "both sides negated"),
        ("5x - 7y + 11z + 4 = 0", "10x - 14y + 22z + 8 = 0", True, "both sides doubled"),
        ("5x - 7y + 11z + 4 = 0", "5x - 7y + 11z - 4 = 0", False, "another constant"),
        ("$f(x)=2 x$", "f(x) = 2x", True, "spacing"),
        ("$f(x)=2 x$", "2x", True, "right-hand side only"),
        ("$f(x)=2 x$", "f(x) = x", False, "another function"),
        ("$k=1$", "1", True, "value only"),
        ("x=5", "5", True, "value only"),
        ("x=5", "x = 6", False, "wrong"),
        ("X_{d}=125-1.25 P", "X_d = 125 - 1.25P", True, "spacing and braces"),
        ("$f(x)=x+1$", "f(x) = 1 + x", True, "terms reordered"),
        ("$f(n)=n$, $g(n)=1$", "f(n)=n, g(n)=1", True, "two functions"),
        ("y=2x+3", "2x - y + 3 = 0", True, "rearranged"),
        ("y=2x+3", "y = 3x + 2", False, "coefficients swapped"),
        ("m \\frac{d v}{d t}+b v=f", "m \\frac{dv}{dt} + bv = f", True, "spacing"),
        ("$M=2^{N-2}+1$", "2^{N-2}+1", True, "value only"),
        ("$k=n+1$", "k = n + 2", False, "wrong"),
    ]
    for ref, answer, label, note in hand:
        b.add("equations", "hand", ref, b.box(answer), label, note)


def matrices(b: Builder, refs: dict[str, list[str]]) -> None:
    """Matrices and vectors: pmatrix/bmatrix, entries in any equal form, order fixed."""
    mats = [r for r in refs["math500"] if "pmatrix" in r]
    for ref in mats:
        b.add(
            "matrices",
            "math500",
            ref,
            b.box(ref.replace("pmatrix", "bmatrix")),
            True,
            "bmatrix for pmatrix",
        )
        entries = re.findall(r"-?\d+(?:/\d+)?", ref)
        first = entries[0]
        changed = re.sub(
            re.escape(first),
            str(int(first.split("/")[0]) + 1) + ("/" + first.split("/")[1] if "/" in first else ""),
            ref,
            count=1,
        )
        b.add("matrices", "math500", ref, b.box(changed), False, "one entry changed")
    hand = [
        (
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}",
            False,
        ),
        (
            "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1/4 \\end{pmatrix}",
            "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 0.25 \\end{pmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1/4 \\end{pmatrix}",
            "\\begin{pmatrix} \\frac{1}{2} & 0 \\\\ 0 & \\frac{1}{4} \\end{pmatrix}",
            True,
        ),
        (
            "\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1/4 \\end{pmatrix}",
            "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 0.4 \\end{pmatrix}",
            False,
        ),
        (
            "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}",
            "\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}",
            False,
        ),
        (
            "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}",
            "\\left(\\begin{matrix} 2 \\\\ -1 \\end{matrix}\\right)",
            True,
        ),
        (
            "\\begin{pmatrix} 0 & -1 \\\\ 1 & 0 \\end{pmatrix}",
            "\\begin{pmatrix} 0 & 1 \\\\ -1 & 0 \\end{pmatrix}",
            False,
        ),
    ]
    for ref, answer, label in hand:
        b.add("matrices", "hand", ref, b.box(answer), label, "hand-written matrix")


def scientific(b: Builder, refs: dict[str, list[str]]) -> None:
    """Scientific notation in e and \\times 10^{} forms; the reference's significant
    digits set the tolerance (the answer must round to the reference)."""
    for ref in refs["minerva_math"]:
        m = SCI.fullmatch(ref)
        if not m:
            continue
        sign, mantissa, exponent = m.group(1), m.group(2), int(m.group(3))
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        ulp = Decimal(1).scaleb(-decimals)
        mant = Decimal(mantissa)
        forms = [
            (f"{sign}{mantissa} \\times 10^{{{exponent}}}", True, "\\times 10^{} form"),
            (f"{sign}{mantissa} \\cdot 10^{{{exponent}}}", True, "\\cdot 10^{} form"),
            (f"{sign}{mantissa}\\times10^{{{exponent}}} \\mathrm{{~cm}}", True, "with a unit"),
            (
                f"{sign}{fmt_dec(mant + ulp * Decimal('0.3'))} \\times 10^{{{exponent}}}",
                True,
                "one more digit, rounds to the reference",
            ),
            (
                f"{sign}{fmt_dec(mant + ulp)} \\times 10^{{{exponent}}}",
                False,
                "last significant digit off by one",
            ),
            (f"{sign}{mantissa} \\times 10^{{{exponent + 1}}}", False, "exponent off by one"),
        ]
        if -4 <= exponent <= 7:
            forms.append(
                (fmt_dec(Decimal(sign + mantissa).scaleb(exponent)), True, "plain decimal")
            )
        for answer, label, note in b.sample(forms, 2):
            b.add("scientific", "minerva_math", ref, b.box(answer), label, note)
    small = [
        r
        for r in refs["minerva_math"]
        if DEC.fullmatch(r) and Decimal(r) != 0 and abs(Decimal(r)) < Decimal("0.1")
    ]
    for ref in small:
        value = Decimal(ref)
        exponent = value.adjusted()
        mantissa = fmt_dec(value.scaleb(-exponent))
        b.add(
            "scientific",
            "minerva_math",
            ref,
            b.box(f"{mantissa} \\times 10^{{{exponent}}}"),
            True,
            "decimal reference, answer in scientific notation",
        )
    hand = [
        (
            "4.5e33",
            "4.5 \\times 10^{33} \\mathrm{~erg} \\mathrm{~s}^{-1}",
            True,
            "Minerva unit after the number",
        ),
        ("4.5e33", "4.5e33", True, "e form"),
        ("4.5e33", "4.5E33", True, "upper-case E"),
        ("4.5e33", "45 \\times 10^{32}", True, "mantissa not normalized"),
        ("3e8", "2.998 \\times 10^{8}", True, "more precise value rounding to the reference"),
        ("3e8", "3.6 \\times 10^{8}", False, "rounds to 4e8"),
        ("1e-5", "10^{-5}", True, "power of ten"),
        ("1e-5", "1 \\times 10^{5}", False, "exponent sign lost"),
        ("2.7778e-6", "2.78 \\times 10^{-6}", False, "fewer digits than the reference"),
        ("7.353e14", "7.353 \\times 10^{14}", True, "four digits"),
        ("4.5e33", "4.5 \\times 10^{33}", True, "the issue's example"),
    ]
    for ref, answer, label, note in hand:
        b.add("scientific", "hand", ref, b.box(answer), label, note)


def multiple_boxes(b: Builder, refs: dict[str, list[str]]) -> None:
    """The final answer is the last box; boxes joined by "and"/"," state one answer."""
    ints = [r for r in refs["math500"] + refs["olympiadbench"] if INT.fullmatch(r)]
    for ref in b.sample(ints, 20):
        wrong = str(int(ref) + b.rng.randint(1, 9))
        text = (
            f"First attempt gives $\\boxed{{{wrong}}}$. Wait, let me recheck the second step: "
            f"the sign was wrong. Correcting it, the answer is $\\boxed{{{ref}}}$."
        )
        b.add(
            "multiple_boxes",
            "math500" if ref in refs["math500"] else "olympiadbench",
            ref,
            text,
            True,
            "revised answer in the last box",
        )
    for ref in b.sample(ints, 15):
        wrong = str(int(ref) + b.rng.randint(1, 9))
        text = (
            f"This gives $\\boxed{{{ref}}}$. Checking again with another method, I get "
            f"$\\boxed{{{wrong}}}$, so the answer is {wrong}."
        )
        b.add(
            "multiple_boxes",
            "math500" if ref in refs["math500"] else "olympiadbench",
            ref,
            text,
            False,
            "correct box first, a wrong one last",
        )
    for ref in b.sample(ints, 10):
        wrong = str(int(ref) + b.rng.randint(1, 9))
        b.add(
            "multiple_boxes",
            "math500" if ref in refs["math500"] else "olympiadbench",
            ref,
            f"The possible values are $\\boxed{{{ref}}}$ and $\\boxed{{{wrong}}}$.",
            False,
            "two answers for a single-answer reference",
        )
    pairs = []
    for source in ("math500", "olympiadbench"):
        for ref in refs[source]:
            items = [x.strip() for x in display(ref).split(",")]
            if len(items) == 2 and all(INT.fullmatch(x) for x in items) and items[0] != items[1]:
                pairs.append((source, ref, items))
    for source, ref, items in b.sample(pairs, 12):
        joiner = b.rng.choice(
            [
                "$\\boxed{{{}}}$ and $\\boxed{{{}}}$",
                "$x=\\boxed{{{}}}$ or $x=\\boxed{{{}}}$",
                "$\\boxed{{{}}}, \\boxed{{{}}}$",
            ]
        )
        b.add(
            "multiple_boxes",
            source,
            ref,
            "The solutions are " + joiner.format(*items) + ".",
            True,
            "two boxes for a two-answer reference",
        )
    for ref in b.sample(ints, 5):
        b.add(
            "multiple_boxes",
            "math500" if ref in refs["math500"] else "olympiadbench",
            ref,
            f"So $\\boxed{{{ref}}}$.\n\nFinal answer: $\\boxed{{{ref}}}$",
            True,
            "the same answer boxed twice",
        )


def unboxed(b: Builder, refs: dict[str, list[str]]) -> None:
    """No box: an explicit answer statement is read; a bare final number is not."""
    ints = [r for r in refs["math500"] + refs["olympiadbench"] if INT.fullmatch(r)]
    statements = [
        "Adding the cases, the answer is $ANSWER$.",
        "Final Answer: The final answer is $ANSWER$. I hope it is correct.",
        "We conclude.\n\n**Answer:** ANSWER",
        "Therefore, the final answer is ANSWER.",
        "Answer: $ANSWER$",
    ]
    for ref in b.sample(ints, 30):
        source = "math500" if ref in refs["math500"] else "olympiadbench"
        b.add(
            "unboxed",
            source,
            ref,
            b.rng.choice(statements).replace("ANSWER", ref),
            True,
            "answer statement",
        )
    for ref in b.sample(ints, 12):
        wrong = str(int(ref) + b.rng.randint(1, 9))
        source = "math500" if ref in refs["math500"] else "olympiadbench"
        b.add(
            "unboxed",
            source,
            ref,
            b.rng.choice(statements).replace("ANSWER", wrong),
            False,
            "answer statement, wrong value",
        )
    for ref in b.sample(ints, 25):
        source = "math500" if ref in refs["math500"] else "olympiadbench"
        step = f"{int(ref) - 3} + 3 = {ref}"
        b.add(
            "unboxed",
            source,
            ref,
            f"Counting the remaining cases, we get ${step}$.",
            False,
            "no box and no answer statement (the number is only the end of a computation)",
        )
    for ref in b.sample(ints, 8):
        source = "math500" if ref in refs["math500"] else "olympiadbench"
        b.add(
            "unboxed",
            source,
            ref,
            f"Putting it together, the answer is $\\boxed{{{ref}",
            False,
            "box never closed (truncated generation)",
        )


def wrong_small(b: Builder, refs: dict[str, list[str]]) -> None:
    """Close but wrong: off by one, rounded, a factor of 100, a digit changed."""
    ints = [
        (s, r)
        for s in ("math500", "olympiadbench", "minerva_math")
        for r in refs[s]
        if INT.fullmatch(r)
    ]
    for source, ref in b.sample(ints, 25):
        b.add("wrong_small", source, ref, b.box(str(int(ref) + 1)), False, "integer off by one")
    large = [(s, r) for s, r in ints if int(r) >= 10**4]
    for source, ref in large:
        b.add(
            "wrong_small",
            source,
            ref,
            b.box(str(int(ref) + 1)),
            False,
            "large integer off by one (relative < 1e-4)",
        )
    for source, ref in b.sample([(s, r) for s, r in ints if int(r) != 0], 15):
        b.add(
            "wrong_small",
            source,
            ref,
            b.box(str(int(ref) * 100)),
            False,
            "a factor of 100 too large",
        )
    decs = [(s, r) for s in refs for r in refs[s] if DEC.fullmatch(r)]
    for source, ref in b.sample(decs, 15):
        digits = len(ref.split(".")[1])
        changed = Decimal(ref) + Decimal(1).scaleb(-digits)
        b.add(
            "wrong_small",
            source,
            ref,
            b.box(f"{changed:f}"),
            False,
            "last decimal digit off by one",
        )
    fracs = [
        (s, r) for s in ("math500", "olympiadbench") for r in refs[s] if frac_value(r) is not None
    ]
    for source, ref in b.sample(fracs, 15):
        value = frac_value(ref)
        wrong = Fraction(value.numerator + 1, value.denominator)
        b.add("wrong_small", source, ref, b.box(latex_of(wrong)), False, "numerator off by one")
    hand = [
        ("\\frac{1}{3}", "0.33", "rounded decimal"),
        ("\\frac{2}{3}", "0.667", "rounded decimal"),
        ("\\frac{1}{7}", "0.142857", "rounded decimal (six digits)"),
        ("\\sqrt{2}", "1.414", "rounded decimal"),
        ("\\pi", "3.14", "rounded decimal"),
        ("\\pi", "3.14159", "rounded decimal"),
        ("12\\pi", "37.7", "rounded decimal"),
        ("\\frac{270}7\\text{ degrees}", "38.57", "rounded decimal"),
        ("\\frac{1}{4}", "25", "percent number for a fraction"),
        ("4.49", "4.5", "reference rounded further"),
        ("0.5613", "0.561", "reference rounded further"),
        ("3.21", "3.2", "reference rounded further"),
        ("2k+2", "2k", "term missing"),
        ("e^{t} / 3", "e^{3t}", "another expression"),
        ("x=5", "x=5, x=6", "an extra solution"),
        ("1 \\pm \\sqrt{19}", "1 + \\sqrt{19}", "one of two solutions"),
        ("(-\\infty, 0]", "(-\\infty, 0)", "open end instead of closed"),
        ("\\text{even}", "odd", "another word"),
        ("\\alpha", "a", "another symbol"),
        ("(-2,1)", "-2 < x < 1", "a point answered as an interval"),
        ("4e33", "4.6 \\times 10^{33}", "rounds to 5e33"),
    ]
    for ref, answer, note in hand:
        b.add("wrong_small", "hand", ref, b.box(answer), False, note)


def wrong(b: Builder, refs: dict[str, list[str]]) -> None:
    """Another problem's answer."""
    for source in ("math500", "minerva_math", "olympiadbench"):
        numeric = [r for r in refs[source] if numeric_value(r) is not None]
        for ref in b.sample(numeric, 20):
            other = b.rng.choice([r for r in numeric if numeric_value(r) != numeric_value(ref)])
            b.add("wrong", source, ref, b.box(display(other)), False, "another problem's answer")
        symbolic = [
            r for r in refs[source] if numeric_value(r) is None and "," not in r and len(r) < 40
        ]
        for ref in b.sample(symbolic, 10):
            other = b.rng.choice([r for r in symbolic if r != ref])
            b.add(
                "wrong",
                source,
                ref,
                b.box(display(other)),
                False,
                "another problem's (symbolic) answer",
            )


def text_answers(b: Builder, refs: dict[str, list[str]]) -> None:
    """Words and option letters: case and \\text{} do not matter."""
    words = [r for r in refs["math500"] if re.fullmatch(r"\\text\{[A-Za-z]+\}", r)]
    for ref in words:
        word = ref[6:-1]
        b.add("text", "math500", ref, b.box(word), True, "word without \\text")
        b.add(
            "text",
            "math500",
            ref,
            b.box(f"\\text{{{word.capitalize() if word.islower() else word.lower()}}}"),
            True,
            "other capitalization",
        )
        other = b.rng.choice([w[6:-1] for w in words if w != ref])
        b.add("text", "math500", ref, b.box(f"\\text{{{other}}}"), False, "another word")
    letters = [r for r in refs["math500"] if re.fullmatch(r"\\text\{\([A-E]\)\}", r)]
    for ref in letters:
        letter = ref[7]
        b.add("text", "math500", ref, b.box(letter), True, "option letter alone")
        b.add("text", "math500", ref, b.box(f"({letter})"), True, "option letter in parentheses")
        b.add(
            "text",
            "math500",
            ref,
            b.box("\\text{(" + ("A" if letter != "A" else "B") + ")}"),
            False,
            "another option",
        )


def thousands(b: Builder, refs: dict[str, list[str]]) -> None:
    """Thousands separators (,\\! in MATH references) do not matter."""
    grouped = [r for r in refs["math500"] if ",\\!" in r]
    for ref in grouped:
        digits = re.sub(r"[^\d]", "", ref)
        b.add("thousands", "math500", ref, b.box(digits), True, "digits without separators")
        b.add(
            "thousands",
            "math500",
            ref,
            b.box(re.sub(r",\\!\s*", ",", display(ref)).replace("\\$", "")),
            True,
            "plain commas",
        )
        b.add("thousands", "math500", ref, b.box(str(int(digits) + 1000)), False, "a thousand off")
    for n in (10080, 1000000, 2500, 33000):
        b.add("thousands", "hand", str(n), b.box(f"{n:,}"), True, "comma-grouped")
        b.add("thousands", "hand", str(n), b.box(f"{n:,}".replace(",", "{,}")), True, "{,}-grouped")


def formatting(b: Builder, refs: dict[str, list[str]]) -> None:
    """How the answer is written, not what it is: spacing, braces, trailing zeros and
    periods, "\\approx", number words, subscripts, option letters."""
    decs = [(s, r) for s in refs for r in refs[s] if DEC.fullmatch(r) and not r.startswith(".")]
    for source, ref in b.sample(decs, 10):
        b.add("formatting", source, ref, b.box(ref + "0"), True, "trailing zero")
    for source, ref in b.sample(decs, 6):
        b.add(
            "formatting", source, ref, b.box(f"\\approx {ref}"), True, "value stated with \\approx"
        )
    hand = [
        ("41.8", "\\approx 41.8", True),
        ("2", "2.00", True),
        ("+2", "2", True),
        ("+2", "+2", True),
        ("\\text{(C)}", "\\text{C}", True),
        ("\\text{(C)}", "\\textbf{(C)}", True),
        ("3", "three", True),
        ("\\text{Evelyn}", "\\text{Evelyn}.", True),
        (".0000672", "0.0000672", True),
        ("52_8", "52_{8}", True),
        ("4210_{5}", "4210_5", True),
        ("11\\sqrt2", "11 \\sqrt{2}", True),
        ("\\frac 59", "5/9", True),
        ("\\frac43", "\\frac{4}{3}", True),
        ("\\frac9{19}", "9/19", True),
        ("20 \\sqrt{7}", "20 \\sqrt 7", True),
        ("$k \\geqslant 2$", "k \\ge 2", True),
        ("$k \\geqslant 2$", "k \\geq 2", True),
        ("$2 n$", "2n", True),
        ("\\text{even}", "even", True),
        ("3.21", "3.210", True),
        ("\\frac{1}{4p^2}", "\\frac{1}{4 p^{2}}", True),
        ("\\alpha", "\\alpha", True),
        ("$\\binom{2n}{n}$", "\\binom{2n}{n}", True),
        ("-1./3", "-\\frac{1}{3}", True),
        ("-3./2", "-1.5", True),
        ("\\lfloor\\log _{2} n\\rfloor+1", "\\lfloor \\log_2 n \\rfloor + 1", True),
        ("x=5", "x=5.", True),
        ("$t(0,4]$", "(0,4]", True),
        ("E_{1},E_{2}", "E_2, E_1", True),
        ("\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", "\\frac{E_1 + 2E_2}{3}", True),
    ]
    for ref, answer, label in hand:
        b.add("formatting", "hand", ref, b.box(answer), label, "presentation differs")


CATEGORIES = (
    exact,
    equivalent,
    units,
    percents,
    sets_intervals,
    tuples,
    equations,
    matrices,
    scientific,
    multiple_boxes,
    unboxed,
    wrong_small,
    wrong,
    text_answers,
    thousands,
    formatting,
)


def build() -> list[dict]:
    refs = load_references()
    builder = Builder()
    for category in CATEGORIES:
        category(builder, refs)
    return builder.pairs


def render(pairs: list[dict]) -> str:
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the committed file differs from the build"
    )
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        stale = not OUT.is_file() or OUT.read_text(encoding="utf-8") != text
        print(f"{OUT} is {'stale: rerun this script' if stale else 'up to date'}")
        return int(stale)
    from probsft_megatron.fileio import atomic_write_text

    atomic_write_text(OUT, text)
    print(f"wrote {text.count(chr(10))} pairs to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
