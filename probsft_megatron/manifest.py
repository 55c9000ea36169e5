"""What a folder written by probsft holds, checked later; and the guard that keeps an output
away from its inputs.

**Manifests.** Every training checkpoint, converted model dir and Hugging Face export gets a
``probsft_manifest.json`` written inside the folder before the folder's atomic rename::

    {"format": "probsft-manifest", "format_version": 1, "kind": "training-checkpoint",
     "step": 40, "files": {"weights/__0_0.distcp": {"size": 1048576, "crc32": "1c291ca3",
                                                   "crc32_of": "all"}, ...}}

Every file is listed with its size and a CRC-32: of the whole file up to
:data:`FULL_CHECKSUM_BYTES` (configs, training state, RNG states, metadata and the shards of
small models), of its first and last :data:`SAMPLE_BYTES` above that (``"crc32_of":
"ends"``), so that writing and checking a manifest stays cheap for a 14B model's shards
while a truncated, zeroed-out or half-copied file is still caught. Files a manifest does
not list are ignored (notes a user adds, a launcher's ``probsft_export.json``). A folder
without a manifest was written before manifests existed: it loads unverified.

**Kinds.** :func:`folder_kind` recognises what probsft wrote into a folder (the manifest's
``kind``; for older folders ``model_config.json``, ``train_state.json``,
``probsft_export.json`` or a run's ``checkpoints/``): ``--overwrite`` replaces only a
previous output of the same kind, never an arbitrary folder.

**The output guard.** :func:`check_output` refuses, in one line, an output that is, contains
or lies inside one of the command's inputs (with or without ``--overwrite``), an output
that is a file, and an existing folder of another kind.

Standard library only (layer 0): the config validation, the checkpoints, the converters and
the command line all use it.
"""

from __future__ import annotations

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

STEP_RE = re.compile(r"^step_(\d{7})$")
LEGACY_EXPORT_FILE = "probsft_export.json"  # written by the launcher's export step
_CHUNK = 8 * 2**20

logger = logging.getLogger(__name__)


def step_name(step: int) -> str:
    """``step_0000040``: the folder of a training checkpoint."""
    return f"step_{step:07d}"


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a ``step_NNNNNNN`` folder, else None."""
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_folders(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint folder under ``ckpt_root`` that was renamed into
    place (a write in progress is ``.step_NNNNNNN.partial``), oldest first; intact or not: a
    folder that has lost a file (its ``train_state.json`` too) is still a checkpoint, and
    :func:`checkpoint_damage` names what it lacks, so that a resume never passes over it in
    silence."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir():
            found.append((step, p))
    return sorted(found)


# -- manifests ---------------------------------------------------------------------------------


def _crc(path: Path, size: int) -> tuple[str, str]:
    crc = 0
    with open(path, "rb") as f:
        if size <= FULL_CHECKSUM_BYTES:
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
            return f"{crc:08x}", "all"
        crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
        f.seek(size - SAMPLE_BYTES)
        crc = zlib.crc32(f.read(SAMPLE_BYTES), crc)
    return f"{crc:08x}", "ends"


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE
    )


def write_manifest(folder: str | os.PathLike, kind: str, **info: Any) -> Path:
    """List every file under ``folder`` (sizes and CRC-32s) in its manifest, written atomically
    as the folder's last file; ``info`` (e.g. ``step=40``) is recorded next to the kind."""
    folder = Path(folder)
    files = {}
    for path in _files(folder):
        size = path.stat().st_size
        crc, of = _crc(path, size)
        files[path.relative_to(folder).as_posix()] = {"size": size, "crc32": crc, "crc32_of": of}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **info,
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    return atomic_write_json(folder / MANIFEST_FILE, manifest)


