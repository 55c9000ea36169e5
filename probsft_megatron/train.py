"""`probsft train`: supervised fine-tuning of a Megatron-Core GPT model with any objective.

One process per device (under torchrun); :class:`Trainer` builds the run, ``fit`` is the loop."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from probsft_megatron import compat, console, cpu_backend, lora, run_lock, runtime, stopping
from probsft_megatron.checkpoint import CheckpointManager
from probsft_megatron.config import TrainJobConfig, load_config, world_size_from_env
from probsft_megatron.errors import ConfigError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.job import Job, resolve_job
from probsft_megatron.loss import ObjectiveLoss
from probsft_megatron.metrics import RunLog, step_record
from probsft_megatron.validation import Validation, global_batches

# by name: under ``python -m`` __name__ is "__main__", outside the package's logging set-up
logger = logging.getLogger("probsft_megatron.train")


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over ``warmup_ratio * total`` steps, then cosine (or constant) to min_lr."""
    warmup = int(cfg.warmup_ratio * total)
    if step <= warmup and warmup > 0:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train(cfg: TrainJobConfig | Job) -> dict[str, Any]:
    """Run (or resume) the job; returns a summary on every rank (``interrupted`` after a stop
    signal and a save). Raises ``stopping.NonFiniteError`` or ``stopping.RankLostError``."""
    # the checkpoint to resume from is found (and verified) once, by the Trainer's rank 0
    job = cfg if isinstance(cfg, Job) else resolve_job(cfg, world_size_from_env(), resume=False)
    job.require_tokenizer()
    t = job.train
    checkpoints = CheckpointManager(
        job.output_dir, keep_last=t.keep_last, resume=t.resume, skip_damaged=t.resume_skip_damaged
    )
    # from here on a stop signal finishes the step, saves and stops (see module stopping)
    with stopping.Stopper(
        t.dist_timeout_s, announce=os.environ.get("RANK", "0") == "0", checkpoints=checkpoints
    ) as stopper:
        summary = Trainer(job, stopper).fit()
        runtime.shutdown()
    return summary


