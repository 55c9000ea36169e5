"""Prompt formats: a family (``qwen`` ChatML, ``llama`` Llama-3 headers with BOS,
``deepseek`` User/Assistant, ``raw``) decides the markup, a task kind the instruction;
``TEMPLATES[kind][family]`` has one ``{input}`` slot. The paper's format names are aliases."""

from __future__ import annotations

from collections.abc import Container

from probsft_megatron.errors import ConfigError
from probsft_megatron.figfont import LLAMA_TEMPLATE as FIGFONT_LLAMA
from probsft_megatron.figfont import QWEN_TEMPLATE as FIGFONT_QWEN

FAMILIES = ("qwen", "llama", "deepseek", "raw")
ALIASES = {"qwen-boxed": "qwen", "llama-base-boxed-with-bos": "llama", "deepseek-math": "deepseek"}

_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_CHOICE_INSTRUCTION = (
    "Answer the multiple-choice question. Reason briefly, then put the letter of the "
    "correct option within \\boxed{}."
)


def _every_family(user: str, system: str | None) -> dict[str, str]:
    chatml = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    llama = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return {
        "qwen": f"{chatml}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
        "llama": f"<|begin_of_text|>{llama}<|start_header_id|>user<|end_header_id|>\n\n{user}"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "deepseek": f"User: {user}\n\nAssistant:",
        "raw": user,
    }


_SYSTEM = "You are a helpful assistant."
TEMPLATES: dict[str, dict[str, str]] = {
    "math": _every_family("{input}\n" + _BOXED_INSTRUCTION, _SYSTEM),
    "figfont": {"qwen": FIGFONT_QWEN, "llama": FIGFONT_LLAMA},
    "choice": _every_family(_CHOICE_INSTRUCTION + "\n\n{input}", _SYSTEM),
    "custom": _every_family("{input}", None),
}

STOP_STRINGS = (  # every family's end-of-turn markers
    "</s> <|im_end|> <|endoftext|> <|eot_id|> <|end_of_text|> <｜end▁of▁sentence｜>".split()
)


def resolve_family(name: str) -> str:
    """A family name from a family or one of the paper's format names."""
    family = ALIASES.get(name, name)
    if family not in FAMILIES:
        valid = ", ".join([*FAMILIES, *ALIASES])
        raise ConfigError(f"unknown prompt format {name!r}; choose one of {valid}")
    return family


def detect_family(model_config: dict, vocab: Container[str], model_path: str = "") -> str:
    """The prompt family of a model: from its ``model_type`` (Qwen), else its vocabulary's
    markers (DeepSeek, Llama-3, ChatML as in SmolLM2) or "deepseek" in its path, else raw."""
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
