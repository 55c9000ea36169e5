"""`probsft train`: supervised fine-tuning of a Megatron-Core GPT model with any objective.

Run one process per device::

    torchrun --nproc-per-node N -m probsft_megatron.train --config RECIPE [key=value ...]

The whole job reads top to bottom in :func:`train`: config -> process groups -> tokenizer
and data -> model and optimizer (from a converted checkpoint, or resumed) -> the step loop
(schedule, megatron forward/backward with the objective loss, optimizer step, logging,
checkpoints).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from probsft_megatron import checkpoint as ckpt
from probsft_megatron import platform, runtime
from probsft_megatron.config import TrainJobConfig, load_config
from probsft_megatron.errors import ConfigError, ProbsftError
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.loss import ObjectiveLoss, step_loss
from probsft_megatron.model import ModelConfig, transformer_config


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup over ``warmup_ratio * total`` steps, then cosine (or constant) to min_lr."""
    warmup = int(cfg.warmup_ratio * total)
    if step <= warmup and warmup > 0:
        return cfg.lr * step / warmup
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def read_model_dir_config(path: str | Path) -> ModelConfig:
    """The ModelConfig stored in a Megatron model dir (converted or a training checkpoint)."""
    from probsft_megatron.converters.layout import read_model_dir

    return read_model_dir(path).model