class Trainer:
    """One training run on every rank: components built once and passed explicitly, the loop
    (:meth:`fit`). Tests inject faults by wrapping the module functions it calls."""

    def __init__(self, job: Job, stopper: stopping.Stopper) -> None:
        from probsft_megatron.data.store import open_dataset
        from probsft_megatron.model import transformer_config
        from probsft_megatron.tokenizers import load_tokenizer

        t = job.train
        self.stopper, self.checkpoints = stopper, stopper.checkpoints
        runtime.init_distributed(
            job.parallel, seed=t.seed, model=job.model, timeout_s=t.dist_timeout_s
        )
        # one run per output folder, released when the run ends however it ends (exit 75 too)
        stopper.at_exit.append(run_lock.hold(job.output_dir, cpu_backend.device()))
        layout = compat.rank_position()
        self.is_logger = layout.is_last_stage and layout.dp_rank == 0 and layout.tp_rank == 0
        stopper.announce = self.is_logger
        torch.manual_seed(t.seed)

        # local rank 0 of each node builds the token store if needed; every rank maps it
        tokenizer = load_tokenizer(job.require_tokenizer())
        builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
        dataset = open_dataset(job.data, tokenizer, builder=builder)
        self.loader = global_batches(job, dataset, layout, tokenizer.pad_token_id, epochs=t.epochs)
        self.total_steps = len(self.loader)
        self.last_step = run_length(len(dataset), self.total_steps, t, announce=self.is_logger)

        resume_from = self.checkpoints.find()  # rank 0 verifies, every rank learns the verdict
        dtype = getattr(torch, job.dtype)
        # a LoRA checkpoint holds only the adapters: its base comes from init.checkpoint
        base = job.init_weights if resume_from is None or job.config.peft.enabled else None
        self.chunks, self.optimizer = runtime.build_training_model(
            job.model,
            transformer_config(job.model, job.parallel, params_dtype=dtype),
            job.optim,
            use_distributed_optimizer=job.use_distributed_optimizer,
            load_dir=str(base) if base else None,
            loss_config=job.loss,
            attention=job.attention,
            peft=job.config.peft,
            peft_seed=t.seed,
        )
        self.start_step = 0 if resume_from is None else self._resume(job, resume_from)

        self.objective_evidence = None
        if job.objective is None:  # loss.objective: auto -> probe the base model (or reuse)
            from probsft_megatron.probe.auto import resolve_auto_objective

            name, self.objective_evidence = resolve_auto_objective(
                job, model_chunks=self.chunks if resume_from is None else None
            )
            job = job.with_objective(name)
        self.job = job
        loss = ObjectiveLoss(job.loss, compat.data_parallel_group())
        self.head = runtime.loss_head(loss, cpu_backend.device())
        # held-out loss every train.eval_interval steps and at the end
        self.validation = Validation(job, tokenizer, layout) if job.data.val_files else None
        self.log = RunLog(job, self.start_step, self.last_step) if self.is_logger else None

    def _resume(self, job: Job, path: Path) -> int:
        """Load ``path`` (weights, optimizer, data position, RNG); returns its step."""
        model, fingerprint = self.chunks[0].module, lora.run_fingerprint(job.config)
        state = self.checkpoints.load(path, model, self.optimizer, base_fingerprint=fingerprint)
        step = state["step"]
        compat.restore_adam_steps(self.optimizer, step)  # megatron leaves it at 1
        self.loader.load_state_dict(state["data"])
        if self.is_logger:
            logger.info("resumed from %s (step %d/%d)", path, step, self.last_step)
            stopping.record_event(job.output_dir, "resumed", step=step, checkpoint=path)
        return step

    def fit(self) -> dict[str, Any]:
        """The step loop up to the last step or a stop signal; returns the run's summary."""
        t = self.job.train
        self.batches = iter(self.loader)
        step, interrupted = self.start_step, None
        try:
            for step in range(self.start_step + 1, self.last_step + 1):
                self.stopper.step = step
                stats, lr, elapsed = self.step(step)
                # every rank learns whether any rank got a stop signal or a non-finite value
                verdict = self.stopper.boundary(stats, cpu_backend.device())
                if verdict.nonfinite:  # before anything of this step is logged or saved
                    latest = self.checkpoints.latest
                    if self.is_logger:
                        event = {"step": step, "problem": verdict.problem(), "checkpoint": latest}
                        stopping.record_event(self.job.output_dir, "non_finite", **event)
                    runtime.shutdown()
                    raise verdict.error(latest, announce=self.is_logger)
                last = step == self.last_step
                due = self.validation is not None and self.validation.due(step, self.last_step)
                # the val_* metrics on the logger
                val = self.validation(self.chunks, self.head) if due and not verdict.stop else {}
                if self.log is not None:
                    write = step % t.log_interval == 0 or last or verdict.stop or bool(val)
                    self.log.step({**step_record(step, lr, stats, elapsed), **val}, stats.p, write)
                if (t.save_interval and step % t.save_interval == 0) or last or verdict.stop:
                    self.save(step)
                if verdict.stop:
                    latest = str(self.checkpoints.latest)
                    interrupted = {"step": step, "by": verdict.signal_text(), "checkpoint": latest}
                    break
        finally:
            if self.log is not None:
                self.log.close()  # also when a step failed: the progress bar ends its line
        self.stopper.announce = False  # a signal from here on changes nothing
        return self.summary(step, interrupted)

    def step(self, step: int) -> tuple[runtime.StepStats, float, float]:
        """One optimizer step at the scheduled learning rate: (stats, lr, seconds)."""
        t0 = time.perf_counter()
        lr = lr_at(step, self.total_steps, self.job.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        every = self.job.train.histogram_interval
        batch, record_p = next(self.batches), bool(every) and step % every == 0
        stats = runtime.train_step(self.chunks, self.optimizer, self.head, batch, record_p=record_p)
        return stats, lr, time.perf_counter() - t0

    def save(self, step: int) -> Path:
        """The atomic training checkpoint of ``step`` (collective), stop signals deferred."""
        job, peft = self.job, self.job.config.peft
        record = lora.peft_record(peft, lora.run_fingerprint(job.config)) if peft.enabled else None
        with stopping.signals_deferred():
            return self.checkpoints.save(
                step,
                self.chunks[0].module,
                self.optimizer,
                model_config=job.model,
                dtype=job.dtype,
                train_state={
                    "data": self.loader.state_dict(),
                    "total_steps": self.total_steps,
                    "config": job.to_dict(),
                },
                hf_template=job.hf_template,
                peft_record=record,
            )

    def summary(self, step: int, interrupted: dict | None) -> dict[str, Any]:
        """The run's summary; the logger writes ``summary.json`` or records the interruption."""
        job, history = self.job, self.log.history if self.log is not None else []
        summary = {
            "steps": step,
            "total_steps": self.total_steps,
            "output_dir": str(job.output_dir),
            "objective": str(job.loss.objective),
            "objective_evidence": self.objective_evidence,
            "checkpoint": str(self.checkpoints.latest),
            "history": history,
        }
        tokens = sum(r.get("tokens") or 0 for r in history)  # real ones; positions: computed
        positions = sum(r.get("positions") or 0 for r in history)
        if tokens:
            summary.update(
                tokens=tokens, positions=positions, positions_per_token=positions / tokens
            )
        if interrupted is not None:  # no summary.json: the run is not finished
            summary["interrupted"] = interrupted
            if self.is_logger:
                stopping.record_event(job.output_dir, "interrupted", **interrupted)
                logger.info(
                    "interrupted at step %(step)d (%(by)s); checkpoint %(checkpoint)s; resume "
                    "with the same command",
                    interrupted,
                )
        elif self.is_logger:
            atomic_write_json(job.output_dir / "summary.json", summary)
        return summary


def run_length(examples: int, total_steps: int, t, *, announce: bool) -> int:
    """The run's last step, announced in one line; a ``train.max_steps`` beyond the data is
    refused (every rank raises, the ``announce`` one prints)."""
    per_epoch = total_steps / t.epochs
    shape = (
        f"train.epochs={t.epochs} over {examples} examples, train.global_batch_size="
        f"{t.global_batch_size}: {per_epoch:g} steps per epoch"
    )
    if total_steps == 0:
        problem = (
            f"the dataset has {examples} examples, fewer than one global batch "
            f"(train.global_batch_size={t.global_batch_size}); add data or lower "
            "train.global_batch_size"
        )
        raise ConfigError(problem, announce=announce)
    if t.max_steps is not None and t.max_steps > total_steps:
        problem = (
            f"train.max_steps={t.max_steps} is more than the {total_steps} steps the data "
            f"gives ({shape}); set train.epochs={math.ceil(t.max_steps / per_epoch)} to train "
            f"{t.max_steps} steps, or train.max_steps={total_steps} or lower (null: every step "
            "of the epochs)"
        )
        raise ConfigError(problem, announce=announce)
    last_step = t.max_steps or total_steps
    if announce:
        cut = ""
        if last_step < total_steps:
            cut = f" (train.max_steps={t.max_steps}; the schedule spans all {total_steps})"
        logger.info("training %d steps%s: %s", last_step, cut, shape)
    return last_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="probsft train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="recipe YAML (path or name under configs/recipes)")
    verbose = "debug logging, including megatron's own warnings"
    ap.add_argument("-v", "--verbose", action="count", default=0, help=verbose)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")
    args = ap.parse_args(argv)

    def run() -> int:
        summary = train(load_config(args.config, args.overrides))
        # the run is over: a late signal (torchrun's agent ends the other workers with SIGTERM
        # once one has exited) must not cut short this process's own clean exit
        stopping.ignore_stop_signals()
        return stopping.exit_code(summary)  # 75 when a signal stopped it after a save

    return console.run_main(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
