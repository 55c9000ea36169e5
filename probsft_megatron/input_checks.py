"""What a training job's paths point at, checked before any work, one line each."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from probsft_megatron import manifest
from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.model_dir import read_model_config
from probsft_megatron.tokenizers import BUILTIN, TOKENIZER_FILES, tokenizer_folder, tokenizer_spec
from probsft_megatron.typed_yaml import oddity, shown

if TYPE_CHECKING:
    from probsft_megatron.config import DataConfig, TrainJobConfig


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def check_model_dir(
    path: str | os.PathLike, key: str, *, training_checkpoint_ok: bool = True
) -> Path:
    """``path`` if it is an intact Megatron model dir (or training checkpoint), else one line."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(
            f"{key} {folder} does not exist; name a Megatron model dir "
            "(probsft convert hf-to-megatron) or a training checkpoint (RUN/checkpoints/step_N)"
        )
    if not folder.is_dir():
        raise ConfigError(f"{key} {folder} is a file; name a Megatron model dir (a folder)")
    kind = manifest.folder_kind(folder)
    if kind == manifest.TRAINING_RUN:
        steps = manifest.step_folders(folder / "checkpoints")
        example = steps[-1][1] if steps else folder / "checkpoints" / "step_NNNNNNN"
        raise ConfigError(
            f"{key} {folder} is a training run folder, not a model dir; name one of its "
            f"checkpoints, e.g. {example}"
        )
    if kind == manifest.HF_EXPORT or (kind is None and (folder / "config.json").is_file()):
        raise ConfigError(
            f"{key} {folder} is a Hugging Face folder; convert it first (probsft convert "
            f"hf-to-megatron --hf {folder} --out DIR) and name DIR"
        )
    if kind is None:
        raise ConfigError(
            f"{key} {folder} is not a Megatron model dir (no model_config.json); name a "
            "folder written by probsft convert hf-to-megatron or a training checkpoint"
        )
    if kind == manifest.TRAINING_CHECKPOINT and not training_checkpoint_ok:
        raise ConfigError(
            f"{key} {folder} is a training checkpoint (weights saved with the optimizer "
            "state), which cannot be loaded here yet; continue that run (its train.output_dir) "
            f"or export it and convert the export: probsft convert megatron-to-hf --ckpt "
            f"{folder} --out HF, then probsft convert hf-to-megatron --hf HF --out DIR"
        )
    try:
        manifest.verify(folder)
    except CheckpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return folder


def check_tokenizer(spec: str, key: str) -> None:
    """``spec`` is a built-in tokenizer or a folder with tokenizer files, else one line."""
    folder = tokenizer_folder(spec)
    if folder is None:
        return
    if not folder.exists():
        raise ConfigError(
            f"{key} {spec} does not exist; name a folder with tokenizer files "
            f"({', '.join(TOKENIZER_FILES[:2])}) or one of {', '.join(BUILTIN)}"
        )
    if not folder.is_dir():
        raise ConfigError(f"{key} {spec} is a file; name the folder that holds the tokenizer")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{key} {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "name a folder that has them, or smollm2"
        )


def tokenizer_vocab_size(folder: str | os.PathLike) -> int | None:
    """The number of token ids in ``folder``'s ``tokenizer.json`` (None without one)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid JSON; save the tokenizer there again") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t.get("id", -1) for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    return max((i + 1 for i in ids if isinstance(i, int)), default=None)


def check_vocab_fits(tokenizer: str, vocab_size: int, key: str) -> None:
    """Refuse a tokenizer with more ids than the model's vocabulary (if it tells its size)."""
    folder = tokenizer_folder(tokenizer)
    size = BUILTIN.get(tokenizer) if folder is None else tokenizer_vocab_size(folder)
    if size is not None and size > vocab_size:
        raise ConfigError(
            f"{key} {tokenizer} has {size} token ids but the model's vocabulary has "
            f"{vocab_size}; use the tokenizer the model was trained with"
        )


def check_data_files(data: DataConfig, key: str = "data.train_files") -> None:
    """Every data file exists, is a non-empty file, and has a format the loader reads."""
    data.validate()
    if data.source != "file":
        return
    for name in data.train_files:
        path = Path(name)
        if path.is_symlink() and not path.exists():
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ConfigError(
                        f"{key}: {shown(str(path))} is a symbolic link loop (following it leads "
                        "back to a link in the loop, never to a file); point the link at the "
                        "data file, or name the file itself"
                    ) from None
            raise ConfigError(
                f"{key}: {shown(str(path))} is a symbolic link to {shown(os.readlink(path))}, "
                "which does not exist; point the link at the data file, or name the file itself"
            )
        if not path.exists():
            raise ConfigError(
                f"{key}: {shown(str(path))} does not exist{oddity(str(path))}; name an existing "
                "data file"
            )
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
            if found:
                raise ConfigError(
                    f"{key}: {path} is a folder, not a data file; list its files instead, "
                    f"e.g. {path / found[0]}"
                )
            raise ConfigError(
                f"{key}: {path} is a folder with no .jsonl/.json/.parquet file in it; list "
                "data files"
            )
        if path.stat().st_size == 0:
            raise ConfigError(f"{key}: {path} is empty; it holds no records")
        if data.format in ("auto", "numina", "m23k") and path.suffix.lower() not in DATA_SUFFIXES:
            raise ConfigError(
                f"{key}: cannot tell the format of {path} from its extension; rename it to "
                ".jsonl/.json/.parquet or set data.format=jsonl or data.format=parquet"
            )


