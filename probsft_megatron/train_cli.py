"""`probsft train --config RECIPE [--nproc N] [--dry-run] [key=value ...]`.

Resolves the whole configuration for ``N`` processes first
(:func:`probsft_megatron.config.resolve_job`: a bad key, an impossible layout or a missing
tokenizer fails here, before anything is spawned), then runs the job in this process (N=1)
or under ``torchrun --nproc-per-node N -m probsft_megatron.train``. ``--dry-run`` prints the
resolved configuration and stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

from probsft_megatron.config import load_config
from probsft_megatron.errors import ConfigError
from probsft_megatron.job import resolve_job

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML: a path or a name under configs/recipes")
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) on this node")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config, then exit"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {args.nproc})")
    job = resolve_job(load_config(args.config, args.overrides), args.nproc)
    if args.dry_run:
        print(json.dumps(job.to_dict(), indent=2, default=str))
        p = job.parallel
        if job.tokenizer is None:
            logger.warning("no tokenizer yet: a run needs init.tokenizer or init.checkpoint")
        print(
            f"# valid for {args.nproc} process(es): TP={p.tensor_model_parallel_size}"
            f" PP={p.pipeline_model_parallel_size} DP={job.data_parallel_size}, "
            f"{job.dtype}, attention {job.attention}",
            file=sys.stderr,
        )
        return 0
    if args.nproc == 1 and "RANK" not in os.environ:
        from probsft_megatron.train import train

        summary = train(job)
        logger.info("done: %s steps, checkpoint %s", summary["steps"], summary["checkpoint"])
        return 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(args.nproc),
        "-m",
        "probsft_megatron.train",
    ]
    if args.config:
        cmd += ["--config", args.config]
    return subprocess.call(cmd + list(args.overrides))
