"""The resolved training job: what a run derives from its configuration, decided once.

:func:`resolve_job` validates a :class:`~probsft_megatron.config.TrainJobConfig` for a world
size (:func:`probsft_megatron.config.validate`) and resolves it into a frozen :class:`Job`:
the model (a converted checkpoint's own config wins over the recipe's), the data-parallel
size, the parameter dtype, the attention implementation, the parsed objective, the tokenizer
and the paths. Training reads the Job, never the raw config; ``probsft train --dry-run`` and
every rank of a real run call :func:`resolve_job` first. It is cheap and collective-free: it
checks every path the job reads or writes (:func:`probsft_megatron.input_checks.check_files`) and
reads only the checkpoint's ``model_config.json`` and the first record of each data file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probsft_megatron.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainJobConfig,
    resolve_attention,
    resolve_precision,
    validate,
)
from probsft_megatron.data.records import check_first_records
from probsft_megatron.errors import ConfigError
from probsft_megatron.input_checks import check_files, planned_length
from probsft_megatron.model_dir import read_model_config
from probsft_megatron.objectives import Objective, parse_objective
from probsft_megatron.tokenizers import tokenizer_spec

__all__ = ["Job", "resolve_job"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A validated training job, resolved once; training reads this, not the raw config.

    ``config`` holds the sections as loaded, except ``model``, which is the checkpoint's own
    config when the job starts from one. ``objective`` is the parsed objective, or None while
    ``loss.objective`` is ``auto`` (training resolves it with the probe once the base model is
    loaded: :meth:`with_objective`).
    """

    config: TrainJobConfig
    world_size: int
    data_parallel_size: int
    dtype: str
    """Parameter dtype name: ``bfloat16`` or ``float32``."""
    attention: str
    """Core attention implementation: ``te``, ``sdpa`` or ``local``."""
    tokenizer: str | None
    """What :func:`probsft_megatron.tokenizers.load_tokenizer` loads: ``init.tokenizer``, else
    the checkpoint's ``hf/`` folder; None when the config names neither (a run refuses to
    start, see :meth:`require_tokenizer`; a dry run only reports it)."""
    output_dir: Path
    init_weights: Path | None
    """torch_dist weights to start from (``<init.checkpoint>/weights``), or None."""
    hf_template: Path | None
    """Hugging Face files copied into every checkpoint (``<init.checkpoint>/hf``), or None."""

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def parallel(self) -> ParallelConfig:
        return self.config.parallel

    @property
    def loss(self) -> LossConfig:
        return self.config.loss

    @property
    def objective(self) -> Objective | None:
        """The parsed objective (the loss section's own parse), or None for ``auto``."""
        return self.config.loss.parsed_objective

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def optim(self) -> OptimConfig:
        return self.config.optim

    @property
    def train(self) -> TrainConfig:
        return self.config.train

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def use_distributed_optimizer(self) -> bool:
        """The distributed optimizer shards over DP ranks; with DP = 1 the plain one is used."""
        return self.optim.use_distributed_optimizer and self.data_parallel_size > 1

    def require_tokenizer(self) -> str:
        """The tokenizer spec, or the one-line error of a job that names none."""
        if self.tokenizer is None:
            raise ConfigError(
                "no tokenizer: set init.tokenizer (a folder, or 'smollm2') or "
                "init.checkpoint (a converted model dir with an hf/ folder)"
            )
        return self.tokenizer

    def with_objective(self, name: str) -> Job:
        """This job with ``loss.objective`` set to ``name`` (how ``auto`` is resolved)."""
        loss = dataclasses.replace(self.config.loss, objective=parse_objective(name).name)
        return dataclasses.replace(self, config=dataclasses.replace(self.config, loss=loss))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration (what a run records as ``config.json``)."""
        return self.config.to_dict()


def resolve_job(cfg: TrainJobConfig, world_size: int, *, resume: bool = True) -> Job:
    """Validate ``cfg`` for ``world_size`` processes and resolve it into a :class:`Job`.

    Cheap and collective-free, so ``--dry-run`` and every rank of a real run call it first.
    Reads only the ``model_config.json`` of ``init.checkpoint`` (its model config replaces the
    recipe's: a note is logged when they differ).
    """
    cfg = dataclasses.replace(cfg)  # the Job's own container (the sections are frozen)
    # every path first (input_checks.check_files), so the checkpoint read is sound; ``resume``:
    # also the checkpoint a resume would load (a run's ranks leave it to the Trainer)
    check_files(cfg, resume=resume)
    check_first_records(cfg.data)  # the data's fields, before any tokenizer reads it
    init = cfg.init
    if init.checkpoint is not None:
        stored = read_model_config(init.checkpoint)
        if stored != cfg.model and cfg.model != ModelConfig():
            diff = sorted(k for k, v in stored.to_dict().items() if cfg.model.to_dict()[k] != v)
            logger.info(
                "note: using the checkpoint's model config (differs from the recipe's model in %s)",
                ", ".join(diff),
            )
        cfg = dataclasses.replace(cfg, model=stored)
    dp = validate(cfg, world_size)
    if cfg.train.max_steps is not None:  # beyond what the data gives: refused, not cut
        planned_length(cfg)
    tokenizer = tokenizer_spec(init)
    checkpoint = Path(init.checkpoint) if init.checkpoint else None
    return Job(
        config=cfg,
        world_size=world_size,
        data_parallel_size=dp,
        dtype=resolve_precision(cfg.train.precision),
        attention=resolve_attention(cfg.train.attention),
        tokenizer=tokenizer,
        output_dir=Path(cfg.train.output_dir),
        init_weights=checkpoint / "weights" if checkpoint else None,
        hf_template=checkpoint / "hf" if checkpoint else None,
    )
