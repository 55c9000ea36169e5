"""`probsft plan`: will a recipe fit on the GPUs, and with which layout? (docs/training.md)

Exit status 0 when the requested layout fits, 1 when it does not, 2 for bad input."""

from __future__ import annotations

import argparse
import json
import logging

from probsft_megatron import plan as P

log = logging.getLogger(__name__)

VALUE_FLAGS = (  # flag, type, default, metavar, help (argparse %-formats it: % is written %%)
    ("--config", str, None, None, "recipe YAML: a path or a name under configs/recipes"),
    ("--gpus", int, None, None, "GPUs of the job (default: one node, --gpus-per-node)"),
    (
        "--gpu-memory",
        float,
        P.DEFAULT_GPU_MEMORY_GB,
        "GB",
        "memory of each GPU in GiB, e.g. 80 (H100/A100 80GB) or 141 (H200) "
        f"(default {P.DEFAULT_GPU_MEMORY_GB:g})",
    ),
    (
        "--gpus-per-node",
        int,
        P.DEFAULT_GPUS_PER_NODE,
        None,
        "tensor parallelism stays within a node (default 8)",
    ),
    (
        "--margin-gb",
        float,
        P.DEFAULT_MARGIN_GIB,
        "GB",
        "fixed margin for CUDA context, NCCL and workspaces (default "
        f"{P.DEFAULT_MARGIN_GIB:g}; {P.FRAGMENTATION * 100:g}%% of the rest is added)",
    ),
)
SWITCHES = (
    ("--json", "print JSON instead of tables"),
    (
        "--recipes-table",
        "a Markdown table of every shipped recipe of >= 1B parameters on one node "
        "of 8 x 80 GB and 8 x 141 GB (docs/training.md)",
    ),
    (
        "--lora-table",
        "a Markdown table of full fine-tuning vs LoRA (rank 16) for the same recipes: "
        "GiB per GPU on one node, and whether one GPU of --gpu-memory holds the run",
    ),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flag, kind, default, metavar, help_text in VALUE_FLAGS:
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=help_text)
    for flag, help_text in SWITCHES:
        p.add_argument(flag, action="store_true", help=help_text)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    """Plan the recipe; print the tables (or JSON). Returns 0 (fits), 1 (does not fit)."""
    from probsft_megatron.config import load_config
    from probsft_megatron.errors import ConfigError, ProbsftError
    from probsft_megatron.model_dir import read_model_config

    if args.recipes_table:
        print(P.recipes_table())
        return 0
    if args.lora_table:
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
