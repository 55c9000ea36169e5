"""`probsft train --config RECIPE [--nproc N] [key=value ...]`.

Validates the whole configuration for ``N`` processes first (a bad key or an impossible
layout fails here, before anything is spawned), then runs the job in this process (N=1) or
under ``torchrun --nproc-per-node N -m probsft_megatron.train``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from probsft_megatron.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML: a path or a name under configs/recipes")
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) on this node")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config, then exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.nproc < 1:
        from probsft_megatron.errors import ConfigError

        raise ConfigError(f"--nproc must be >= 1 (got {args.nproc})")
    if cfg.init.checkpoint is not None:
        from probsft_megatron.train import read_model_dir_config

        cfg.model = read_model_dir_config(cfg.init.checkpoint)
    dp = cfg.validate(args.nproc)
    if args.dry_run:
        import json

        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        print(f"# valid for {args.nproc} process(es): TP={cfg.parallel.tensor_model_parallel_size}"
              f" PP={cfg.parallel.pipeline_model_parallel_size} DP={dp}", file=sys.stderr)
        return 0
    if args.nproc == 1 and "RANK" not in os.environ:
        from probsft_megatron.train import train

        summary = train(cfg)
        print(f"[probsft] done: {summary['steps']} steps, checkpoint {summary['checkpoint']}",
              file=sys.stderr)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(args.nproc), "-m", "probsft_megatron.train"]
    if args.config:
        cmd += ["--config", args.config]
    return subprocess.call(cmd + list(args.overrides))
