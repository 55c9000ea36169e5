"""The figlet-font task (model-weak end of the capability continuum), generated offline.

Items come from reasoning-gym's ``figlet_font`` generator with the paper's settings:
words of 2-5 letters, letters rendered with spaces between them, generator seed 42.
Item ``i`` depends only on ``seed + i`` (reasoning-gym seeds one ``Random`` per index),
so the splits are index ranges of one generator:

* train: indices ``[0, 40000)``  (40,000 items)
* test:  indices ``[40000, 45000)`` (5,000 items)

Each record carries the raw question (``prompt``), the word (``response``) and the two
chat-formatted prompts the paper trains and evaluates with (``qwen_prompt``,
``llama_prompt``).
"""

from __future__ import annotations

from functools import lru_cache

from probsft_megatron.errors import ConfigError

SPLITS: dict[str, tuple[int, int]] = {"train": (0, 40_000), "test": (40_000, 5_000)}
"""split -> (first generator index, number of items)."""

MIN_WORD_LEN = 2
MAX_WORD_LEN = 5
DEFAULT_SEED = 42

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
    """The reasoning-gym dataset object; its ``size`` is irrelevant to item content."""
    import reasoning_gym

    return reasoning_gym.create_dataset(
        "figlet_font",
        min_word_len=MIN_WORD_LEN,
        max_word_len=MAX_WORD_LEN,
        space_letters=True,
        seed=seed,
        size=sum(SPLITS["test"]),
    )


def figfont_records(split: str, n: int | None = None, seed: int = DEFAULT_SEED) -> list[dict]:
    """Deterministic prompt/response records of one split.

    Args:
        split: ``"train"`` or ``"test"``.
        n: the first ``n`` items of the split (all of it when ``None``).
        seed: generator seed (the paper's data uses 42).

    Returns:
        dicts with keys ``prompt`` (question with the figlet rendering), ``response``
        (the upper-case word), ``qwen_prompt``, ``llama_prompt`` (chat-formatted prompts),
        ``index`` (generator index) and ``font``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown figfont split {split!r}; choose one of {sorted(SPLITS)}")
    start, size = SPLITS[split]
    if n is not None:
        if n < 0:
            raise ConfigError(f"figfont record count must be >= 0, got {n}")
        size = min(size, n)
    dataset = _generator(seed)
    records = []
    for index in range(start, start + size):
        item = dataset[index]
        question = item["question"]
        records.append(
            {
                "prompt": question,
                "response": item["answer"],
                "qwen_prompt": QWEN_TEMPLATE.format(input=question),
                "llama_prompt": LLAMA_TEMPLATE.format(input=question),
                "index": index,
                "font": item["metadata"]["font"],
            }
        )
    return records
