"""Process-group set-up and the training step, shared by training, probing and tests.

Launch contract: one process per device under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment), or a plain single
process (world size 1, a free local port is chosen). Megatron's groups are laid out
TP-fastest, then DP, then PP (megatron's default order).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from probsft_megatron import compat, platform
from probsft_megatron.loss import ObjectiveLoss, reduce_stats
from probsft_megatron.model import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int = 1234, model=None) -> int:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron's model-parallel groups.

    Validates the layout before any group is created. Returns the data-parallel size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = parallel.validate(world, model)
    platform.activate()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if platform.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=platform.distributed_backend())
    compat.initialize_model_parallel(parallel.tensor_model_parallel_size,
                                     parallel.pipeline_model_parallel_size)
    compat.seed_model_parallel(seed)
    return dp


def shutdown() -> None:
    if dist.is_initialized():
        compat.destroy_model_parallel()
        dist.destroy_process_group()


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


@dataclass
class Batch:
    """One micro-batch on one rank: all tensors ``[b, s]``.

    ``labels[i, t]`` is the token that follows ``tokens[i, t]``; ``loss_mask`` is 1 on
    response tokens. ``attention_mask`` is an optional boolean ``[b, 1, s, s]`` (True =
    masked) used for packed sequences; ``None`` means plain causal attention.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.loss_mask),
                     move(self.position_ids), move(self.attention_mask))


def make_forward_step(loss: ObjectiveLoss, device) -> Callable:
    """megatron ``forward_step_func``: runs the model on the next micro-batch.

    On the last pipeline stage the model returns the per-token CE (vocab-parallel) and the
    returned ``loss_func`` applies the objective; other stages return hidden states. With
    ``loss.config.implementation == "fused"`` the step comes from
    :func:`probsft_megatron.fused_loss.make_forward_step` (the model must have been built
    with that loss config, see :func:`build_training_model`).
    """
    if loss.config.implementation == "fused":
        from probsft_megatron import fused_loss

        return fused_loss.make_forward_step(loss, device)

    def forward_step(data_iterator: Iterator[Batch], model):
        batch = next(data_iterator).to(device)
        out = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)
        return out, partial(loss, loss_mask=batch.loss_mask)

    forward_step.objective_loss = loss
    return forward_step


def train_step(model_chunks: list, optimizer, forward_step: Callable, micro_batches: list[Batch],
               *, seq_length: int, micro_batch_size: int) -> dict[str, Any]:
    """One optimizer step over ``micro_batches`` (gradient accumulation inside megatron's schedule).

    Returns the step's statistics on the last pipeline stage (loss, mean p, fraction kept,
    mean w, counts) and ``grad_norm`` / ``update_successful`` on every rank.
    """
    run = partial(compat.get_forward_backward_func(), forward_step_func=forward_step,
                  model=model_chunks, num_microbatches=len(micro_batches),
                  seq_length=seq_length, micro_batch_size=micro_batch_size)
    loss: ObjectiveLoss | None = getattr(forward_step, "objective_loss", None)
    threshold = None
    if (loss is not None and loss.objective.needs_percentile
            and loss.config.percentile_scope == "global"):
        # Exact global-batch percentile: a forward-only pass collects p on the last stage.
        last = is_last_stage()
        if last:
            loss.start_collecting()
        with torch.no_grad():
            run(data_iterator=iter(micro_batches), forward_only=True)
        if last:
            threshold = loss.finish_collecting()
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run(data_iterator=iter(micro_batches), forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    stats = reduce_stats(losses, dp_group()) if is_last_stage() else {}
    if threshold is not None:
        stats["threshold"] = threshold
    stats.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                 update_successful=bool(update_successful))
    return stats


def build_training_model(model_cfg, tconfig, *, lr: float = 1e-3, weight_decay: float = 0.0,
                         adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                         clip_grad: float = 1.0, use_distributed_optimizer: bool = False,
                         load_dir: str | None = None, loss_config=None,
                         attention: str = "sdpa"):
    """This rank's pipeline stage wrapped in megatron DDP, and megatron's optimizer.

    ``load_dir``: a torch_dist checkpoint of model weights to start from (resharded on load
    to this rank's TP/PP layout), loaded before DDP and the optimizer see the parameters.
    ``loss_config``: with ``implementation="fused"`` the output layer hands its hidden states
    to the fused linear + objective loss instead of computing logits.
    ``attention``: ``sdpa``, ``local``, ``te`` or ``auto`` (see
    :func:`probsft_megatron.model.resolve_attention`). megatron's optimizer picks TE/apex
    fused Adam by itself where they are installed.
    Returns ``([ddp_model], optimizer)``.
    """
    from probsft_megatron.model import build_gpt_model

    gpt = build_gpt_model(model_cfg, tconfig, attention=attention).to(platform.device())
    if loss_config is not None and loss_config.implementation == "fused":
        from probsft_megatron.fused_loss import install_fused_head

        install_fused_head(gpt, loss_config)
    if load_dir is not None:
        load_model_weights(gpt, load_dir)
    ddp = compat.wrap_ddp(gpt, tconfig, use_distributed_optimizer=use_distributed_optimizer)
    tconfig.finalize_model_grads_func = compat.finalize_model_grads_func()
    optimizer = compat.build_optimizer(
        [ddp], lr=lr, weight_decay=weight_decay, adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1], adam_eps=adam_eps, clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer, bf16=bool(tconfig.bf16))
    return [ddp], optimizer


def save_model_weights(model, ckpt_dir: str) -> None:
    """Save a model's weights as a torch_dist checkpoint (collective over all ranks)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    compat.dist_save(model.sharded_state_dict(), ckpt_dir)


def load_model_weights(model, ckpt_dir: str) -> None:
    """Load a torch_dist checkpoint into ``model`` at this rank's layout (collective)."""
    model.load_state_dict(compat.dist_load(model.sharded_state_dict(), ckpt_dir))
