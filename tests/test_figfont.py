"""The generated figlet-font task: paper configuration, split layout, determinism."""

from __future__ import annotations

import pyfiglet
import pytest

from probsft_megatron.errors import ConfigError
from probsft_megatron.figfont import SPLITS, SYSTEM_PROMPT, figfont_records


def test_split_layout_matches_the_paper():
    assert SPLITS == {"train": (0, 40_000), "test": (40_000, 5_000)}
    assert [r["index"] for r in figfont_records("train", n=3)] == [0, 1, 2]
    assert [r["index"] for r in figfont_records("test", n=3)] == [40_000, 40_001, 40_002]


def test_records_are_deterministic_and_well_formed():
    first = figfont_records("test", n=6)
    assert figfont_records("test", n=6) == first
    assert figfont_records("test", n=2) == first[:2]
    for r in first:
        word = r["response"]
        assert 2 <= len(word) <= 5 and word.isalpha() and word.isupper()
        # the rendering is the word with spaces between letters, in the recorded font
        assert pyfiglet.figlet_format(" ".join(word), font=r["font"]) in r["prompt"]
        assert r["qwen_prompt"].startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
        assert r["qwen_prompt"].endswith(r["prompt"] + "\n<|im_end|>\n<|im_start|>assistant\n")
        assert r["llama_prompt"].startswith(
            "<|begin_of_text|><|begin_of_text|><|start_header_id|>system"
        )
    # a different generator seed gives different items (negative control for the seed)
    assert [r["prompt"] for r in figfont_records("test", n=6, seed=7)] != [
        r["prompt"] for r in first
    ]


def test_bad_split_or_count():
    with pytest.raises(ConfigError, match="unknown figfont split 'val'"):
        figfont_records("val")
    with pytest.raises(ConfigError):
        figfont_records("train", n=-1)
    assert figfont_records("train", n=0) == []
