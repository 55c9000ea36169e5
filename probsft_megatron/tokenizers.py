"""The one tokenizer loader: a folder of Hugging Face tokenizer files or ``smollm2`` (offline)."""

from __future__ import annotations

import functools
from pathlib import Path

from probsft_megatron.embedded import smollm2_gguf_path
from probsft_megatron.errors import CheckpointError, ConfigError

BUILTIN = {"smollm2": 49152}  # tokenizers known by name -> their number of token ids
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_spec(init) -> str | None:
    """``init.tokenizer``, else ``init.checkpoint``'s ``hf/`` folder, else None."""
    return init.tokenizer or (str(Path(init.checkpoint) / "hf") if init.checkpoint else None)


def tokenizer_folder(spec: str) -> Path | None:
    """The folder ``spec`` names (a model dir's ``hf/`` if it has none itself); None if built-in."""
    if spec in BUILTIN:
        return None
    folder = Path(spec)
    if (folder / "hf").is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return folder / "hf"
    return folder


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """The tokenizer of ``spec`` (cached; without a pad token it pads with eos); one-line errors."""
    from transformers import AutoTokenizer

    path = tokenizer_folder(spec)
    if path is None:  # smollm2: the embedded GGUF
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    elif not path.is_dir():
        raise ConfigError(
            f"tokenizer {spec!r} is neither a folder nor one of {tuple(BUILTIN)}; "
            "name a folder with tokenizer files (init.tokenizer, --tokenizer)"
        )
    else:
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
