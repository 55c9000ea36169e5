"""``loss.objective: auto``: the probe picks the training objective when a run starts."""

from __future__ import annotations

import json
import logging

import torch.distributed as dist

from probsft_megatron.errors import ConfigError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.job import Job
from probsft_megatron.objectives import parse_objective
from probsft_megatron.probe.examples import (
    DEFAULT_SAMPLES,
    cache_dir,
    load_examples,
    probe_key,
    read_cached,
)
from probsft_megatron.probe.measure import broadcast, run_probe
from probsft_megatron.probe.report import REPORT_FILE, TABLE_PERCENTILES, write_outputs

logger = logging.getLogger(__name__)

CHOICE_FILE = "objective_choice.json"


def resolve_auto_objective(job: Job, model_chunks: list | None = None) -> tuple[str, dict]:
    """``(objective, evidence)`` for ``loss.objective: auto`` (collective, before the loss is
    built), from this run's ``objective_choice.json`` of the same probe key (a resume), the
    probe cache, or a new measurement of ``init.checkpoint`` (``model_chunks``: training's
    untrained model); evidence ``source``: ``run`` | ``cache`` | ``measured``. Rank 0 writes
    the choice and ``<output_dir>/probe/``."""
    from probsft_megatron.tokenizers import load_tokenizer

    model_dir = job.config.init.checkpoint
    if model_dir is None:
        raise ConfigError(
            "loss.objective=auto probes the base model: set init.checkpoint to a "
            "Megatron model dir (probsft convert hf-to-megatron)"
        )
    examples = load_examples(job.data, load_tokenizer(job.require_tokenizer()), DEFAULT_SAMPLES)
    key = probe_key(model_dir, job.dtype, examples)
    choice_file = job.output_dir / CHOICE_FILE
    found: tuple[str, dict | None] = ("measured", None)
    if dist.get_rank() == 0:
        recorded = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
        if recorded.get("key") == key:
            found = ("run", recorded["report"])
        elif (cached := read_cached(key)) is not None:
            found = ("cache", cached)
    source, report = broadcast(found, 0)
    if report is None:
        report = run_probe(
            examples,
            model_dir=model_dir,
            parallel=job.parallel,
            dtype=job.dtype,
            key=key,
            micro_batch_size=job.train.micro_batch_size,
            model_chunks=model_chunks,
            implementation=job.loss.implementation if model_chunks else "unfused",
            chunk_size=job.loss.chunk_size,
        )
    objective = parse_objective(report["recommendation"]["objective"]).name
    evidence = {
        "objective": objective,
        "source": source,
        "key": key,
        "cache": str(cache_dir() / key / REPORT_FILE),
        "placement": report["placement"],
        "recommendation": report["recommendation"],
        "statistics": {
            k: report[k]
            for k in ("tokens", "mean_p", "median_p", "mean_nll", "frac_p_gt_0.5", "frac_p_gt_0.9")
        },
        "percentiles": {str(k): report["percentiles"][str(k)] for k in TABLE_PERCENTILES},
    }
    if dist.get_rank() == 0:
        if source == "run":  # a measured report is cached already
            write_outputs(report, cache_dir() / key)
        write_outputs(report, job.output_dir / "probe")
        atomic_write_json(choice_file, dict(evidence, report=report))
        logger.info(
            "loss.objective=auto -> %s: %s (%s; probe %s, key %s)",
            objective,
            report["placement"]["regime"],
            report["placement"]["reason"],
            source,
            key,
        )
    dist.barrier()
    return objective, evidence
