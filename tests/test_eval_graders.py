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
    get_grader,
    grade_choice,
    grade_exact,
    grade_jaro_winkler,
    grade_math,
    jaro_winkler,
)
from probsft_megatron.eval.metrics import default_ks, pass_at_k, summarize
from probsft_megatron.eval.prompts import detect_family, render, resolve_family


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
        # no boxed answer: extracted None, graded wrong even if the number appears
        ("The answer is 4.", "4", None, False),
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
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


# ---------------------------------------------------------------- prompt formats
def test_prompt_family_detection():
    assert detect_family({"model_type": "qwen2"}, set()) == "qwen"
    assert detect_family({"model_type": "llama"}, {"<|start_header_id|>"}) == "llama"
    assert detect_family({"model_type": "llama"}, {"<｜begin▁of▁sentence｜>"}) == "deepseek"
    assert detect_family({"model_type": "llama"}, set(), "/ckpt/deepseek-math-7b-base") == "deepseek"
    assert detect_family({"model_type": "llama"}, {"<|im_start|>"}) == "qwen"  # SmolLM2 (ChatML)
    assert detect_family({"model_type": "gpt2"}, set()) == "raw"
    assert resolve_family("llama-base-boxed-with-bos") == "llama"
    with pytest.raises(ConfigError, match="unknown prompt format"):
        resolve_family("alpaca")


def test_paper_math_prompt_formats():
    q = "What is {x}?"  # braces in the question must survive
    assert render("math", "qwen", q) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is {x}?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("math", "deepseek", q) == (
        "User: What is {x}?\nPlease reason step by step, and put your final answer within \\boxed{}."
        "\n\nAssistant:"
    )
    assert render("math", "llama", q).startswith("<|begin_of_text|><|start_header_id|>system")
    with pytest.raises(ConfigError, match="figfont task has no 'deepseek' prompt format"):
        render("figfont", "deepseek", q)
