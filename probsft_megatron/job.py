"""The resolved training job: a frozen :class:`Job`, decided once by :func:`resolve_job`."""

from __future__ import annotations

import dataclasses
import logging
from operator import attrgetter
from pathlib import Path
from typing import Any

from probsft_megatron.config import (
    ModelConfig,
    TrainJobConfig,
    resolve_attention,
    resolve_precision,
)
from probsft_megatron.data.records import check_first_records
from probsft_megatron.errors import ConfigError
from probsft_megatron.input_checks import check_files, planned_length
from probsft_megatron.model_dir import read_model_config
from probsft_megatron.objectives import parse_objective
from probsft_megatron.tokenizers import tokenizer_spec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated training job; ``config.model`` is the checkpoint's own when it has one."""

    config: TrainJobConfig
    world_size: int
    data_parallel_size: int
    dtype: str  # bfloat16 or float32
    attention: str  # te, sdpa or local
    tokenizer: str | None  # init.tokenizer, else the checkpoint's hf/; None: neither
    output_dir: Path
    init_weights: Path | None  # <init.checkpoint>/weights
    hf_template: Path | None  # <init.checkpoint>/hf, copied into every checkpoint

    # the sections (``objective``: the parsed loss.objective), read through the job
    model = property(attrgetter("config.model"))
    parallel = property(attrgetter("config.parallel"))
    loss = property(attrgetter("config.loss"))
    objective = property(attrgetter("config.loss.parsed_objective"))
    data = property(attrgetter("config.data"))
    optim = property(attrgetter("config.optim"))
    train = property(attrgetter("config.train"))

    @property
    def use_distributed_optimizer(self) -> bool:
        """The distributed optimizer, only where there are DP ranks to shard over."""
        return self.optim.use_distributed_optimizer and self.data_parallel_size > 1

    def require_tokenizer(self) -> str:
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
        return self.config.to_dict()


def resolve_job(cfg: TrainJobConfig, world_size: int, *, resume: bool = True) -> Job:
    """``cfg`` checked for ``world_size`` processes, as a :class:`Job` (cheap, no collectives)."""
    cfg = dataclasses.replace(cfg)  # the Job's own container (the sections are frozen)
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
    dp = cfg.validate(world_size)
    if cfg.train.max_steps is not None:  # beyond what the data gives: refused, not cut
        planned_length(cfg)
    checkpoint = Path(init.checkpoint) if init.checkpoint else None
    return Job(
        config=cfg,
        world_size=world_size,
        data_parallel_size=dp,
        dtype=resolve_precision(cfg.train.precision),
        attention=resolve_attention(cfg.train.attention),
        tokenizer=tokenizer_spec(init),
        output_dir=Path(cfg.train.output_dir),
        init_weights=checkpoint / "weights" if checkpoint else None,
        hf_template=checkpoint / "hf" if checkpoint else None,
    )
