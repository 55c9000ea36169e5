"""Process groups, the model and optimizer, the loss head and one training step; shared by
training, probing and tests.

Launch contract: one process per device under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment), or a plain single
process (world size 1, a free local port is chosen). Megatron's groups are laid out
TP-fastest, then DP, then PP (megatron's default order).

The step (:func:`train_step`) is megatron's ``forward_backward_func`` driven by the run's
:class:`LossHead` (fused or unfused, chosen once by :func:`loss_head`). When the objective's
percentile must be taken over the whole global batch, the step first runs a forward-only
measuring pass with the same head, resolves the threshold on the last pipeline stage, and
trains with it. It returns :class:`StepStats`, its finiteness included.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

__all__ = [
    "Batch",
    "FusedLossHead",
    "LossHead",
    "StepStats",
    "build_training_model",
    "dp_group",
    "eval_step",
    "grads_finite",
    "init_distributed",
    "is_last_stage",
    "load_model_weights",
    "loss_head",
    "measure_token_ce",
    "save_model_weights",
    "shutdown",
    "train_step",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    parallel: ParallelConfig, seed: int = 1234, model=None, timeout_s: float | None = None
) -> int:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron's model-parallel groups.

    Checks the layout against the world size (and ``model``) before any group is created.
    ``timeout_s``: how long every collective (of the default group and of megatron's groups)
    waits for the other ranks before it fails (torch's and megatron's defaults when None).
    Returns the data-parallel size.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = validate_layout(parallel, world, model)
    cpu_backend.activate()
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if cpu_backend.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=cpu_backend.distributed_backend(), **timeout)
    compat.initialize_model_parallel(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        timeout_s=timeout_s,
    )
    compat.seed_model_parallel(seed)
    return dp


def shutdown() -> None:
    if dist.is_initialized():
        compat.destroy_model_parallel()
        dist.destroy_process_group()


def is_last_stage() -> bool:
    return compat.is_pipeline_last_stage()


def dp_group():
    return compat.data_parallel_group()


# -- the loss head -----------------------------------------------------------------------------


def model_inputs(batch: Batch) -> tuple:
    """The positional inputs of a GPT model for ``batch``."""
    return batch.tokens, batch.position_ids, batch.attention_mask


def packed_kwargs(batch: Batch) -> dict:
    """``packed_seq_params`` for a packed (``thd``) batch; nothing otherwise."""
    if batch.cu_seqlens is None:
        return {}
    return {"packed_seq_params": compat.packed_seq_params(batch.cu_seqlens, batch.max_seqlen)}


def batch_shape(micro_batches: list[Batch]) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` the pipeline schedule exchanges: the micro-batches'
    shape, which must be the same for all when stages communicate."""
    shapes = {tuple(b.tokens.shape) for b in micro_batches}
    rows, seq = max(shapes, key=lambda shape: shape[0] * shape[1])
    if len(shapes) > 1 and compat.rank_position().pp > 1:
        raise ValueError(
            f"pipeline parallelism needs micro-batches of one shape per step, got {sorted(shapes)} "
            "(GlobalBatchLoader(same_length_per_step=True) pads them to the step's longest)"
        )
    return seq, rows


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
    """megatron ``loss_func`` of a fused-head model's last stage: hidden states -> the loss
    triple (:func:`probsft_megatron.fused_loss.fused_objective_loss`)."""
    from probsft_megatron import fused_head
    from probsft_megatron.fused_loss import fused_objective_loss

    gpt = fused_head.unwrap(model)
    if not fused_head.head_is_fused(gpt):
        raise RuntimeError(
            "loss.implementation='fused' needs a model built with the fused head "
            "(runtime.build_training_model(..., loss_config=...) or "
            "model.build_gpt_model(..., fused_head=True))"
        )
    layer = gpt.output_layer
    if bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ConfigError(
            "the data weights some tokens (a conversation message's weight) but "
            "loss.implementation=fused trains every response token with weight 1; "
            "set loss.implementation=unfused"
        )
    return fused_objective_loss(
        hidden,
        fused_head.output_weight(gpt),
        labels,
        loss_mask,
        loss,
        tp_group=layer.tp_group,
        sequence_parallel=bool(layer.sequence_parallel),
        threshold=threshold,
        record_p=record_p,
    )


