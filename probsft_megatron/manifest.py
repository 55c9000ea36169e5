"""What a folder written by probsft holds (``probsft_manifest.json``: each file's size and
CRC-32), the checkpoint a run resumes from, and the guard that keeps an output away from its
inputs. Standard library only (layer 0)."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.fileio import atomic_write_json

MANIFEST_FILE = "probsft_manifest.json"
FORMAT = "probsft-manifest"
FORMAT_VERSION = 1
FULL_CHECKSUM_BYTES = 64 * 2**20
"""Files up to this size get a CRC-32 of all their bytes."""
SAMPLE_BYTES = 2**20
"""Larger files get a CRC-32 of their first and last this many bytes (and their size)."""

TRAINING_CHECKPOINT = "training-checkpoint"
MODEL_DIR = "megatron-model"
HF_EXPORT = "hf-export"
TRAINING_RUN = "training-run"
KIND_NAMES = {
    TRAINING_CHECKPOINT: "training checkpoint",
    MODEL_DIR: "Megatron model dir",
    HF_EXPORT: "Hugging Face export",
    TRAINING_RUN: "training run folder",
}

LEGACY_EXPORT_FILE = "probsft_export.json"  # written by the launcher's export step
_CHUNK = 8 * 2**20

logger = logging.getLogger(__name__)


def step_name(step: int) -> str:
    """``step_0000040``: the folder of a training checkpoint."""
    return f"step_{step:07d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a ``step_NNNNNNN`` folder, else None."""
    m = re.fullmatch(r"step_(\d{7})", Path(path).name)
    return int(m.group(1)) if m else None