class Damage(str):
    """What is wrong with a folder, as a phrase: ``weights/__0_0.distcp is 1000 bytes, its
    manifest lists 20480``."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when it has none (written before manifests existed).

    Raises:
        CheckpointError: the manifest itself is unreadable.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"{path} is damaged (not a readable manifest); delete the folder and write it "
            "again, or delete only the manifest to load the folder unverified"
        )
    return manifest


def find_damage(folder: str | os.PathLike, manifest: dict | None = None) -> Damage | None:
    """The first problem of ``folder`` against its manifest (missing files, then sizes, then
    checksums), or None when it is intact or has no manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    if manifest is None:
        return None
    entries = manifest["files"]
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return Damage(f"{name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            return Damage(f"{name} is {size} bytes, its manifest lists {entry.get('size')}")
    for name, entry in entries.items():
        crc, _ = _crc(folder / name, int(entry["size"]))
        if crc != entry.get("crc32"):
            return Damage(f"{name} does not match its checksum (changed since it was written)")
    return None


def json_damage(path: Path, name: str | None = None) -> Damage | None:
    """A JSON file that is missing or cannot be parsed, as :class:`Damage` naming it ``name``
    (default: the file's name)."""
    name = name or path.name
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Damage(f"{name} is missing")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return Damage(f"{name} is not valid JSON ({first})")
    return None


def checkpoint_damage(path: str | os.PathLike) -> Damage | None:
    """The damage of a training checkpoint or model dir: against its manifest, or without one
    the JSON files that loading parses first."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None:
        return find_damage(path, manifest)
    if step_of(path) is not None and not (path / "train_state.json").exists():
        return Damage("train_state.json is missing")
    for name in ("model_config.json", "train_state.json", "weights/metadata.json"):
        if (path / name).exists():
            damage = json_damage(path / name, name)
            if damage is not None:
                return damage
    return None


def newest_intact_before(ckpt_root: Path, step: int) -> tuple[int, Path] | None:
    """The newest intact checkpoint older than ``step`` under ``ckpt_root``, or None."""
    for s, p in reversed(step_folders(ckpt_root)):
        if s < step and checkpoint_damage(p) is None:
            return s, p
    return None


def newest_intact(
    ckpt_root: str | os.PathLike, *, skip_damaged: bool, resuming: bool = True
) -> Path | None:
    """The newest intact checkpoint under ``ckpt_root`` (checked against its manifest), or
    None when there is none. A newer damaged one is a one-line CheckpointError
    (:func:`damaged_message`), or with ``skip_damaged`` passed over with a warning; so is
    every checkpoint damaged when ``resuming`` (else None)."""
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
    """One line: which checkpoint (step) is damaged, which file, and the fix.

    ``resuming``: the fix names the option that resumes from the newest intact step
    (``train.resume_skip_damaged=true``); otherwise the previous step to use instead.
    """
    path = Path(path)
    step = step_of(path)
    if step is None:  # a converted model dir or an export
        kind = folder_kind(path)
        redo = (
            "export it again (probsft convert megatron-to-hf ... --overwrite)"
            if kind == HF_EXPORT
            else "convert it again (probsft convert hf-to-megatron ... --overwrite)"
        )
        return f"{path} is damaged: {damage}; {redo}"
    previous = newest_intact_before(path.parent, step)
    head = f"checkpoint step {step} ({path}) is damaged: {damage}"
    if resuming and not (path / MANIFEST_FILE).is_file():
        # written before manifests: only deleting it lets a resume pass over it
        then = f"resumes from step {previous[0]}" if previous else "starts from its initial weights"
        return f"{head}; delete {path} (the run then {then}) or set train.resume=false"
    if resuming:
        if previous is None:
            return (
                f"{head}; no earlier intact checkpoint to resume from: delete {path} (the run "
                "then starts from its initial weights) or set train.resume=false"
            )
        return (
            f"{head}; resume from step {previous[0]}, the newest intact one, with "
            f"train.resume_skip_damaged=true, or delete {path}"
        )
    if previous is None:
        return f"{head}; the run has no earlier intact checkpoint: delete it and train again"
    return f"{head}; use the previous step {previous[1]} instead, or delete the damaged one"


def verify(path: str | os.PathLike, *, resuming: bool = False) -> bool:
    """Check a checkpoint, model dir or export against its manifest.

    Returns True when verified, False when it has no manifest (loads unverified).

    Raises:
        CheckpointError: one line from :func:`damaged_message`.
    """
    damage = checkpoint_damage(path)
    if damage is not None:
        raise CheckpointError(damaged_message(path, damage, resuming=resuming))
    return (Path(path) / MANIFEST_FILE).is_file()


# -- kinds -------------------------------------------------------------------------------------


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
    if (path / LEGACY_EXPORT_FILE).is_file():
        return HF_EXPORT
    if _is_run(path):
        return TRAINING_RUN
    return None


def _is_run(path: Path) -> bool:
    """A training run's folder: its checkpoints/, metrics.jsonl, summary.json or run.lock
    (a run that has just started), or the config.json of a run (the job's sections, written
    when the run starts)."""
    names = ("checkpoints", "metrics.jsonl", "summary.json", "run.lock")
    if any((path / name).exists() for name in names):
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and {"train", "optim", "model"} <= set(config)


def describe(path: str | os.PathLike) -> str:
    """A few words on what ``path`` holds, for messages."""
    kind = folder_kind(path)
    if kind is not None:
        return f"a {KIND_NAMES[kind]}"
    path = Path(path)
    if (path / "config.json").is_file():
        return "a Hugging Face folder"
    return "other files"


# -- the output guard ------------------------------------------------------------------------


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
    p = _absolute(path)
    if p.exists() and not p.is_dir():
        return "is a file, not a folder"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {probe} is a file"
    unwritable = f"is not writable (nothing can be created in {probe})"
    if not os.access(probe, os.W_OK | os.X_OK):
        return unwritable
    try:  # root passes os.access everywhere: only creating something shows a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".probsft-write-check-", dir=probe))
    except OSError:
        return unwritable
    return None


def check_output(
    out: str | os.PathLike,
    *,
    flag: str,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    kind: str | None = None,
    overwrite: bool = False,
) -> bool:
    """Refuse an output that would destroy an input or an unrelated folder (one line each).

    ``inputs`` are ``(flag, path)`` pairs; ``out`` may not be, contain or lie inside any of
    them. ``kind``: the kind of folder the command writes (replaced as a whole): an existing
    non-empty ``out`` is replaced only with ``overwrite`` and only when it holds that kind.
    Without ``kind`` the command adds files to ``out`` (it must only be a writable folder).

    Returns whether ``out`` exists and may be replaced.

    Raises:
        ConfigError: the output is not acceptable; the message says why and what to do.
    """
    for in_flag, inp in inputs:
        if inp is None:
            continue
        how = overlap(out, inp)
        if how == "is":
            raise ConfigError(
                f"{flag} {out} is the input {in_flag} {inp}: writing it would destroy the "
                f"input (with or without --overwrite); choose another {flag}"
            )
        if how == "contains":
            raise ConfigError(
                f"{flag} {out} contains the input {in_flag} {inp}: writing it would destroy "
                f"the input (with or without --overwrite); choose a {flag} outside it"
            )
        if how == "lies inside":
            raise ConfigError(
                f"{flag} {out} lies inside the input {in_flag} {inp}; choose a {flag} outside it"
            )
    problem = writable_folder(out)
    if problem is not None:
        raise ConfigError(f"{flag} {out} {problem}; name a folder that can be written")
    target = _absolute(out)
    if kind is None or not target.exists() or not any(target.iterdir()):
        return target.exists()
    found = folder_kind(target)
    name = KIND_NAMES[kind]
    if found != kind:
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