def _fused_token_ce(
    hidden: torch.Tensor, *, model, labels: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int
):
    from probsft_megatron import fused_head
    from probsft_megatron.fused_loss import fused_token_ce

    gpt = fused_head.unwrap(model)
    layer = gpt.output_layer
    ce = fused_token_ce(
        hidden,
        fused_head.output_weight(gpt),
        labels,
        loss_mask,
        tp_group=layer.tp_group,
        sequence_parallel=bool(layer.sequence_parallel),
        chunk_size=chunk_size,
    )
    return token_ce_triple(ce, loss_mask)


@dataclass(frozen=True)
class LossHead:
    """The run's loss at the end of the model, chosen once (:func:`loss_head`).

    It makes megatron's ``forward_step_func`` (:meth:`forward_step`): run the model on the
    next micro-batch and return its output with the ``loss_func`` the schedule applies on
    the last pipeline stage, either the objective (training, validation) or each response
    token's CE (measuring: a global percentile, the probe). This class is the unfused head:
    the model gets the labels and returns megatron's per-token vocab-parallel CE, which
    ``loss`` maps to the objective. :class:`FusedLossHead` is the other one.
    """

    loss: ObjectiveLoss
    device: Any = "cpu"

    def model_kwargs(self, batch: Batch) -> dict:
        return {"labels": batch.labels}

    def objective(self, model, batch: Batch, threshold, record_p: bool) -> Callable:
        return partial(
            self.loss,
            loss_mask=batch.loss_mask,
            threshold=threshold,
            record_p=record_p,
            position_ids=batch.position_ids,  # where examples start (normalization=sample)
        )

    def token_ce(self, model, batch: Batch) -> Callable:
        return partial(token_ce_triple, loss_mask=batch.loss_mask)

    def forward_step(
        self, threshold: float | None = None, record_p: bool = False, measure: bool = False
    ) -> Callable:
        """megatron's ``forward_step_func``. ``threshold``: an absolute percentile threshold
        resolved over the global batch (None: the objective's own rule); ``record_p``: each
        micro-batch also reports its response tokens' p; ``measure``: report each row's
        response-token CE (:func:`~probsft_megatron.loss.token_ce_triple`), train nothing."""

        def step(data_iterator: Iterator[Batch], model):
            batch = next(data_iterator).to(self.device)
            out = model(*model_inputs(batch), **self.model_kwargs(batch), **packed_kwargs(batch))
            if measure:
                return out, self.token_ce(model, batch)
            return out, self.objective(model, batch, threshold, record_p)

        return step


class FusedLossHead(LossHead):
    """The fused head: the model (built with the fused head) returns hidden states, and
    :func:`head_loss` computes the fused linear + objective loss without full logits."""

    def model_kwargs(self, batch: Batch) -> dict:
        return {}

    def objective(self, model, batch: Batch, threshold, record_p: bool) -> Callable:
        return partial(
            head_loss,
            loss=self.loss,
            model=model,
            labels=batch.labels,
            loss_mask=batch.loss_mask,
            threshold=threshold,
            record_p=record_p,
        )

    def token_ce(self, model, batch: Batch) -> Callable:
        return partial(
            _fused_token_ce,
            model=model,
            labels=batch.labels,
            loss_mask=batch.loss_mask,
            chunk_size=self.loss.config.chunk_size,
        )


def loss_head(loss: ObjectiveLoss, device: Any = "cpu") -> LossHead:
    """The loss head of ``loss.config.implementation`` (``fused`` or ``unfused``)."""
    return (FusedLossHead if loss.config.implementation == "fused" else LossHead)(loss, device)