def step_folders(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_NNNNNNN`` folder renamed into place under ``ckpt_root``,
    oldest first, intact or not (a resume names what a damaged one lacks, never skips it)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((step_of(p), p) for p in root.iterdir() if step_of(p) is not None and p.is_dir())


def _entry(path: Path) -> dict[str, Any]:
    """A file's manifest entry: its size and CRC-32 (of all of it, or of its ends)."""
    size, crc = path.stat().st_size, 0
    with open(path, "rb") as f:
        if size <= FULL_CHECKSUM_BYTES:
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
            return {"size": size, "crc32": f"{crc:08x}", "crc32_of": "all"}
        crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
        f.seek(size - SAMPLE_BYTES)
        crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return {"size": size, "crc32": f"{crc:08x}", "crc32_of": "ends"}


def write_manifest(folder: str | os.PathLike, kind: str, **info: Any) -> Path:
    """List every file under ``folder`` in its manifest, written atomically as the folder's
    last file; ``info`` (e.g. ``step=40``) is recorded next to the kind."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST_FILE)
    files = {path.relative_to(folder).as_posix(): _entry(path) for path in paths}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **info,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    return atomic_write_json(folder / MANIFEST_FILE, manifest)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none; CheckpointError when it is unreadable."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"{path} is damaged (not a readable manifest); delete the folder and write it again"
        )
    return manifest


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """The first problem of a training checkpoint or model dir (no manifest, then missing
    files, sizes, checksums), or None when it is intact."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if manifest is None:
        return (
            f"it has no {MANIFEST_FILE} (it was not written by probsft, or its write did not "
            "finish)"
        )
    for name, entry in manifest["files"].items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        size = (folder / name).stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, its manifest lists {entry.get('size')}"
    for name, entry in manifest["files"].items():
        if _entry(folder / name)["crc32"] != entry.get("crc32"):
            return f"{name} does not match its checksum (changed since it was written)"
    return None


def newest_intact(
    ckpt_root: str | os.PathLike, *, skip_damaged: bool, resuming: bool = True
) -> Path | None:
    """The newest intact checkpoint under ``ckpt_root``, or None. A newer damaged one is a
    CheckpointError (with ``skip_damaged``: a warning); all damaged while ``resuming``: an error."""
    root = Path(ckpt_root)
    steps = step_folders(root)
    for step, path in reversed(steps):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        if not skip_damaged:
            raise CheckpointError(damaged_message(path, damage, resuming=resuming))
        why = " (train.resume_skip_damaged=true)" if resuming else ""
        logger.warning("DAMAGED checkpoint step %d passed over%s: %s: %s", step, why, path, damage)
    if steps and resuming:
        raise CheckpointError(
            f"every checkpoint under {root} is damaged; delete them (the run then starts from "
            "its initial weights) or set train.resume=false"
        )
    return None


def damaged_message(path: str | os.PathLike, damage: str, *, resuming: bool = False) -> str:
    """One line: which checkpoint (step) is damaged, which file, and the fix (``resuming``:
    resume from the newest intact step; otherwise use the previous step instead)."""
    path = Path(path)
    step = step_of(path)
    if step is None:  # a converted model dir or an export
        redo = "convert it again (probsft convert hf-to-megatron ... --overwrite)"
        if folder_kind(path) == HF_EXPORT:
            redo = "export it again (probsft convert megatron-to-hf ... --overwrite)"
        return f"{path} is damaged: {damage}; {redo}"
    older = reversed([p for s, p in step_folders(path.parent) if s < step])
    previous = next((p for p in older if checkpoint_damage(p) is None), None)
    head = f"checkpoint step {step} ({path}) is damaged: {damage}"
    if resuming and previous is None:
        return (
            f"{head}; no earlier intact checkpoint to resume from: delete {path} (the run "
            "then starts from its initial weights) or set train.resume=false"
        )
    if resuming:
        return (
            f"{head}; resume from step {step_of(previous)}, the newest intact one, with "
            f"train.resume_skip_damaged=true, or delete {path}"
        )
    if previous is None:
        return f"{head}; the run has no earlier intact checkpoint: delete it and train again"
    return f"{head}; use the previous step {previous} instead, or delete the damaged one"


def verify(path: str | os.PathLike, *, resuming: bool = False) -> bool:
    """Check a checkpoint, model dir or export against its manifest; True when verified,
    False for a Hugging Face folder without one (it may come from elsewhere). A Megatron
    model dir or checkpoint without one is damaged (CheckpointError, :func:`damaged_message`)."""
    path = Path(path)
    megatron = (path / "model_config.json").is_file() or step_of(path) is not None
    if not megatron and not (path / MANIFEST_FILE).is_file():
        return False
    damage = checkpoint_damage(path)
    if damage is not None:
        raise CheckpointError(damaged_message(path, damage, resuming=resuming))
    return True


def folder_kind(path: str | os.PathLike) -> str | None:
    """What probsft wrote into ``path`` (one of :data:`KIND_NAMES`), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        manifest = None
    if manifest is not None and manifest.get("kind") in KIND_NAMES:
        return manifest["kind"]
    if (path / "model_config.json").is_file():
        return TRAINING_CHECKPOINT if (path / "train_state.json").is_file() else MODEL_DIR
    # a run's folder: what a run writes when it starts, or a config.json with the job's sections
    names = ("checkpoints", "metrics.jsonl", "summary.json", "run.lock")
    if any((path / name).exists() for name in names):
        return TRAINING_RUN
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    job = isinstance(config, dict) and {"train", "optim", "model"} <= set(config)
    return TRAINING_RUN if job else None


def describe(path: str | os.PathLike) -> str:
    """A few words on what ``path`` holds, for messages."""
    kind = folder_kind(path)
    if kind is not None:
        return f"a {KIND_NAMES[kind]}"
    return "a Hugging Face folder" if (Path(path) / "config.json").is_file() else "other files"


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def overlap(out: str | os.PathLike, inp: str | os.PathLike) -> str | None:
    """How ``out`` overlaps ``inp``: ``"is"``, ``"contains"``, ``"lies inside"``, or None."""
    o, i = _absolute(out), _absolute(inp)
    if o == i:
        return "is"
    if i.is_relative_to(o):
        return "contains"
    if o.is_relative_to(i):
        return "lies inside"
    return None


def writable_folder(path: str | os.PathLike) -> str | None:
    """Why a folder cannot be created or written at ``path`` (a phrase), or None."""
    probe = _absolute(path)
    if probe.exists() and not probe.is_dir():
        return "is a file, not a folder"
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {probe} is a file"
    with contextlib.suppress(OSError):  # root passes os.access: creating shows a read-only mount
        if os.access(probe, os.W_OK | os.X_OK):
            os.rmdir(tempfile.mkdtemp(prefix=".probsft-write-check-", dir=probe))
            return None
    return f"is not writable (nothing can be created in {probe})"


_DESTROYS = ": writing it would destroy the input (with or without --overwrite)"
_OVERLAP_FIXES = {
    "is": _DESTROYS + "; choose another {flag}",
    "contains": _DESTROYS + "; choose a {flag} outside it",
    "lies inside": "; choose a {flag} outside it",
}


def check_output(
    out: str | os.PathLike,
    *,
    flag: str,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    kind: str | None = None,
    overwrite: bool = False,
) -> bool:
    """Refuse (one-line ConfigError) an ``out`` that is, contains or lies inside one of the
    ``(flag, path)`` ``inputs``, or cannot be written; with ``kind`` (a folder replaced as a
    whole) an existing non-empty ``out`` only with ``overwrite`` and of that kind. Returns
    whether ``out`` exists and may be replaced."""
    for in_flag, inp in inputs:
        how = None if inp is None else overlap(out, inp)
        if how is not None:
            fix = _OVERLAP_FIXES[how].format(flag=flag)
            raise ConfigError(f"{flag} {out} {how} the input {in_flag} {inp}{fix}")
    problem = writable_folder(out)
    if problem is not None:
        raise ConfigError(f"{flag} {out} {problem}; name a folder that can be written")
    target = _absolute(out)
    if kind is None or not target.exists() or not any(target.iterdir()):
        return target.exists()
    name = KIND_NAMES[kind]
    if folder_kind(target) != kind:
        raise ConfigError(
            f"{flag} {out} already exists and holds {describe(target)}, not a {name} written "
            f"by probsft; --overwrite replaces only a previous {name}: choose another {flag} "
            "or remove the folder yourself"
        )
    if not overwrite:
        raise ConfigError(
            f"{flag} {out} already holds a {name}; pass --overwrite to replace it, or choose "
            f"another {flag}"
        )
    return True
