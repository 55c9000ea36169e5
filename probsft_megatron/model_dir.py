"""The on-disk Megatron model dir: ``model_config.json``, ``weights/`` and the ``hf/`` template."""

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
# files of an HF folder that hold weights (or their index): never copied into hf/
WEIGHT_FILE_SUFFIXES = tuple(
    ".safetensors .bin .pt .pth .ckpt .h5 .msgpack .gguf .index.json".split()
)


@dataclass(frozen=True)
class ModelDir:
    """A complete Megatron model directory."""

    path: Path
    model: ModelConfig
    dtype: str | None  # as recorded by the writer; the checkpoint metadata is authoritative
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_DIR

    @property
    def hf(self) -> Path | None:
        """The Hugging Face template folder, or None when the directory has none."""
        hf = self.path / HF_DIR
        return hf if (hf / "config.json").is_file() else None


def read_model_dir(path: str | os.PathLike) -> ModelDir:
    """Open a Megatron model directory; CheckpointError (one line) when it is incomplete."""
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
            f"{cfg_file} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
            f"this version reads {FORMAT!r} up to version {FORMAT_VERSION}"
        )
    weights = path / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{path} has no torch_dist weights ({weights}/metadata.json missing)")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f'{cfg_file} has no "model" section')
    model = ModelConfig(**meta["model"])
    return ModelDir(path, model, (meta.get("weights") or {}).get("dtype"), meta.get("source") or {})


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a Megatron model dir (:func:`read_model_dir`)."""
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


def copy_hf_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy an HF folder's non-weight top-level files."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_FILE_SUFFIXES):
            shutil.copy2(f, Path(dst, f.name))


def staging_path(out_dir: str | os.PathLike) -> Path:
    """The hidden sibling that ``out_dir`` is written into before it is renamed."""
    out = Path(out_dir).absolute()
    return out.parent / f".{out.name}.partial"


def begin_staging(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """An empty staging folder for ``out_dir`` (one rank); an existing out_dir needs overwrite."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"{out} already exists; choose another output folder or allow overwriting (--overwrite)"
        )
    staging = staging_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_staging(staging: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Move a completed staging directory to ``out_dir`` (replacing an existing one)."""
    out = Path(out_dir).absolute()
    old = out.parent / f".{out.name}.old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@contextmanager
def staged(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields ``out_dir``'s staging folder (one process), renamed on success, else removed."""
    staging = begin_staging(out_dir, overwrite=overwrite)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_staging(staging, out_dir)
