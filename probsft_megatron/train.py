"""`probsft train`: supervised fine-tuning of a Megatron-Core GPT model with any objective.

Run one process per device::

    torchrun --nproc-per-node N -m probsft_megatron.train --config RECIPE [key=value ...]

The whole job reads top to bottom in :func:`train`: the resolved job
(:func:`probsft_megatron.config.resolve_job`) -> process groups -> tokenizer and data ->
model and optimizer (from a converted checkpoint, or resumed) -> the objective (``auto``:
the probe decides) -> the step loop (learning rate, one :func:`runtime.train_step`, metrics,
checkpoints).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

import torch

from probsft_megatron import checkpoint as ckpt
from probsft_megatron import compat, console, cpu_backend, lora, run_lock, runtime, stopping
from probsft_megatron.config import TrainJobConfig, load_config, world_size_from_env
from probsft_megatron.errors import ConfigError, ProbsftError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.job import Job, resolve_job
from probsft_megatron.loss import ObjectiveLoss
from probsft_megatron.metrics import RunLog, step_record
from probsft_megatron.model_dir import read_model_config

# by name: under ``python -m probsft_megatron.train`` __name__ is "__main__", outside the
# package's logging set-up (console.setup_logging), which would drop the INFO lines
logger = logging.getLogger("probsft_megatron.train")

read_model_dir_config = read_model_config
"""Earlier name of :func:`probsft_megatron.model_dir.read_model_config` (kept for callers)."""


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over ``warmup_ratio * total`` steps, then cosine (or constant) to min_lr."""
    warmup = int(cfg.warmup_ratio * total)
    if step <= warmup and warmup > 0:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def efficiency(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's padding efficiency over the steps of ``history``: ``tokens`` (real),
    ``positions`` (computed) and ``positions_per_token`` (1.0 when no padding is computed)."""
    tokens = sum(r.get("tokens") or 0 for r in history)
    positions = sum(r.get("positions") or 0 for r in history)
    if not tokens:
        return {}
    return {"tokens": tokens, "positions": positions, "positions_per_token": positions / tokens}


def train(cfg: TrainJobConfig | Job) -> dict[str, Any]:
    """Run (or resume) the job described by ``cfg``; returns a summary on every rank.

    SIGTERM, SIGUSR1 or SIGINT on any rank stops every rank after the same step, with a
    checkpoint: the summary then has ``interrupted`` and the process should exit with
    :data:`stopping.INTERRUPTED_EXIT_CODE` (:func:`stopping.exit_code`). A non-finite loss or
    gradient norm raises :class:`stopping.NonFiniteError` before that step is saved; a failed
    collective (a dead or hung rank) raises :class:`stopping.RankLostError`.
    """
    from probsft_megatron.data import GlobalBatchLoader
    from probsft_megatron.data.batches import pad_multiple
    from probsft_megatron.data.store import open_dataset
    from probsft_megatron.model import transformer_config
    from probsft_megatron.tokenizers import load_tokenizer

    # -- the job and process groups -------------------------------------------------------
    job = cfg if isinstance(cfg, Job) else resolve_job(cfg, world_size_from_env())
    tokenizer_spec = job.require_tokenizer()
    t = job.train
    # from here on a stop signal finishes the step, saves and stops (see module stopping)
    with stopping.Stopper(
        t.dist_timeout_s, announce=_env_rank() == 0, checkpoint_root=job.checkpoint_dir
    ) as stopper:
        runtime.init_distributed(
            job.parallel, seed=t.seed, model=job.model, timeout_s=t.dist_timeout_s
        )
        # one run per output folder: rank 0 takes the lock, every rank learns the verdict;
        # released when the run ends however it ends (also exit 75, a second Ctrl-C)
        stopper.at_exit(run_lock.hold(job.output_dir, cpu_backend.device()).release)
        layout = compat.layout()
        is_logger = layout.is_last_stage and layout.dp_rank == 0 and layout.tp_rank == 0
        stopper.announce = is_logger
        torch.manual_seed(t.seed)

        # -- tokenizer and data -------------------------------------------------------------
        tokenizer = load_tokenizer(tokenizer_spec)
        # tokenized once into a store: local rank 0 of each node builds it if needed (one
        # build per job on a shared filesystem), every rank maps it read-only
        dataset = open_dataset(
            job.data, tokenizer, builder=int(os.environ.get("LOCAL_RANK", "0")) == 0
        )
        loader = GlobalBatchLoader(
            dataset,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=layout.dp_rank,
            dp_size=layout.dp,
            seq_length=job.data.max_length,
            seed=t.seed,
            epochs=t.epochs,
            packing=job.data.packing,
            pad_id=tokenizer.pad_token_id,
            padding=job.data.padding,
            pad_multiple=pad_multiple(layout.tp),
            same_length_per_step=layout.pp > 1,  # stages exchange fixed-shape tensors
        )
        total_steps = len(loader)
        last_step = run_length(len(dataset), total_steps, t, announce=is_logger)

        # -- model, optimizer, resume -------------------------------------------------------
        tconfig = transformer_config(
            job.model, job.parallel, params_dtype=getattr(torch, job.dtype)
        )
        resume_from = ckpt.latest_checkpoint(job.checkpoint_dir) if t.resume else None
        chunks, optimizer = runtime.build_training_model(
            job.model,
            tconfig,
            job.optim,
            use_distributed_optimizer=job.use_distributed_optimizer,
            # a LoRA checkpoint holds only the adapters: its base comes from init.checkpoint
            load_dir=str(job.init_weights)
            if job.init_weights and (resume_from is None or job.config.peft.enabled)
            else None,
            loss_config=job.loss,
            attention=job.attention,
            peft=job.config.peft,
            peft_seed=t.seed,
        )
        start_step = 0
        if resume_from is not None:
            state = ckpt.load_checkpoint(
                resume_from,
                chunks[0].module,
                optimizer,
                base_fingerprint=lora.run_fingerprint(job.config),
            )
            start_step = state["step"]
            compat.restore_adam_steps(optimizer, start_step)  # megatron leaves it at 1
            loader.load_state_dict(state["data"])
            stopper.checkpoint = resume_from
            if is_logger:
                logger.info("resumed from %s (step %d/%d)", resume_from, start_step, last_step)
                stopping.record_event(
                    job.output_dir, "resumed", step=start_step, checkpoint=resume_from
                )

        # -- the objective --------------------------------------------------------------------
        objective_evidence = None
        if job.objective is None:  # loss.objective: auto -> probe the base model (or reuse)
            from probsft_megatron.probe.auto import resolve_auto_objective

            name, objective_evidence = resolve_auto_objective(
                job, model_chunks=chunks if resume_from is None else None
            )
            job = job.with_objective(name)
        forward_step = runtime.ForwardStep(
            ObjectiveLoss(job.loss, dp_group=runtime.dp_group()), cpu_backend.device()
        )

        validation = None
        if job.data.val_files:  # held-out loss every train.eval_interval steps and at the end
            from probsft_megatron.validation import Validation

            validation = Validation(job, tokenizer, layout)

        # -- the loop ---------------------------------------------------------------------------
        log = RunLog(job, start_step, last_step) if is_logger else None
        batches = iter(loader)
        step = start_step
        interrupted = None
        try:
            for step in range(start_step + 1, last_step + 1):
                stopper.step = step
                t0 = time.perf_counter()
                lr = lr_at(step, total_steps, job.optim)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                want_hist = bool(t.histogram_interval) and step % t.histogram_interval == 0
                with stopping.inject_nonfinite(chunks, step):  # tests only: NaN on request
                    stats = runtime.train_step(
                        chunks,
                        optimizer,
                        forward_step,
                        next(batches),
                        record_p=want_hist,
                    )
                # every rank learns whether any rank got a stop signal or a non-finite value
                verdict = stopper.boundary(stats, cpu_backend.device())
                if verdict.nonfinite:  # before anything of this step is logged or saved
                    if is_logger:
                        stopping.record_event(
                            job.output_dir,
                            "non_finite",
                            step=step,
                            problem=verdict.problem(),
                            checkpoint=stopper.checkpoint,
                        )
                    runtime.shutdown()
                    raise verdict.error(stopper.checkpoint, announce=is_logger)
                elapsed = time.perf_counter() - t0
                val = {}
                if validation is not None and not verdict.stop and validation.due(step, last_step):
                    val = validation(chunks, forward_step)  # every rank; val_* on the logger
                if log is not None:
                    record = {**step_record(step, lr, stats, elapsed), **val}
                    write = step % t.log_interval == 0 or step == last_step or verdict.stop
                    log.step(record, stats.p, write=write or bool(val))
                due = t.save_interval and step % t.save_interval == 0
                if due or step == last_step or verdict.stop:
                    stopper.checkpoint = save(job, step, chunks, optimizer, loader, total_steps)
                if verdict.stop:
                    interrupted = {
                        "step": step,
                        "by": verdict.signal_text(),
                        "checkpoint": str(stopper.checkpoint),
                    }
                    break
        finally:
            if log is not None:
                log.close()  # also when a step failed: the progress bar ends its line
        stopper.announce = False  # a signal from here on changes nothing
        summary = {
            "steps": step,
            "total_steps": total_steps,
            "output_dir": str(job.output_dir),
            "objective": str(job.loss.objective),
            "objective_evidence": objective_evidence,
            "checkpoint": str(ckpt.latest_checkpoint(job.checkpoint_dir)),
            "history": log.history if log is not None else [],
            **efficiency(log.history if log is not None else []),
        }
        if interrupted is not None:  # no summary.json: the run is not finished
            summary["interrupted"] = interrupted
            if is_logger:
                stopping.record_event(job.output_dir, "interrupted", **interrupted)
                logger.info(
                    "interrupted at step %d (%s); checkpoint %s; resume with the same command",
                    step,
                    interrupted["by"],
                    interrupted["checkpoint"],
                )
        elif is_logger:
            atomic_write_json(job.output_dir / "summary.json", summary)
        runtime.shutdown()
    return summary


def run_length(examples: int, total_steps: int, t, *, announce: bool) -> int:
    """The run's last step, announced in one line (steps, epochs, examples); a
    ``train.max_steps`` beyond what the data gives is refused (every rank raises, only the
    ``announce`` one prints), never cut silently."""
    per_epoch = total_steps / t.epochs
    shape = (
        f"train.epochs={t.epochs} over {examples} examples, train.global_batch_size="
        f"{t.global_batch_size}: {per_epoch:g} steps per epoch"
    )
    problem = None
    if total_steps == 0:
        problem = (
            f"the dataset has {examples} examples, fewer than one global batch "
            f"(train.global_batch_size={t.global_batch_size}); add data or lower "
            "train.global_batch_size"
        )
    elif t.max_steps is not None and t.max_steps > total_steps:
        epochs = math.ceil(t.max_steps / per_epoch)
        problem = (
            f"train.max_steps={t.max_steps} is more than the {total_steps} steps the data "
            f"gives ({shape}); set train.epochs={epochs} to train {t.max_steps} steps, or "
            f"train.max_steps={total_steps} or lower (null: every step of the epochs)"
        )
    if problem is not None:
        error = ConfigError(problem)
        error.announce = announce
        raise error
    last_step = t.max_steps or total_steps
    if announce:
        cut = (
            f" (train.max_steps={t.max_steps}; the schedule spans all {total_steps})"
            if last_step < total_steps
            else ""
        )
        logger.info("training %d steps%s: %s", last_step, cut, shape)
    return last_step


def save(job: Job, step: int, chunks: list, optimizer, loader, total_steps: int):
    """The training checkpoint of ``step`` (collective; atomic): weights, optimizer, data
    position, RNG. Stop signals are held back from the writer's helper processes (see
    :func:`stopping.signals_deferred`). Returns its folder."""
    with stopping.signals_deferred():
        return ckpt.save_checkpoint(
            job.checkpoint_dir,
            step,
            chunks[0].module,
            optimizer,
            model_config=job.model,
            dtype=job.dtype,
            train_state={
                "data": loader.state_dict(),
                "total_steps": total_steps,
                "config": job.to_dict(),
            },
            hf_template=job.hf_template,
            keep_last=job.train.keep_last,
            peft_record=lora.peft_record(job.config.peft, lora.run_fingerprint(job.config))
            if job.config.peft.enabled
            else None,
        )


def _env_rank() -> int:
    """This process's global rank as torchrun sets it (0 for a single process)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="probsft train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="recipe YAML (path or name under configs/recipes)")
    ap.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="debug logging, including megatron's own warnings",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)

    def run() -> int:
        try:
            summary = train(load_config(args.config, args.overrides))
        except ProbsftError as exc:
            if getattr(exc, "announce", True) is False:  # every rank stops; one says why
                return 2
            raise
        # the run is over: a late signal (torchrun's agent ends the other workers with SIGTERM
        # once one has exited) must not cut short this process's own clean exit
        stopping.ignore_stop_signals()
        return stopping.exit_code(summary)  # 75 when a signal stopped it after a save

    return console.run_main(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
