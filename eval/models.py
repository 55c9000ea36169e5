"""Model folders for evaluation: validation of Hugging Face checkpoints.

The embedded SmolLM2-135M-Instruct demo model and the probsft cache folder live in
:mod:`probsft_megatron.embedded` (below training, conversion and evaluation alike); they are
re-exported here under their earlier names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from probsft_megatron.embedded import (  # noqa: F401  (re-exported)
    SMOLLM2_GGUF,
    default_cache_dir,
    materialize_smollm2,
    smollm2_gguf_path,
)
from probsft_megatron.errors import CheckpointError

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def check_hf_model_dir(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is a Hugging Face checkpoint folder (config.json + weights).

    Raises:
        CheckpointError: one sentence naming the folder and what is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {folder} does not exist; pass a Hugging Face checkpoint folder"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint; "
            "export one with `probsft convert` or point --model at a folder saved by "
            "save_pretrained"
        )
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise CheckpointError(
            f"{folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
            "the checkpoint is incomplete"
        )
    return folder


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The parsed config.json of a Hugging Face checkpoint folder (not a Megatron model dir's
    ``model_config.json``: :func:`probsft_megatron.model_dir.read_model_config`)."""
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        return json.load(f)
