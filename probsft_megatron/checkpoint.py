"""Training checkpoints (``<output_dir>/checkpoints/step_NNNNNNN``: a Megatron model dir plus
``train_state.json`` and per-rank RNG states), written under a ``.partial`` name with their
manifest and renamed when complete; the :class:`CheckpointManager` that owns a run's."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron import compat, manifest
from probsft_megatron import model_dir as layout
from probsft_megatron.config import ModelConfig
from probsft_megatron.errors import CheckpointError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.manifest import step_name

logger = logging.getLogger(__name__)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest intact checkpoint under ``ckpt_root`` (damaged ones skipped, warned), or None."""
    return manifest.newest_intact(ckpt_root, skip_damaged=True, resuming=False)


@dataclass
class CheckpointManager:
    """The checkpoints of one run (``<output_dir>/checkpoints``); built on every rank, its
    methods are collectives; ``latest``: the newest one this run found or wrote."""

    output_dir: str | Path
    _: KW_ONLY
    keep_last: int = 2
    resume: bool = True
    skip_damaged: bool = False
    latest: Path | None = field(default=None, init=False)

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def newest(self) -> Path | None:
        """The newest checkpoint folder, unchecked (a rank lost inside a save may leave one
        renamed into place that ``latest`` does not know yet)."""
        found = manifest.step_folders(self.root)
        return found[-1][1] if found else self.latest

    def find(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh start), verified by rank 0: every rank
        returns the same folder or raises the same CheckpointError (rank 0 prints it)."""
        verdict: list[Any] = [None]
        if _rank() == 0 and self.resume:
            try:
                verdict = [manifest.newest_intact(self.root, skip_damaged=self.skip_damaged)]
            except CheckpointError as exc:
                verdict = [exc]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(verdict, src=0)
        if isinstance(verdict[0], CheckpointError):
            raise CheckpointError(str(verdict[0]), announce=_rank() == 0)
        self.latest = verdict[0]
        return self.latest

    def load(
        self, path: str | Path, model, optimizer, *, base_fingerprint: str | None = None
    ) -> dict[str, Any]:
        """Load weights (+ optimizer) and this rank's RNG (verified by :meth:`find`); returns
        the train state. A LoRA model loads only its adapters, whose ``peft.json`` must match
        ``base_fingerprint``; unreadable files are a one-line CheckpointError."""
        from probsft_megatron import lora

        path = Path(path)
        adapters_only = lora.has_adapters(model)
        if adapters_only:
            lora.check_fingerprint(path, base_fingerprint)
        elif (path / lora.FINGERPRINT_FILE).is_file():
            raise CheckpointError(
                f"{path} holds LoRA adapters, not full weights; resume it with peft.method=lora "
                "(and its base as init.checkpoint), or use another train.output_dir"
            )
        state = _sharded_state(model, optimizer, is_loading=True)
        try:
            loaded = compat.dist_load(state, str(path / "weights"))
        except (CheckpointError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a truncated or corrupt shard: DCP, miniz and pickle errors
            damage = f"its weights cannot be read ({read_failure(exc)})"
            raise CheckpointError(manifest.damaged_message(path, damage, resuming=True)) from None
        if adapters_only:
            lora.load_adapter_state(model, loaded["model"])
        else:
            model.load_state_dict(loaded["model"])
        if optimizer is not None:
            with torch.no_grad():  # megatron copies into leaf parameters in place
                optimizer.load_state_dict(loaded["optimizer"])
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        if rng_file.is_file():
            try:
                rng = torch.load(rng_file, weights_only=False)
            except Exception as exc:  # a truncated zip archive
                damage = f"{rng_file.relative_to(path)} cannot be read ({read_failure(exc)})"
                message = manifest.damaged_message(path, damage, resuming=True)
                raise CheckpointError(message) from None
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            compat.set_rng_tracker_states(rng["tracker"])
        return json.loads((path / "train_state.json").read_text())

    def save(self, step: int, model, optimizer, **kwargs) -> Path:
        """:func:`save_checkpoint` of ``step`` (atomic; prunes to ``keep_last``)."""
        self.latest = save_checkpoint(
            self.root, step, model, optimizer, keep_last=self.keep_last, **kwargs
        )
        return self.latest


def read_failure(exc: BaseException) -> str:
    """Why checkpoint files could not be read, short: the innermost error's type and first
    line (torch DCP wraps each rank's in a ``CheckpointException`` with a traceback)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) and inner else inner
        if isinstance(inner, BaseException):
            exc = inner
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model, optimizer, *, is_loading: bool) -> dict[str, Any]:
    from probsft_megatron import lora

    model_state = model.sharded_state_dict()
    if lora.has_adapters(model):  # a LoRA run's checkpoint holds its adapters, not the base
        model_state = lora.adapter_sharded_state_dict(model_state)
    state = {"model": model_state}
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
    peft_record: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` of this rank's unwrapped ``model`` atomically (a collective);
    returns its folder. A LoRA model saves its adapters, with ``peft_record`` as peft.json."""
    root = Path(ckpt_root)
    final = root / step_name(step)
    staging = layout.staging_path(final)
    if _rank() == 0:
        layout.begin_staging(final, overwrite=True)  # also clears an interrupted write
        (staging / "rng").mkdir()
        (staging / layout.WEIGHTS_DIR).mkdir()
    _barrier()
    compat.dist_save(
        _sharded_state(model, optimizer, is_loading=False), str(staging / layout.WEIGHTS_DIR)
    )
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": compat.rng_tracker_states(),
    }
    torch.save(rng, staging / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        layout.write_model_config(
            staging, model_config, dtype=dtype, source={"kind": "training checkpoint", "step": step}
        )
        if hf_template is not None and Path(hf_template).is_dir():
            layout.copy_hf_files(hf_template, staging / layout.HF_DIR)
        atomic_write_json(staging / "train_state.json", dict(train_state, step=step), default=str)
        if peft_record is not None:
            atomic_write_json(staging / "peft.json", peft_record)
        manifest.write_manifest(staging, manifest.TRAINING_CHECKPOINT, step=step)
        layout.commit_staging(staging, final)
        # newer folders (a resume past a damaged one) are replaced when the run reaches them
        older = [path for s, path in manifest.step_folders(root) if s <= step]
        for old in older[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final