def _schedule(model_chunks, micro_batches, forward_step_func, *, forward_only, shape):
    """megatron's pipeline schedule over ``micro_batches``; returns the losses it collected."""
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
    """Forward-only pass over ``micro_batches`` (megatron's schedule, a collective over the
    pipeline); returns every row's response-token CE in micro-batch and row order on the last
    pipeline stage, ``[]`` on other stages. ``shape``: ``(seq_length, micro_batch_size)``,
    default :func:`batch_shape` of ``micro_batches``."""
    shape = shape or batch_shape(micro_batches)
    with torch.no_grad():
        reports = _schedule(
            model_chunks,
            micro_batches,
            head.forward_step(measure=True),
            forward_only=True,
            shape=shape,
        )
    if not is_last_stage():
        return []
    return [row for report in reports for row in report["token_ce"]]


def global_threshold(
    model_chunks: list, head: LossHead, micro_batches: list[Batch], shape: tuple[int, int]
) -> tuple[float | None, list[torch.Tensor]]:
    """The objective's percentile over the response tokens of the whole global batch (all
    micro-batches, all DP ranks): a forward-only measuring pass, then the percentile of the
    gathered p on the last stage. Returns it (None on other stages, which do not need it, and
    for an objective without a global percentile) and the measured rows."""
    rows = measure_token_ce(model_chunks, micro_batches, head, shape)
    if not is_last_stage() or not head.loss.needs_global_threshold:
        return None, rows
    local = (
        torch.exp(-torch.cat(rows)).to(torch.float64)
        if rows
        else torch.zeros(0, dtype=torch.float64)
    )
    threshold = resolve_percentile(
        gather_varlen(local, head.loss.dp_group), head.loss.objective.threshold.value
    )
    return threshold, rows


