"""Process groups (one process per device under torchrun, or one plain process), the model and
optimizer, the loss head and one training step (megatron's schedule: :func:`train_step`)."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron import compat, cpu_backend
from probsft_megatron.config import OptimConfig, ParallelConfig, validate_layout
from probsft_megatron.data.batches import Batch
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import (
    ObjectiveLoss,
    gather_varlen,
    normalizer,
    reduce_stats,
    step_loss,
    token_ce_triple,
)
from probsft_megatron.objectives import resolve_percentile


def init_distributed(
    parallel: ParallelConfig, seed: int = 1234, model=None, timeout_s: float | None = None
) -> int:
    """Check the layout, start torch.distributed (nccl; gloo on CPU) and megatron's groups with
    ``timeout_s`` per collective (None: the defaults); returns the DP size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_layout(parallel, world, model)
    cpu_backend.activate()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a free local port
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if cpu_backend.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=cpu_backend.distributed_backend(), **timeout)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    compat.initialize_model_parallel(tp, pp, timeout_s=timeout_s)
    compat.seed_model_parallel(seed)
    return dp


def shutdown() -> None:
    if dist.is_initialized():
        compat.destroy_model_parallel()
        dist.destroy_process_group()


def is_last_stage() -> bool:
    return compat.is_pipeline_last_stage()


def packed_kwargs(batch: Batch) -> dict:
    """``packed_seq_params`` for a packed (``thd``) batch; nothing otherwise."""
    if batch.cu_seqlens is None:
        return {}
    return {"packed_seq_params": compat.packed_seq_params(batch.cu_seqlens, batch.max_seqlen)}