def resolve_model(cfg: TrainJobConfig) -> ModelConfig:
    """The checkpoint's own config wins over the recipe's preset when starting from one."""
    if cfg.init.checkpoint is None:
        return cfg.model
    stored = read_model_dir_config(cfg.init.checkpoint)
    if stored.to_dict() != cfg.model.to_dict() and cfg.model.to_dict() != ModelConfig().to_dict():
        diff = sorted(k for k, v in stored.to_dict().items() if cfg.model.to_dict()[k] != v)
        print(f"[probsft] note: using the checkpoint's model config (differs from the recipe's "
              f"model in {', '.join(diff)})", file=sys.stderr)
    return stored


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard) on the logging rank; truncates steps a resume repeats."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, Any], p_values: torch.Tensor | None = None) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
            if p_values is not None and p_values.numel():
                self.tb.add_histogram("train/p", p_values.float(), record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def p_histogram(p: torch.Tensor, bins: int = 20) -> list[int]:
    return torch.histc(p.float(), bins=bins, min=0.0, max=1.0).to(torch.int64).tolist()


def train(cfg: TrainJobConfig) -> dict[str, Any]:
    """Run (or resume) the job described by ``cfg``; returns a summary on every rank."""
    from megatron.core import parallel_state as ps

    from probsft_megatron import probe
    from probsft_megatron.data import GlobalBatchLoader, SFTDataset
    from probsft_megatron.tokenizers import load_tokenizer

    # -- config and process groups ------------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = resolve_model(cfg)
    cfg.model = model_cfg
    dp = cfg.validate(world)
    runtime.init_distributed(cfg.parallel, seed=cfg.train.seed, model=model_cfg)
    dp_rank = ps.get_data_parallel_rank()
    is_logger = (runtime.is_last_stage() and dp_rank == 0
                 and ps.get_tensor_model_parallel_rank() == 0)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto"
                                              and platform.cuda_available())
    device = platform.device()
    torch.manual_seed(cfg.train.seed)

    # -- tokenizer and data -------------------------------------------------------------
    tok_spec = cfg.init.tokenizer or (str(Path(cfg.init.checkpoint) / "hf")
                                      if cfg.init.checkpoint else None)
    if tok_spec is None:
        raise ConfigError("no tokenizer: set init.tokenizer (a folder, or 'smollm2') or "
                          "init.checkpoint (a converted model dir with an hf/ folder)")
    tokenizer = load_tokenizer(tok_spec)
    dataset = SFTDataset(cfg.data, tokenizer)
    loader = GlobalBatchLoader(
        dataset, global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp,
        seq_length=cfg.data.max_length, seed=cfg.train.seed, epochs=cfg.train.epochs,
        packing=cfg.data.packing, pad_id=tokenizer.pad_token_id)
    total_steps = len(loader)
    if total_steps == 0:
        raise ConfigError(f"the dataset has {len(dataset)} examples, fewer than one global batch "
                          f"(train.global_batch_size={cfg.train.global_batch_size})")
    last_step = min(total_steps, cfg.train.max_steps or total_steps)

    # -- model, optimizer, resume -------------------------------------------------------
    tconfig = transformer_config(model_cfg, cfg.parallel,
                                 params_dtype=torch.bfloat16 if bf16 else torch.float32)
    resume_from = ckpt.latest_checkpoint(ckpt_root) if cfg.train.resume else None
    init_weights = None
    if resume_from is None and cfg.init.checkpoint is not None:
        init_weights = str(Path(cfg.init.checkpoint) / "weights")
    o = cfg.optim
    chunks, optimizer = runtime.build_training_model(
        model_cfg, tconfig, lr=o.lr, weight_decay=o.weight_decay,
        adam_betas=(o.adam_beta1, o.adam_beta2), adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        use_distributed_optimizer=o.use_distributed_optimizer and dp > 1,
        load_dir=init_weights, loss_config=cfg.loss,
        attention=cfg.train.attention)
    start_step, history = 0, []
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, chunks[0].module, optimizer)
        start_step = state["step"]
        loader.load_state_dict(state["data"])
        if is_logger:
            print(f"[probsft] resumed from {resume_from} (step {start_step}/{total_steps})",
                  file=sys.stderr)
    objective_evidence = None
    if probe.is_auto(cfg.loss.objective):  # probe the base model (or reuse its result)
        cfg.loss.objective, objective_evidence = probe.resolve_auto_objective(
            cfg, model_chunks=chunks if resume_from is None else None)
    loss = ObjectiveLoss(cfg.loss, dp_group=runtime.dp_group())
    forward_step = runtime.make_forward_step(loss, device)

    # -- the loop -----------------------------------------------------------------------
    writer = None
    if is_logger:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        writer = MetricsWriter(out_dir, start_step, cfg.train.tensorboard)
    progress = None
    if is_logger:
        from tqdm import tqdm

        progress = tqdm(total=last_step, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    batches = iter(loader)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.max_length
    hist_every = cfg.train.histogram_interval
    step = start_step
    for step in range(start_step + 1, last_step + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, total_steps, o)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = next(batches)
        want_hist = bool(hist_every) and step % hist_every == 0
        loss.record_p = want_hist
        stats = runtime.train_step(chunks, optimizer, forward_step, micro_batches,
                                   seq_length=cfg.data.max_length,
                                   micro_batch_size=cfg.train.micro_batch_size)
        p_values = loss.gathered_p() if want_hist and runtime.is_last_stage() else None
        elapsed = time.perf_counter() - t0
        if is_logger:
            record = {"step": step, "loss": step_loss(stats, cfg.loss.normalization), "lr": lr,
                      "grad_norm": stats["grad_norm"], "mean_p": stats["mean_p"],
                      "frac_kept": stats["frac_kept"], "mean_w": stats["mean_w"],
                      "response_tokens": stats["response_tokens"],
                      "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed}
            if "threshold" in stats:
                record["threshold"] = stats["threshold"]
            if p_values is not None:
                record["p_hist"] = p_histogram(p_values)
            history.append(record)
            if step % cfg.train.log_interval == 0 or step == last_step:
                writer.log(record, p_values)
            progress.set_postfix(loss=f"{record['loss']:.4f}", mean_p=f"{stats['mean_p']:.3f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
        save_due = cfg.train.save_interval and step % cfg.train.save_interval == 0
        if save_due or step == last_step:
            ckpt.save_checkpoint(
                ckpt_root, step, chunks[0].module, optimizer,
                model_config=model_cfg, dtype="bfloat16" if bf16 else "float32",
                train_state={"data": loader.state_dict(), "total_steps": total_steps,
                             "config": cfg.to_dict()},
                hf_template=(Path(cfg.init.checkpoint) / "hf") if cfg.init.checkpoint else None,
                keep_last=cfg.train.keep_last)
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    summary = {"steps": step, "total_steps": total_steps, "output_dir": str(out_dir),
               "objective": str(cfg.loss.objective), "objective_evidence": objective_evidence,
               "checkpoint": str(ckpt.latest_checkpoint(ckpt_root)), "history": history}
    if is_logger:
        atomic_write_json(out_dir / "summary.json", summary)
    runtime.shutdown()
    return summary


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="probsft train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="recipe YAML (path or name under configs/recipes)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=4e-5")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except ProbsftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
