"""What the logging rank records: one flat record per step (:func:`step_record`, plus ``val_*``
keys), written by :class:`RunLog` to ``metrics.jsonl``, TensorBoard, W&B and a progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from probsft_megatron.fileio import atomic_write_json

VAL_PREFIX = "val_"


def step_record(step: int, lr: float, stats, elapsed: float) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` from a step's StepStats (``positions``: padding included)."""
    keys = ("grad_norm", "mean_p", "frac_kept", "mean_w", "response_tokens", "tokens", "positions")
    record = {"step": step, "loss": stats.loss, "lr": lr} | {k: getattr(stats, k) for k in keys}
    record.update(
        positions_per_token=stats.positions / max(stats.tokens, 1),
        tokens_per_s=stats.tokens / elapsed,
        padded_tokens_per_s=stats.positions / elapsed,
        step_time_s=elapsed,
    )
    if stats.threshold is not None:
        record["threshold"] = stats.threshold
    if getattr(stats, "units", None):  # loss.normalization=sample: examples (or turns) averaged
        record["units"] = stats.units
    if stats.p is not None:  # 20 bins over [0, 1]
        record["p_hist"] = torch.histc(stats.p.float(), 20, 0.0, 1.0).to(torch.int64).tolist()
    return record


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers as ``train/<key>`` and ``val/<key>`` (``val_loss`` -> ``val/loss``)."""
    return {
        (f"val/{k[len(VAL_PREFIX) :]}" if k.startswith(VAL_PREFIX) else f"train/{k}"): v
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class RunLog:
    """The logging rank's sinks: ``config.json``, ``metrics.jsonl`` (a resume first drops the
    steps it repeats), TensorBoard, W&B and the progress bar."""

    def __init__(self, job, start_step: int, last_step: int) -> None:
        from tqdm import tqdm

        out_dir = job.output_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", job.to_dict(), default=str)
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if job.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.wandb = None
        if job.train.wandb_project:
            import wandb

            self.wandb = wandb.init(
                project=job.train.wandb_project,
                mode=job.train.wandb_mode,
                name=out_dir.name,
                dir=None if os.environ.get("WANDB_DIR") else str(out_dir),
                config=json.loads(json.dumps(job.to_dict(), default=str)),
            )
        self.progress = tqdm(
            total=last_step,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.history: list[dict[str, Any]] = []

    def step(self, record: dict[str, Any], p_values: torch.Tensor | None, write: bool) -> None:
        self.history.append(record)
        if write:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.tb is not None:
                for name, value in scalars(record).items():
                    self.tb.add_scalar(name, value, record["step"])
                if p_values is not None and p_values.numel():
                    self.tb.add_histogram("train/p", p_values.float(), record["step"])
            if self.wandb is not None:
                self.wandb.log(scalars(record), step=record["step"])
        postfix = {
            "loss": f"{record['loss']:.4f}",
            "mean_p": f"{record['mean_p']:.3f}",
            "tok_s": f"{record['tokens_per_s']:.0f}",
        }
        if VAL_PREFIX + "loss" in record:
            postfix["val_loss"] = f"{record[VAL_PREFIX + 'loss']:.4f}"
        self.progress.set_postfix(**postfix)
        self.progress.update(1)

    def close(self) -> None:
        self.progress.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
