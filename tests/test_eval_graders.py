"""Graders, answer extraction, Jaro-Winkler, prompt-family detection and sampling metrics,
each checked against hand-computed expectations."""

from __future__ import annotations

import random
from itertools import combinations
from math import comb

import pytest

from probsft_megatron.errors import ConfigError
from probsft_megatron.eval.graders import (
    extract_boxed,
    extract_choice,
    extract_math_answer,
    get_grader,
    grade_choice,
    grade_exact,
    grade_jaro_winkler,
    grade_math,
    jaro_winkler,
    math_equal,
)
from probsft_megatron.eval.metrics import default_ks, pass_at_k, summarize
from probsft_megatron.eval.prompts import detect_family, render, resolve_family
from probsft_megatron.eval.report import format_notes, markdown_table


# ---------------------------------------------------------------- boxed extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"$\boxed 7$", "7"),
        (r"\fbox{12}", "12"),
        ("The answer is 42.", None),
        (r"unfinished \boxed{\frac{1}{2}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ---------------------------------------------------------------- math grading
@pytest.mark.parametrize(
    "completion, reference, extracted, correct",
    [
        # equivalent fraction and decimal; a rounded decimal is not equal
        (r"\boxed{0.5}", r"\frac{1}{2}", "0.5", True),
        (r"\boxed{0.33}", r"\frac{1}{3}", "0.33", False),
        # \dfrac is normalized to \frac
        (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", r"\frac{3}{4}", True),
        (r"\boxed{\tfrac{6}{8}}", r"\frac{3}{4}", r"\frac{6}{8}", True),
        # units are dropped: "5 cm" equals 5
        (r"\boxed{5 \text{ cm}}", "5", r"5 \text{ cm}", True),
        (r"\boxed{5 cm}", "5", "5 cm", True),
        (r"\boxed{6 \text{ cm}}", "5", r"6 \text{ cm}", False),
        # several answers are an unordered set; tuples stay ordered
        (r"\boxed{2, 1}", "1, 2", "2, 1", True),
        (r"\boxed{\{1,2\}}", "1,2", r"\{1,2\}", True),
        (r"\boxed{1, 3}", "1, 2", "1, 3", False),
        (r"\boxed{(2,1)}", "(1,2)", "(2,1)", False),
        # nested braces survive extraction
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True),
        # several boxed answers: the last one counts
        (r"\boxed{3} ... actually \boxed{4}", "4", "4", True),
        (r"\boxed{4} ... actually \boxed{3}", "4", "3", False),
        # no box: an explicit answer statement is read, a bare number is not
        ("The answer is 4.", "4", "4", True),
        ("Final Answer: The final answer is $4$. I hope it is correct.", "4", "4", True),
        ("so we get 2 + 2 = 4.", "4", None, False),
        # dollar signs and thousands separators in references (MATH500 style)
        (r"\boxed{32348}", r"\$32,\!348", "32348", True),
        # OlympiadBench multi-answer references keep their own math delimiters
        (r"\boxed{84, 69}", "$69$,$84$", "84, 69", True),
    ],
)
def test_grade_math(completion, reference, extracted, correct):
    grade = grade_math(completion, reference)
    assert grade.extracted == extracted
    assert grade.correct is correct
    assert grade.score == float(correct)


@pytest.mark.parametrize(
    "reference, answer, correct",
    [
        # scientific notation: e and \times 10^{} forms, tolerance from the reference's digits
        ("4.5e33", r"4.5\times10^{33}", True),
        ("4.5e33", r"4.5 \cdot 10^{33} \mathrm{~erg} \mathrm{~s}^{-1}", True),
        ("4.5e33", r"4.46 \times 10^{33}", True),  # rounds to 4.5e33
        ("4.5e33", r"4.44 \times 10^{33}", False),  # rounds to 4.4e33
        ("4.5e33", r"4.5 \times 10^{34}", False),
        ("3e8", r"2.998 \times 10^{8}", True),
        ("2.7778e-6", r"2.78 \times 10^{-6}", False),  # less precise than the reference
        ("0.006", r"6 \times 10^{-3}", True),  # exact decimal reference: exact comparison
        ("0.006", "6.1e-3", False),
        # a bare letter is a variable unless the reference carries it as a unit
        ("6m", "6t", False),
        ("6m", "6", False),
        ("6m", "6 m", True),
        (r"\frac{37}{4} m", "9.25", False),
        (r"5 \text{ m}", "5 m", True),
        ("5", "5 m", False),
        ("5", r"5\,\mathrm{m}", True),
        # percents: a fraction of 100, or the number with the sign read as a unit
        (r"\frac14", r"25\%", True),
        ("62.5%", "0.625", True),
        ("62.5%", "62.5", True),
        ("62.5%", r"0.625\%", False),
        ("0.25", "25", False),
        # close is not equal
        ("100337", "100338", False),
        (r"\frac{1}{7}", "0.142857", False),
        # equations, intervals, choices, references with a trailing dot
        ("23", "a+b+c = 23", True),
        (r"(2,\infty)", "x > 2", True),
        ("(-2,1)", "-2 < x < 1", False),  # a point, not an interval
        (r"\text{(C)}", "C", True),
        ("-1./3", r"-\frac{1}{3}", True),
        (r"\frac{1}{3} E_{1}+\frac{2}{3} E_{2}", r"\frac{E_1 + 2E_2}{3}", True),
    ],
)
def test_math_equal_rules(reference, answer, correct):
    assert math_equal(reference, answer) is correct


@pytest.mark.parametrize(
    "text, answer, source",
    [
        (r"so \boxed{3} ... wait, actually \boxed{4}.", "4", "boxed"),
        (r"The solutions are $\boxed{2}$ and $\boxed{3}$.", "2, 3", "boxed"),
        (r"$x = \boxed{2}$ or $x = \boxed{3}$", "2, 3", "boxed"),
        (r"$\boxed{4}$. Final answer: $\boxed{4}$", "4", "boxed"),
        ("The answer is $13$.", "13", "statement"),
        ("**Answer:** 13 apples", "13", "statement"),
        ("We get $10 + 3 = 13$.", None, None),
        (r"the answer is $\boxed{13", None, None),
    ],
)
def test_extract_math_answer(text, answer, source):
    assert extract_math_answer(text) == (answer, source)
    grade = grade_math(text, "13")
    assert grade.source == source and grade.extracted == answer


# ---------------------------------------------------------------- choice / exact
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"... so \boxed{C}", "C"),
        (r"\boxed{\text{(B)}}", "B"),
        ("The answer is (D).", "D"),
        ("Answer: b", None),  # lower-case letters are prose, not option letters
        ("Answer: B", "B"),
        ("A", "A"),
        ("(E)", "E"),
        ("A patient with fever most likely has an infection.", None),
        ("The answer is Aspirin.", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_grade_choice_and_exact():
    assert grade_choice("the answer is B", "b").correct
    assert not grade_choice("the answer is B", "C").correct
    assert grade_exact("  HELLO\n", "HELLO").correct
    assert not grade_exact("hello", "HELLO").correct


# ---------------------------------------------------------------- Jaro-Winkler
@pytest.mark.parametrize(
    "a, b, expected",
    [
        # textbook values: jaro 0.9444 / 0.8222 / 0.7667, prefixes 3 / 1 / 2
        ("MARTHA", "MARHTA", 0.9611),
        ("DWAYNE", "DUANE", 0.84),
        ("DIXON", "DICKSONX", 0.8133),
        ("ABC", "ABC", 1.0),
        ("ABC", "XYZ", 0.0),
        ("", "ABC", 0.0),
    ],
)
def test_jaro_winkler_textbook(a, b, expected):
    assert jaro_winkler(a, b) == pytest.approx(expected, abs=1e-4)
    assert jaro_winkler(b, a) == pytest.approx(expected, abs=1e-4)


def test_grade_jaro_winkler_is_case_insensitive():
    grade = grade_jaro_winkler(" martha", "MARHTA")
    assert grade.extracted == "MARTHA" and not grade.correct
    assert grade.score == pytest.approx(0.9611, abs=1e-4)
    assert grade_jaro_winkler("hello", "HELLO").correct


def test_unknown_grader_lists_valid_names():
    with pytest.raises(ConfigError, match="exact, math, jaro_winkler, choice"):
        get_grader("fuzzy")


# ---------------------------------------------------------------- pass@k / avg@n
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (2, 1, 1, 0.5),
        (2, 1, 2, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (16, 0, 8, 0.0),
        (16, 16, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_enumeration():
    """pass@k equals the fraction of k-subsets containing a correct sample."""
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 8)
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            hits = sum(any(outcomes[i] for i in subset) for subset in combinations(range(n), k))
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(hits / comb(n, k))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_hand_computed():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    scores = [[1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0] * 4]
    summary = summarize(correct, scores)
    assert summary["problems"] == 3 and summary["n"] == 4
    assert summary["avg@n"] == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    # pass@2: problem 1: 1 - C(3,2)/C(4,2) = 0.5; problem 2: 1 - 1/6; problem 3: 0
    assert summary["pass@k"]["2"] == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
    assert summary["pass@k"]["4"] == pytest.approx(2 / 3)
    assert summary["mean_score"] == pytest.approx((0.375 + 0.5 + 0.0) / 3)
    assert (
        default_ks(16) == [1, 2, 4, 8, 16]
        and default_ks(6) == [1, 2, 4, 6]
        and default_ks(1) == [1]
    )


def test_summarize_extraction_rates_hand_computed():
    correct = [[True, False, False, False], [False, False, False, False]]
    extracted = [[True, True, False, False], [True, False, False, False]]
    boxed = [[True, False, False, False], [True, False, False, False]]
    summary = summarize(correct, extracted=extracted, boxed=boxed)
    assert summary["extracted"] == pytest.approx(3 / 8)
    assert summary["boxed"] == pytest.approx(2 / 8)
    assert summary["accuracy_extracted"] == pytest.approx(1 / 3)
    none = summarize([[False]], extracted=[[False]])
    assert none["extracted"] == 0.0 and none["accuracy_extracted"] is None
    with pytest.raises(ValueError, match="extracted must have the shape"):
        summarize(correct, extracted=[[True]])


def test_report_shows_answer_format_rates():
    math = {
        "task": "math500",
        "metrics": {
            "problems": 2,
            "n": 4,
            "avg@n": 0.125,
            "pass@k": {"1": 0.125},
            "extracted": 0.375,
            "boxed": 0.25,
            "accuracy_extracted": 1 / 3,
        },
    }
    fig = {
        "task": "figfont",
        "metrics": {
            "problems": 1,
            "n": 1,
            "avg@n": 1.0,
            "pass@k": {"1": 1.0},
            "mean_score": 1.0,
            "exact": 1.0,
        },
    }
    table = markdown_table([math, fig]).splitlines()
    assert table[0].endswith("| boxed | extracted | acc. of extracted |")
    assert table[2].endswith("| 25.0 | 37.5 | 33.3 |") and table[3].endswith(
        "| 100.0 | 100.0 |  |  |  |"
    )
    assert "boxed" not in markdown_table([fig])
    notes = format_notes([math, fig])
    assert notes == (
        "math500: 62.5% of samples have no extractable final answer (75.0% have no \\boxed{}); "
        "accuracy among the others 33.3%\n"
    )


# ---------------------------------------------------------------- prompt formats
def test_prompt_family_detection():
    assert detect_family({"model_type": "qwen2"}, set()) == "qwen"
    assert detect_family({"model_type": "llama"}, {"<|start_header_id|>"}) == "llama"
    assert detect_family({"model_type": "llama"}, {"<｜begin▁of▁sentence｜>"}) == "deepseek"
    assert (
        detect_family({"model_type": "llama"}, set(), "/ckpt/deepseek-math-7b-base") == "deepseek"
    )
    assert detect_family({"model_type": "llama"}, {"<|im_start|>"}) == "qwen"  # SmolLM2 (ChatML)
    assert detect_family({"model_type": "gpt2"}, set()) == "raw"
    assert resolve_family("llama-base-boxed-with-bos") == "llama"
    with pytest.raises(ConfigError, match="unknown prompt format"):
        resolve_family("alpaca")


def test_paper_math_prompt_formats():
    q = "What is {x}?"  # braces in the question must survive
    assert render("math", "qwen", q) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is {x}?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("math", "deepseek", q) == (
        "User: What is {x}?\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
        "\n\nAssistant:"
    )
    assert render("math", "llama", q).startswith("<|begin_of_text|><|start_header_id|>system")
    with pytest.raises(ConfigError, match="figfont task has no 'deepseek' prompt format"):
        render("figfont", "deepseek", q)
