"""The on-disk layout of a Megatron model directory, shared by conversion, training and probing.

Used below training, probing and conversion alike (``probsft_megatron.converters.layout``
re-exports it for the converters), so none of them imports another to read a model dir.
A *Megatron model dir* is::

    <dir>/
      model_config.json   {"format": "probsft-megatron-model", "format_version": 1,
                           "model": <ModelConfig dict>, "weights": {"format": "torch_dist",
                           "dtype": "bfloat16"}, "source": {...free-form provenance...}}
      weights/            megatron dist_checkpointing (torch_dist) model weights; any TP/PP
                          layout loads them (resharded on load), e.g. with
                          probsft_megatron.runtime.load_model_weights(model, dir / "weights")
      hf/                 the source checkpoint's config.json, generation_config.json and
                          tokenizer files: the template for exporting back to Hugging Face

Only ``model`` is required when reading (``format`` and ``weights`` default to the values
above), so a writer may add its own top-level keys.

Writers never leave a half-written directory under the final name: everything is written
into :func:`staging_path` (a hidden sibling) and renamed when complete. In one process use
:func:`staged`; in a multi-rank job, rank 0 calls :func:`begin_staging`, every rank saves
its weight shards into ``staging / WEIGHTS_DIR``, and after a barrier rank 0 writes
:func:`write_model_config` (and :func:`copy_hf_files`) and calls :func:`commit_staging`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron.config import ModelConfig
from probsft_megatron.errors import CheckpointError

FORMAT = "probsft-megatron-model"
FORMAT_VERSION = 1
MODEL_CONFIG_FILE = "model_config.json"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"
WEIGHT_FILE_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".index.json",
)
"""Files of an HF folder that hold weights (or their index): never copied into ``hf/``."""


@dataclass(frozen=True)
class ModelDir:
    """A complete Megatron model directory (see the module docstring)."""

    path: Path
    model: ModelConfig
    dtype: str | None  # as recorded by the writer; the checkpoint metadata is authoritative
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        """The torch_dist checkpoint folder."""
        return self.path / WEIGHTS_DIR

    @property
    def hf(self) -> Path | None:
        """The Hugging Face template folder, or None when the directory has none."""
        hf = self.path / HF_DIR
        return hf if (hf / "config.json").is_file() else None


def read_model_dir(path: str | os.PathLike) -> ModelDir:
    """Open a Megatron model directory, checking that it is complete.

    Raises:
        CheckpointError: one line naming the folder and what is missing or wrong.
    """
    path = Path(path)
    cfg_file = path / MODEL_CONFIG_FILE
    if not cfg_file.is_file():
        hint = (
            " (it looks like a Hugging Face folder: convert it with "
            "`probsft convert hf-to-megatron`)"
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(
            f"{path} is not a Megatron model directory: no {MODEL_CONFIG_FILE}{hint}"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})") from None
    if meta.get("format", FORMAT) != FORMAT or meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file} has format {meta.get('format')!r} version "
            f"{meta.get('format_version')!r}; this version reads {FORMAT!r} "
            f"up to version {FORMAT_VERSION}"
        )
    weights = path / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{path} has no torch_dist weights ({weights}/metadata.json missing)")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f'{cfg_file} has no "model" section')
    model = ModelConfig.from_dict(meta["model"])
    return ModelDir(path, model, (meta.get("weights") or {}).get("dtype"), meta.get("source") or {})


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` stored in a Megatron model dir (converted or a training
    checkpoint); CheckpointError when the folder is not a complete model dir."""
    return read_model_dir(path).model


def write_model_config(
    path: str | os.PathLike, model: ModelConfig, *, dtype: str, source: dict[str, Any] | None = None
) -> None:
    """Write ``model_config.json`` into the (staging) directory ``path``."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.to_dict(),
        "weights": {"format": "torch_dist", "dtype": dtype},
        "source": source or {},
    }
    Path(path, MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def copy_hf_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy an HF folder's non-weight top-level files (config, tokenizer, generation config).

    Returns the copied file names.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_FILE_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def staging_path(out_dir: str | os.PathLike) -> Path:
    """The hidden sibling that ``out_dir`` is written into before it is renamed."""
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.partial"


def begin_staging(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Create an empty staging directory for ``out_dir`` (call on one rank) and return it.

    A leftover staging directory of an interrupted write is removed.

    Raises:
        CheckpointError: ``out_dir`` exists and ``overwrite`` is False.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"{out} already exists; choose another output folder or allow overwriting (--overwrite)"
        )
    staging = staging_path(out)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_staging(staging: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Move a completed staging directory to ``out_dir`` (replacing an existing one)."""
    out = Path(out_dir).absolute()
    old = out.parent / f".{out.name}.old"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old.exists():
        shutil.rmtree(old)
    return out


@contextmanager
def staged(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write ``out_dir`` in one process: yields the staging folder, renames it on success.

    On an exception the staging folder is removed and ``out_dir`` is left untouched.
    """
    staging = begin_staging(out_dir, overwrite=overwrite)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_staging(staging, out_dir)
