"""The figlet-font task (the paper's settings: reasoning-gym's ``figlet_font``, words of 2-5
letters spaced out, seed 42), generated offline; item ``i`` depends only on ``seed + i``, so
the splits are index ranges of one generator."""

from __future__ import annotations

from functools import lru_cache

from probsft_megatron.errors import ConfigError

# split -> (first generator index, number of items)
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 40_000), "test": (40_000, 5_000)}

SYSTEM_PROMPT = (
    "You are an expert at decoding Figlet Font ASCII art. When given Figlet Font text, "
    "identify the word it represents and output only that without any explanations or "
    "additional text."
)
QWEN_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "<|im_start|>user\n{input}\n<|im_end|>\n<|im_start|>assistant\n"
)
LLAMA_TEMPLATE = (
    "<|begin_of_text|><|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    + SYSTEM_PROMPT
    + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@lru_cache(maxsize=4)
def _generator(seed: int):
    import reasoning_gym

    return reasoning_gym.create_dataset(
        "figlet_font",
        min_word_len=2,
        max_word_len=5,
        space_letters=True,
        seed=seed,
        size=sum(SPLITS["test"]),
    )


def figfont_records(split: str, n: int | None = None, seed: int = 42) -> list[dict]:
    """The first ``n`` (None: all) records of ``split``: ``prompt``, ``response`` (the word),
    the chat-formatted ``qwen_prompt`` and ``llama_prompt``, ``index`` and ``font``."""
    if split not in SPLITS:
        raise ConfigError(f"unknown figfont split {split!r}; choose one of {sorted(SPLITS)}")
    start, size = SPLITS[split]
    if n is not None:
        if n < 0:
            raise ConfigError(f"figfont record count must be >= 0, got {n}")
        size = min(size, n)
    dataset = _generator(seed)
    return [
        {
            "prompt": item["question"],
            "response": item["answer"],
            "qwen_prompt": QWEN_TEMPLATE.format(input=item["question"]),
            "llama_prompt": LLAMA_TEMPLATE.format(input=item["question"]),
            "index": index,
            "font": item["metadata"]["font"],
        }
        for index in range(start, start + size)
        for item in [dataset[index]]
    ]