def batch_shape(micro_batches: list[Batch]) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` the schedule exchanges (one shape for all if PP > 1)."""
    shapes = {tuple(b.tokens.shape) for b in micro_batches}
    rows, seq = max(shapes, key=lambda shape: shape[0] * shape[1])
    if len(shapes) > 1 and compat.rank_position().pp > 1:
        raise ValueError(
            f"pipeline parallelism needs micro-batches of one shape per step, got {sorted(shapes)} "
            "(GlobalBatchLoader(same_length_per_step=True) pads them to the step's longest)"
        )
    return seq, rows


def _output_layer(model) -> tuple[torch.Tensor, dict]:
    """The output weight of a fused-head model's last stage and its TP keyword arguments."""
    from probsft_megatron import fused_head

    gpt = fused_head.unwrap(model)
    layer = gpt.output_layer
    tp = {"tp_group": layer.tp_group, "sequence_parallel": bool(layer.sequence_parallel)}
    return fused_head.output_weight(gpt), tp


def head_loss(
    hidden: torch.Tensor,
    *,
    loss: ObjectiveLoss,
    model,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    threshold=None,
    record_p: bool = False,
):
    """megatron ``loss_func`` of a fused-head model's last stage: hidden states -> loss triple."""
    from probsft_megatron import fused_head
    from probsft_megatron.fused_loss import fused_objective_loss

    if not fused_head.head_is_fused(model):
        raise RuntimeError(
            "loss.implementation='fused' needs a model built with the fused head "
            "(runtime.build_training_model(..., loss_config=...) or "
            "model.build_gpt_model(..., fused_head=True))"
        )
    if bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ConfigError(
            "the data weights some tokens (a conversation message's weight) but "
            "loss.implementation=fused trains every response token with weight 1; "
            "set loss.implementation=unfused"
        )
    weight, tp = _output_layer(model)
    return fused_objective_loss(
        hidden, weight, labels, loss_mask, loss, threshold=threshold, record_p=record_p, **tp
    )


def _fused_token_ce(hidden: torch.Tensor, *, model, batch: Batch, chunk_size: int):
    from probsft_megatron.fused_loss import fused_token_ce

    weight, tp = _output_layer(model)
    ce = fused_token_ce(hidden, weight, batch.labels, batch.loss_mask, chunk_size=chunk_size, **tp)
    return token_ce_triple(ce, batch.loss_mask)


@dataclass(frozen=True)
class LossHead:
    """The loss head (``loss.config.implementation``), maker of megatron's ``forward_step_func``.
    Unfused: the model returns the per-token CE; fused: hidden states for :func:`head_loss`."""

    loss: ObjectiveLoss
    device: Any = "cpu"

    @property
    def fused(self) -> bool:
        return self.loss.config.implementation == "fused"

    def objective(self, model, batch: Batch, threshold, record_p: bool) -> Callable:
        rule = {"loss_mask": batch.loss_mask, "threshold": threshold, "record_p": record_p}
        if self.fused:
            return partial(head_loss, loss=self.loss, model=model, labels=batch.labels, **rule)
        # position_ids: where examples start (normalization=sample)
        return partial(self.loss, position_ids=batch.position_ids, **rule)

    def token_ce(self, model, batch: Batch) -> Callable:
        if self.fused:
            return partial(
                _fused_token_ce, model=model, batch=batch, chunk_size=self.loss.config.chunk_size
            )
        return partial(token_ce_triple, loss_mask=batch.loss_mask)

    def forward_step(
        self, threshold: float | None = None, record_p: bool = False, measure: bool = False
    ) -> Callable:
        """``threshold``: a resolved global percentile (None: the objective's own rule);
        ``record_p``: report the response tokens' p; ``measure``: report each row's CE only."""

        def step(data_iterator: Iterator[Batch], model):
            batch = next(data_iterator).to(self.device)
            inputs = (batch.tokens, batch.position_ids, batch.attention_mask)
            labels = {} if self.fused else {"labels": batch.labels}
            out = model(*inputs, **labels, **packed_kwargs(batch))
            if measure:
                return out, self.token_ce(model, batch)
            return out, self.objective(model, batch, threshold, record_p)

        return step


loss_head = LossHead  # the name the callers know


def _schedule(model_chunks, micro_batches, forward_step_func, shape, forward_only=True):
    """megatron's pipeline schedule; forward only (without autograd) unless told otherwise."""
    with torch.no_grad() if forward_only else nullcontext():
        return compat.get_forward_backward_func()(
            forward_step_func=forward_step_func,
            data_iterator=iter(micro_batches),
            model=model_chunks,
            num_microbatches=len(micro_batches),
            seq_length=shape[0],
            micro_batch_size=shape[1],
            forward_only=forward_only,
        )


def measure_token_ce(
    model_chunks: list, micro_batches: list[Batch], head: LossHead, shape: tuple | None = None
) -> list[torch.Tensor]:
    """Forward only: every row's response-token CE in order on the last stage, ``[]`` elsewhere."""
    shape = shape or batch_shape(micro_batches)
    reports = _schedule(model_chunks, micro_batches, head.forward_step(measure=True), shape)
    if not is_last_stage():
        return []
    return [row for report in reports for row in report["token_ce"]]


def global_threshold(
    model_chunks: list, head: LossHead, micro_batches: list[Batch], shape: tuple[int, int]
) -> tuple[float | None, list[torch.Tensor]]:
    """The global batch's percentile (p over DP; last stage, else None) and the measured rows."""
    rows = measure_token_ce(model_chunks, micro_batches, head, shape)
    if not is_last_stage() or not head.loss.needs_global_threshold:
        return None, rows
    local = torch.exp(-torch.cat(rows)).double() if rows else torch.zeros(0, dtype=torch.float64)
    gathered = gather_varlen(local, head.loss.dp_group)
    return resolve_percentile(gathered, head.loss.objective.threshold.value), rows


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports: every rank the first four (``local_*``: before the DP
    reduction), the last stage also :func:`~probsft_megatron.loss.reduce_stats`'s (else None)."""

    grad_norm: float
    update_successful: bool
    local_loss_finite: bool = True
    local_grads_finite: bool = True
    loss: float | None = None
    loss_sum: float | None = None
    response_tokens: int | None = None
    kept_tokens: int | None = None
    mean_p: float | None = None
    frac_kept: float | None = None
    mean_w: float | None = None
    tokens: int | None = None
    positions: int | None = None
    units: int | None = None
    threshold: float | None = None
    p: torch.Tensor | None = None


@contextmanager
def local_grad_check(model_chunks: list) -> Iterator[list[torch.Tensor]]:
    """Yields a list holding, after the schedule, whether this rank's own gradients were finite
    (checked in ``finalize_model_grads_func`` before its DP reduction spreads one rank's NaN)."""
    config = model_chunks[0].config
    finalize = config.finalize_model_grads_func
    found: list[torch.Tensor] = []

    def check_then_finalize(model, *args, **kwargs):
        found.append(grads_finite(model if isinstance(model, list) else [model]))
        return finalize(model, *args, **kwargs)

    if finalize is not None:
        config.finalize_model_grads_func = check_then_finalize
    try:
        yield found
    finally:
        config.finalize_model_grads_func = finalize
    if not found:
        found.append(grads_finite(model_chunks))


def train_step(
    model_chunks: list,
    optimizer,
    head: LossHead,
    micro_batches: list[Batch],
    *,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    record_p: bool = False,
) -> StepStats:
    """One optimizer step over ``micro_batches`` (a collective); ``record_p``: report their p."""
    shape = (seq_length, micro_batch_size)
    if None in shape:
        shape = batch_shape(micro_batches)
    threshold = None
    if head.loss.needs_global_threshold:
        threshold, _ = global_threshold(model_chunks, head, micro_batches, shape)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    with local_grad_check(model_chunks) as grads_ok:
        step = head.forward_step(threshold, record_p)
        losses = _schedule(model_chunks, micro_batches, step, shape, forward_only=False)
    local_losses = [d["stats"][0] for d in losses if isinstance(d, dict) and "stats" in d]
    update_successful, grad_norm, _ = optimizer.step()
    stats: dict[str, Any] = {}
    if is_last_stage():
        extra = {"tokens": 0, "positions": 0}  # real tokens; positions: computed ones
        for b in micro_batches:
            extra["tokens"] += b.tokens.numel() if b.real_tokens is None else b.real_tokens
            extra["positions"] += b.positions
        stats = reduce_stats(losses, compat.data_parallel_group(), extra=extra)
        if stats:
            stats.update(tokens=int(stats["tokens"]), positions=int(stats["positions"]))
            stats["loss"] = step_loss(stats, head.loss.normalization)
        stats["threshold"] = threshold
    return StepStats(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=bool(update_successful),
        local_loss_finite=not local_losses or bool(torch.isfinite(torch.stack(local_losses)).all()),
        local_grads_finite=bool(grads_ok[0]),
        **stats,
    )


def eval_step(model_chunks: list, head: LossHead, micro_batches: list[Batch]) -> dict:
    """The validation sums of one global batch (forward only; a collective): ``loss_sum``,
    ``count``, ``nll_sum``, ``response_tokens``, ``p_sum`` on the last stage, ``{}`` elsewhere."""
    shape = batch_shape(micro_batches)
    threshold, rows = global_threshold(model_chunks, head, micro_batches, shape)
    losses = _schedule(model_chunks, micro_batches, head.forward_step(threshold), shape)
    if not is_last_stage():
        return {}
    nll = float(torch.cat(rows).double().sum()) if rows else 0.0  # rows: the response tokens
    stats = reduce_stats(losses, compat.data_parallel_group(), extra={"nll_sum": nll})
    return {
        "loss_sum": stats["loss_sum"],
        "count": float(normalizer(stats, head.loss.normalization)),
        "nll_sum": stats["nll_sum"],
        "response_tokens": stats["response_tokens"],
        "p_sum": stats["mean_p"] * stats["response_tokens"],
    }


def grads_finite(model_chunks: list) -> torch.Tensor:
    """Whether every ``main_grad`` (else ``.grad``) is finite, as a 0-dim bool tensor."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    grads = [p.main_grad if getattr(p, "main_grad", None) is not None else p.grad for p in params]
    flags = [torch.isfinite(g).all() for g in grads if g is not None]
    return torch.stack(flags).all() if flags else torch.tensor(True)


LIBRARY_OPTIM = OptimConfig(lr=1e-3, weight_decay=0.0)  # when given none (tests, benchmarks)


def build_training_model(
    model_cfg,
    tconfig,
    optim: OptimConfig | None = None,
    *,
    use_distributed_optimizer: bool = False,
    load_dir: str | None = None,
    loss_config=None,
    attention: str = "sdpa",
    peft=None,
    peft_seed: int = 0,
    **optim_overrides,
):
    """``([ddp_model], optimizer)`` of this rank's stage; ``optim`` fields may be overridden by
    keyword; ``load_dir``: weights loaded before DDP (with ``peft``, LoRA: the base only)."""
    from probsft_megatron.model import build_gpt_model

    optim = dataclasses.replace(optim or LIBRARY_OPTIM, **optim_overrides)
    fused = loss_config is not None and loss_config.implementation == "fused"
    lora = peft is not None and peft.enabled
    gpt = build_gpt_model(
        model_cfg, tconfig, attention=attention, fused_head=fused, peft=peft if lora else None
    ).to(cpu_backend.device())
    if lora:
        from probsft_megatron import lora as lora_mod

        lora_mod.prepare_model(gpt, peft, seed=peft_seed)
        if load_dir is not None:
            lora_mod.load_base_weights(gpt, load_dir)
    elif load_dir is not None:
        load_model_weights(gpt, load_dir)
    ddp = compat.wrap_ddp(
        gpt,
        tconfig,
        use_distributed_optimizer=use_distributed_optimizer,
        grad_reduce_in_fp32=optim.grad_reduce_in_fp32,
    )
    tconfig.finalize_model_grads_func = compat.finalize_model_grads_func()
    optimizer = compat.build_optimizer(
        [ddp], optim, use_distributed_optimizer=use_distributed_optimizer, bf16=bool(tconfig.bf16)
    )
    return [ddp], optimizer


def save_model_weights(model, ckpt_dir: str) -> None:
    """Save a model's weights as a torch_dist checkpoint (collective)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    compat.dist_save(model.sharded_state_dict(), ckpt_dir)


def load_model_weights(model, ckpt_dir: str) -> None:
    """Load a torch_dist checkpoint into ``model`` at this rank's layout (collective)."""
    model.load_state_dict(compat.dist_load(model.sharded_state_dict(), ckpt_dir))
