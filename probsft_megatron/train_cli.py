"""`probsft train`: the job checked (its memory fit too) before anything is spawned, then run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from probsft_megatron import hardware
from probsft_megatron.config import list_recipes, load_config
from probsft_megatron.errors import ConfigError
from probsft_megatron.input_checks import planned_length
from probsft_megatron.job import resolve_job
from probsft_megatron.run_lock import check_free

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML: a path or a name under configs/recipes")
    p.add_argument("--nproc", type=int, default=1, help="processes (devices) on this node")
    dry_run = "validate and print the resolved config, then exit"
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    gpu_memory = (
        "memory of each GPU for the fit check (default: the CUDA device's; without CUDA "
        "the check is skipped unless this is given)"
    )
    p.add_argument("--gpu-memory", type=float, metavar="GB", help=gpu_memory)
    no_fit = "run a layout even when the memory planner says it will not fit"
    p.add_argument("--no-fit-check", action="store_true", help=no_fit)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")


def fit_check(job, args: argparse.Namespace) -> str:
    """The memory planner's one-line verdict (for --gpu-memory, or CUDA's); a misfit is refused."""
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GB (got {args.gpu_memory})")
    if args.no_fit_check:
        return "memory fit check skipped (--no-fit-check)"
    gpu_memory = args.gpu_memory
    if gpu_memory is None:
        if not hardware.cuda_available():
            return (
                "memory fit check skipped: no GPU here (the planner estimates GPU memory, not "
                "the host's RAM); --gpu-memory GB checks a GPU of that size"
            )
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    from probsft_megatron.plan import check_fits

    verdict = check_fits(job.config, args.nproc, gpu_memory, gpus_per_node=args.nproc)
    if not verdict.fits:
        raise ConfigError(verdict.message)
    return verdict.message


def run(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (got {args.nproc})")
    if not args.config:
        raise ConfigError(
            "probsft train needs --config RECIPE: a YAML file or a shipped recipe "
            f"({', '.join(list_recipes())})"
        )
    # the checkpoint a resume would load: checked here for --dry-run, else once by rank 0
    job = resolve_job(load_config(args.config, args.overrides), args.nproc, resume=args.dry_run)
    fit = fit_check(job, args)
    check_free(job.output_dir)  # another live run in train.output_dir: one line, now
    if args.dry_run:
        print(json.dumps(job.to_dict(), indent=2, default=str))
        p = job.parallel
        if job.tokenizer is None:
            logger.warning("no tokenizer yet: a run needs init.tokenizer or init.checkpoint")
        print(
            f"# valid for {args.nproc} process(es): TP={p.tensor_model_parallel_size}"
            f" PP={p.pipeline_model_parallel_size} DP={job.data_parallel_size}, "
            f"{job.dtype}, attention {job.attention}\n# {fit}\n# {planned_length(job.config)}",
            file=sys.stderr,
        )
        return 0
    if args.nproc == 1 and "RANK" not in os.environ:
        from probsft_megatron.train import train

        summary = train(job)
        if summary.get("interrupted"):  # stopped by a signal after saving: exit 75
            from probsft_megatron.stopping import exit_code

            return exit_code(summary)
        logger.info("done: %s steps, checkpoint %s", summary["steps"], summary["checkpoint"])
        return 0
    # torchrun's agent, run here, with the stop signals left to the training processes
    from probsft_megatron.launchers.agent import main as agent

    argv = ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "probsft_megatron.train"]
    return agent([*argv, "--config", args.config, *args.overrides])
