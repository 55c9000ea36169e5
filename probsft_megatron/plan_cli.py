"""`probsft plan`: will a recipe fit on the GPUs, and with which layout?

    probsft plan --config RECIPE [--gpus N] [--gpu-memory GB] [--gpus-per-node 8] [key=value ...]
    probsft plan --config RECIPE --json            # the same as JSON
    probsft plan --recipes-table                   # the shipped recipes on 8 x 80 and 8 x 141 GB
    probsft plan --lora-table [--gpu-memory 80]    # the same recipes: full vs LoRA, 1 GPU or 8

Prints, per GPU, the requested layout's weights, gradient buffer, optimizer state (with and
without the distributed optimizer), activations (with and without sequence parallelism, per
recompute setting), loss head (unfused vs fused), transients and margin; the cheapest layout
that fits, and why each cheaper one does not. Exit status 0 when the requested layout fits,
1 when it does not, 2 for bad input (see :mod:`probsft_megatron.plan` for what is counted).
"""

from __future__ import annotations

import argparse
import json
import logging

from probsft_megatron import plan as P

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``probsft plan`` (help strings are %-formatted by argparse:
    a literal percent sign is written ``%%``)."""
    p.add_argument("--config", help="recipe YAML: a path or a name under configs/recipes")
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs of the job (default: one node, --gpus-per-node)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=P.DEFAULT_GPU_MEMORY_GB,
        metavar="GB",
        help="memory of each GPU in GiB, e.g. 80 (H100/A100 80GB) or 141 (H200) "
        f"(default {P.DEFAULT_GPU_MEMORY_GB:g})",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=P.DEFAULT_GPUS_PER_NODE,
        help="tensor parallelism stays within a node (default 8)",
    )
    p.add_argument(
        "--margin-gb",
        type=float,
        default=P.DEFAULT_MARGIN_GIB,
        metavar="GB",
        help="fixed margin for CUDA context, NCCL and workspaces (default "
        f"{P.DEFAULT_MARGIN_GIB:g}; {P.FRAGMENTATION * 100:g}%% of the rest is added)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--recipes-table",
        action="store_true",
        help="a Markdown table of every shipped recipe of >= 1B parameters on one node "
        "of 8 x 80 GB and 8 x 141 GB (docs/training.md)",
    )
    p.add_argument(
        "--lora-table",
        action="store_true",
        help="a Markdown table of full fine-tuning vs LoRA (rank 16) for the same recipes: "
        "GiB per GPU on one node, and whether one GPU of --gpu-memory holds the run",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    """Plan the recipe; print the tables (or JSON). Returns 0 (fits), 1 (does not fit)."""
    from probsft_megatron.config import load_config
    from probsft_megatron.errors import ConfigError, ProbsftError
    from probsft_megatron.model_dir import read_model_config

    if args.recipes_table:
        print(P.recipes_table())
        return 0
    if getattr(args, "lora_table", False):
        print(P.lora_table(gpu_memory_gb=args.gpu_memory))
        return 0
    if not args.config:
        raise ConfigError(
            "probsft plan needs --config RECIPE (a path or a shipped recipe name) "
            "or --recipes-table"
        )
    cfg = load_config(args.config, args.overrides)
    if cfg.init.checkpoint is not None:
        try:  # training takes the model of the checkpoint it starts from
            cfg.model = read_model_config(cfg.init.checkpoint)
        except (ProbsftError, OSError):  # not converted yet: the recipe's model is the plan's
            log.warning(
                "planning with the recipe's model (cannot read the model of init.checkpoint %s)",
                cfg.init.checkpoint,
            )
    result = P.plan(cfg, args.gpus, args.gpu_memory, args.gpus_per_node, margin_gib=args.margin_gb)
    rep = P.plan_report(cfg, result, args.config)
    print(json.dumps(rep, indent=2) if args.json else P.render_plan(rep))
    return 0 if result.fits else 1