def count_records(data: DataConfig) -> int | None:
    """Records the data gives (at most ``data.num_samples``), None when not cheaply told."""
    if data.source != "file":
        return data.num_samples
    total = 0
    for name in data.train_files:
        path = Path(name).expanduser()
        try:
            if path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            elif path.suffix.lower() == ".json":
                rows = json.loads(path.read_text(encoding="utf-8"))
                total += len(rows) if isinstance(rows, list) else 1
            else:
                with open(path, "rb") as f:
                    total += sum(1 for line in f if line.strip())
        except Exception:  # unreadable here: the data checks and the loader say why
            return None
        if data.num_samples is not None and total >= data.num_samples:
            return data.num_samples
    return total


def planned_length(cfg: TrainJobConfig) -> str:
    """The run's length as the dry run states it; ConfigError if max_steps exceeds the data."""
    t = cfg.train
    records = count_records(cfg.data)
    if records is None:
        steps = f"train.max_steps={t.max_steps}" if t.max_steps else "every step"
        return (
            f"length: {steps} of train.epochs={t.epochs}; the data's size is known once it is "
            "generated and tokenized (the run's first line states steps, epochs and examples)"
        )
    per_epoch = records // t.global_batch_size
    bound = per_epoch * t.epochs
    shape = (
        f"train.epochs={t.epochs} over at most {records} examples, train.global_batch_size="
        f"{t.global_batch_size}: at most {per_epoch} steps per epoch"
    )
    if per_epoch == 0:  # the data's own check says that (fewer than one global batch)
        return f"length: no full step: {shape}"
    if t.max_steps is not None and t.max_steps > bound:
        epochs = math.ceil(t.max_steps / max(per_epoch, 1))
        raise ConfigError(
            f"train.max_steps={t.max_steps} is more than the at most {bound} steps the data "
            f"gives ({shape}); set train.epochs={epochs} or more to train {t.max_steps} steps, "
            f"or train.max_steps={bound} or lower (null: every step of the epochs)"
        )
    if t.max_steps is not None and t.max_steps < bound:
        return f"length: {t.max_steps} steps (train.max_steps; the schedule spans all): {shape}"
    return f"length: at most {bound} steps: {shape}"


def check_files(cfg: TrainJobConfig, *, resume: bool = True) -> None:
    """Every path the job reads or writes, and (``resume``) the checkpoint a resume loads."""
    init = cfg.init
    if init.checkpoint is not None:
        check_model_dir(init.checkpoint, "init.checkpoint", training_checkpoint_ok=False)
    if init.tokenizer is not None:
        check_tokenizer(init.tokenizer, "init.tokenizer")
    elif init.checkpoint is not None:
        if not any(Path(init.checkpoint, "hf", f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"init.checkpoint {init.checkpoint} has no tokenizer (no tokenizer files in "
                "its hf/ folder); set init.tokenizer to a tokenizer folder or smollm2"
            )
    tokenizer = tokenizer_spec(init)
    if tokenizer is not None:
        model = cfg.model if init.checkpoint is None else read_model_config(init.checkpoint)
        vocab = model.vocab_size
        check_vocab_fits(tokenizer, vocab, "init.tokenizer" if init.tokenizer else "the tokenizer")
    check_data_files(cfg.data)
    if cfg.data.val_files:
        val = dataclasses.replace(cfg.data, source="file", train_files=cfg.data.val_files)
        check_data_files(val, key="data.val_files")
    inputs = [("init.checkpoint", init.checkpoint)]
    if init.tokenizer not in (None, *BUILTIN):
        inputs.append(("init.tokenizer", init.tokenizer))
    if cfg.data.source == "file":
        inputs += [("data.train_files", f) for f in cfg.data.train_files]
    inputs += [("data.val_files", f) for f in cfg.data.val_files]
    out = cfg.train.output_dir
    if manifest.check_output(out, flag="train.output_dir", inputs=inputs):
        if manifest.folder_kind(out) != manifest.TRAINING_RUN and any(Path(out).iterdir()):
            raise ConfigError(
                f"train.output_dir {out} already exists and holds {manifest.describe(out)}, not "
                "a training run; a run writes config.json, metrics.jsonl and checkpoints/ there: "
                "choose another train.output_dir"
            )
    if resume and cfg.train.resume:
        root = Path(out) / "checkpoints"
        manifest.newest_intact(root, skip_damaged=cfg.train.resume_skip_damaged)