# -- the training step -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports.

    Every rank: ``grad_norm``, ``update_successful``, ``local_loss_finite`` and
    ``local_grads_finite`` (whether this rank's own loss sums and gradients were all finite
    before the data-parallel reduction mixed them with the other ranks').
    The last pipeline stage (where the loss is computed; None elsewhere): ``loss`` (global
    loss sum / global normalizer, :func:`~probsft_megatron.loss.step_loss`),
    ``loss_sum``, ``response_tokens``, ``kept_tokens``, ``mean_p``, ``frac_kept``,
    ``mean_w``, ``tokens`` (non-padding tokens of the global batch), ``positions`` (positions
    computed for the global batch, padding included), ``units`` (examples or turns with a
    trained token, the normalizer of ``loss.normalization=sample``),
    ``threshold`` (a global-batch percentile threshold, when one was resolved) and
    ``p`` (the response tokens' p of the global batch, when asked for with ``record_p``).
    """

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

    @property
    def has_loss(self) -> bool:
        """Whether this rank holds the step's loss statistics (last pipeline stage)."""
        return self.loss_sum is not None


@contextmanager
def local_grad_check(model_chunks: list) -> Iterator[list[torch.Tensor]]:
    """Yields a list that holds, once the schedule has run, whether this rank's own
    gradients were all finite (a 0-dim bool tensor, no host synchronization).

    megatron's ``finalize_model_grads_func`` reduces the gradients over the data-parallel
    ranks, after which one rank's NaN is on every rank: only before it can a non-finite
    gradient be traced to the rank that produced it. For the duration of the block the
    function is wrapped to look first; a model without one is checked after the schedule.
    """
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
    """One optimizer step over ``micro_batches`` (gradient accumulation inside megatron's
    schedule); a collective over the whole job.

    An objective that needs a global-batch percentile gets it first (:func:`global_threshold`);
    ``record_p`` asks for the response tokens' p. ``seq_length``/``micro_batch_size`` (what
    pipeline stages exchange): default :func:`batch_shape` of ``micro_batches`` (dynamic
    padding and packing change it per step).
    """
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
        losses = _schedule(
            model_chunks,
            micro_batches,
            head.forward_step(threshold, record_p),
            forward_only=False,
            shape=shape,
        )
    local_losses = [d["stats"][0] for d in losses if isinstance(d, dict) and "stats" in d]
    update_successful, grad_norm, _ = optimizer.step()
    stats: dict[str, Any] = {}
    if is_last_stage():
        real = sum(
            b.tokens.numel() if b.real_tokens is None else b.real_tokens for b in micro_batches
        )
        positions = sum(b.positions for b in micro_batches)
        stats = reduce_stats(losses, dp_group(), extra={"tokens": real, "positions": positions})
        if stats:
            stats["tokens"] = int(stats["tokens"])
            stats["positions"] = int(stats["positions"])
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
    """The validation loss of one global batch: forward only, no gradient, nothing updated; a
    collective over the whole job like :func:`train_step`.

    One measuring pass gives every response token's CE (the plain NLL, and the global-batch
    percentile when the objective needs one); a second runs the objective (its
    normalization) over the same micro-batches. Both are summed over micro-batches and DP
    ranks. Returns on the last pipeline stage ``loss_sum`` (objective), ``count`` (its
    normalizer), ``nll_sum``, ``response_tokens``, ``p_sum`` (summable over several batches);
    ``{}`` on other stages.
    """
    shape = batch_shape(micro_batches)
    threshold, rows = global_threshold(model_chunks, head, micro_batches, shape)
    with torch.no_grad():
        losses = _schedule(
            model_chunks,
            micro_batches,
            head.forward_step(threshold),
            forward_only=True,
            shape=shape,
        )
    if not is_last_stage():
        return {}
    ce = torch.cat(rows).to(torch.float64) if rows else torch.zeros(0, dtype=torch.float64)
    nll = torch.stack([ce.sum(), torch.tensor(float(ce.numel()), dtype=torch.float64)])
    group = dp_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(nll, group=group)
    stats = reduce_stats(losses, group)
    return {
        "loss_sum": stats["loss_sum"],
        "count": float(normalizer(stats, head.loss.normalization)),
        "nll_sum": float(nll[0]),
        "response_tokens": int(nll[1]),
        "p_sum": stats["mean_p"] * stats["response_tokens"],
    }


def grads_finite(model_chunks: list) -> torch.Tensor:
    """Whether every gradient of ``model_chunks`` (megatron DDP's ``main_grad``, else
    ``.grad``) is finite, as a 0-dim bool tensor on the gradients' device."""
    flags = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                flags.append(torch.isfinite(grad).all())
    return torch.stack(flags).all() if flags else torch.tensor(True)


# -- model and optimizer -----------------------------------------------------------------------

LIBRARY_OPTIM = OptimConfig(lr=1e-3, weight_decay=0.0)
"""The optimizer settings :func:`build_training_model` starts from when given none (tests and
benchmarks); training passes its job's ``optim`` section."""


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
    """This rank's pipeline stage wrapped in megatron DDP, and megatron's optimizer.

    ``optim``: the optimizer settings (default :data:`LIBRARY_OPTIM`); keyword overrides of
    its fields (``lr=...``, ``weight_decay=...``) apply on top.
    ``grad_reduce_in_fp32`` of those settings configures DDP's gradient buffers.
    ``load_dir``: a torch_dist checkpoint of model weights to start from (resharded on load
    to this rank's TP/PP layout), loaded before DDP and the optimizer see the parameters.
    ``loss_config``: with ``implementation="fused"`` the model is built with the fused head
    (the output layer hands its hidden states to the fused linear + objective loss).
    ``peft`` (a :class:`~probsft_megatron.config.PeftConfig` with ``method: lora``): LoRA
    adapters on the target linears, initialized from ``peft_seed`` independently of the
    layout, and every other parameter frozen before DDP (no gradient buffer, no optimizer
    state for them); ``load_dir`` then holds the base model (adapters are not read from it).
    ``attention``: ``sdpa``, ``local``, ``te`` or ``auto`` (see
    :func:`probsft_megatron.config.resolve_attention`). megatron's optimizer picks TE/apex
    fused Adam by itself where they are installed.
    Returns ``([ddp_model], optimizer)``.
    """
    from probsft_megatron.model import build_gpt_model

    optim = optim or LIBRARY_OPTIM
    optim = dataclasses.replace(optim, **optim_overrides)
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
    """Save a model's weights as a torch_dist checkpoint (collective over all ranks)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    compat.dist_save(model.sharded_state_dict(), ckpt_dir)


def load_model_weights(model, ckpt_dir: str) -> None:
    """Load a torch_dist checkpoint into ``model`` at this rank's layout (collective)."""
    model.load_state_dict(compat.dist_load(model.sharded_state_dict(), ckpt_dir))
