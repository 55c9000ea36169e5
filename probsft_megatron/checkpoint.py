"""Training checkpoints: torch_dist model + optimizer, training state, RNG; atomic; keep last K.

A checkpoint is a Megatron model dir (:mod:`probsft_megatron.model_dir`:
``model_config.json``, ``weights/`` in torch_dist format, ``hf/`` export template) plus what
resuming needs::

    <output_dir>/checkpoints/step_0000100/
        model_config.json   weights/ (model + optimizer shards)   hf/ (if the run had one)
        train_state.json    (step, data position, config, metrics so far)
        rng/rank_00000.pt   (per-rank torch / CUDA / megatron RNG states)

It is written under ``.step_0000100.partial`` and renamed only after every rank has finished,
so a crash mid-write leaves the previous checkpoint as the newest complete one. The model
weights reshard on load (export or fine-tune at any TP/PP); the distributed optimizer's state
resumes at the same TP/PP with any DP size (see :func:`compat.optimizer_sharded_state_dict`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron import compat
from probsft_megatron import model_dir as layout
from probsft_megatron.config import ModelConfig
from probsft_megatron.errors import CheckpointError
from probsft_megatron.fileio import atomic_write_json

STEP_RE = re.compile(r"^step_(\d{7})$")
CRASH_ENV = "PROBSFT_TEST_CRASH_BEFORE_RENAME"  # tests: die after writing, before the rename


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "train_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": compat.rng_tracker_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    compat.set_rng_tracker_states(state["tracker"])


def _sharded_state(model, optimizer, *, is_loading: bool) -> dict[str, Any]:
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = compat.optimizer_sharded_state_dict(
            optimizer, state["model"], is_loading=is_loading
        )
    return state


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model,
    optimizer,
    *,
    model_config: ModelConfig,
    dtype: str,
    train_state: dict[str, Any],
    hf_template: str | Path | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it).

    ``model`` is this rank's (unwrapped) GPT model chunk. Returns the final directory.
    """
    root = Path(ckpt_root)
    final = root / step_name(step)
    staging = layout.staging_path(final)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        layout.begin_staging(final, overwrite=True)  # also clears an interrupted write
        (staging / "rng").mkdir()
        (staging / layout.WEIGHTS_DIR).mkdir()
    _barrier()
    compat.dist_save(
        _sharded_state(model, optimizer, is_loading=False), str(staging / layout.WEIGHTS_DIR)
    )
    torch.save(_rng_state(), staging / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        layout.write_model_config(
            staging, model_config, dtype=dtype, source={"kind": "training checkpoint", "step": step}
        )
        if hf_template is not None and Path(hf_template).is_dir():
            layout.copy_hf_files(hf_template, staging / layout.HF_DIR)
        atomic_write_json(staging / "train_state.json", dict(train_state, step=step), default=str)
        if os.environ.get(CRASH_ENV) == str(step):
            os._exit(17)
        layout.commit_staging(staging, final)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Load weights (+ optimizer when given) and this rank's RNG; returns the train state."""
    path = Path(path)
    state_file = path / "train_state.json"
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete training checkpoint "
            "(no train_state.json); point to a step_NNNNNNN folder"
        )
    loaded = compat.dist_load(
        _sharded_state(model, optimizer, is_loading=True), str(path / "weights")
    )
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        with torch.no_grad():  # megatron copies into leaf parameters in place
            optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())
