"""Prompt formats per model family.

A *family* decides the chat markup; a task *kind* (math, figfont, choice, custom) decides
the instruction. ``TEMPLATES[kind][family]`` is a string with one ``{input}`` slot.

Families and the paper's names for the math formats:

* ``qwen``  - ChatML (``<|im_start|>``); math: ``qwen-boxed`` (Qwen2.5 / Qwen2.5-Math).
* ``llama`` - Llama-3 headers with an explicit ``<|begin_of_text|>``; math:
  ``llama-base-boxed-with-bos`` (Llama-3.x base models).
* ``deepseek`` - ``User: ... Assistant:``; math: ``deepseek-math`` (deepseek-math-7b-base).
* ``raw`` - no markup: the instruction text only, for models of other families.

The family is detected from the model (:func:`detect_family`) and can be overridden with
``--prompt-format`` (a family or one of the paper's math format names).
"""

from __future__ import annotations

from collections.abc import Container

from probsft_megatron.errors import ConfigError
from probsft_megatron.figfont import LLAMA_TEMPLATE as FIGFONT_LLAMA
from probsft_megatron.figfont import QWEN_TEMPLATE as FIGFONT_QWEN

FAMILIES = ("qwen", "llama", "deepseek", "raw")
ALIASES = {
    "qwen-boxed": "qwen",
    "llama-base-boxed-with-bos": "llama",
    "deepseek-math": "deepseek",
}

_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_CHOICE_INSTRUCTION = (
    "Answer the multiple-choice question. Reason briefly, then put the letter of the "
    "correct option within \\boxed{}."
)


def _chatml(user: str, system: str | None) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _llama3(user: str, system: str | None) -> str:
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return (
        f"<|begin_of_text|>{head}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _deepseek(user: str) -> str:
    return f"User: {user}\n\nAssistant:"


_MATH_USER = "{input}\n" + _BOXED_INSTRUCTION
_CHOICE_USER = _CHOICE_INSTRUCTION + "\n\n{input}"

TEMPLATES: dict[str, dict[str, str]] = {
    "math": {
        "qwen": _chatml(_MATH_USER, "You are a helpful assistant."),
        "llama": _llama3(_MATH_USER, "You are a helpful assistant."),
        "deepseek": _deepseek(_MATH_USER),
        "raw": _MATH_USER,
    },
    "figfont": {"qwen": FIGFONT_QWEN, "llama": FIGFONT_LLAMA},
    "choice": {
        "qwen": _chatml(_CHOICE_USER, "You are a helpful assistant."),
        "llama": _llama3(_CHOICE_USER, "You are a helpful assistant."),
        "deepseek": _deepseek(_CHOICE_USER),
        "raw": _CHOICE_USER,
    },
    "custom": {
        "qwen": _chatml("{input}", None),
        "llama": _llama3("{input}", None),
        "deepseek": _deepseek("{input}"),
        "raw": "{input}",
    },
}

STOP_STRINGS = [
    "</s>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
]
"""End-of-turn markers of every family; generation stops at the first one."""


def resolve_family(name: str) -> str:
    """A family name from a family or one of the paper's format names."""
    family = ALIASES.get(name, name)
    if family not in FAMILIES:
        valid = ", ".join([*FAMILIES, *ALIASES])
        raise ConfigError(f"unknown prompt format {name!r}; choose one of {valid}")
    return family


def detect_family(model_config: dict, vocab: Container[str], model_path: str = "") -> str:
    """Pick the prompt family from a model's config, tokenizer vocabulary and path.

    Qwen2/Qwen3 model types -> ``qwen``; a DeepSeek tokenizer (``<｜begin▁of▁sentence｜>``)
    or "deepseek" in the path -> ``deepseek``; a Llama-3 vocabulary
    (``<|start_header_id|>``) -> ``llama``; any other ChatML vocabulary (``<|im_start|>``,
    e.g. SmolLM2) -> ``qwen``; otherwise ``raw``.
    """
    model_type = str(model_config.get("model_type", "")).lower()
    if model_type.startswith("qwen"):
        return "qwen"
    if "<｜begin▁of▁sentence｜>" in vocab or "deepseek" in model_path.lower():
        return "deepseek"
    if "<|start_header_id|>" in vocab:
        return "llama"
    if "<|im_start|>" in vocab:
        return "qwen"
    return "raw"


def render(kind: str, family: str, text: str) -> str:
    """The full prompt for task kind ``kind`` in ``family`` around the user ``text``."""
    options = TEMPLATES[kind]
    if family not in options:
        raise ConfigError(
            f"the {kind} task has no {family!r} prompt format; pass --prompt-format with one of "
            f"{', '.join(options)}"
        )
    return options[family].replace("{input}", text)
