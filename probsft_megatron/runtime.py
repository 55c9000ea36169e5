"""Process groups, the model and optimizer, and one training step; shared by training,
probing and tests.

Launch contract: one process per device under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment), or a plain single
process (world size 1, a free local port is chosen). Megatron's groups are laid out
TP-fastest, then DP, then PP (megatron's default order).

The step (:func:`train_step`) is megatron's ``forward_backward_func`` driven by a
:class:`ForwardStep`: an immutable value that runs the model on the next micro-batch and
returns megatron's ``loss_func`` for the objective. When the objective's percentile must be
taken over the whole global batch, the step first runs a forward-only pass with a
:class:`MeasureStep` (each micro-batch reports its response tokens' CE), resolves the
threshold on the last pipeline stage, and trains with ``ForwardStep(..., threshold=q)``.
It returns :class:`StepStats`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
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
    reduce_stats,
    step_loss,
    token_ce_triple,
)
from probsft_megatron.objectives import resolve_percentile

__all__ = [
    "Batch",
    "ForwardStep",
    "MeasureStep",
    "GradCheck",
    "StepStats",
    "build_training_model",
    "dp_group",
    "eval_step",
    "grads_finite",
    "init_distributed",
    "is_last_stage",
    "load_model_weights",
    "make_forward_step",
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


# -- the forward step --------------------------------------------------------------------------


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
    if len(shapes) > 1 and compat.layout().pp > 1:
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


@dataclass(frozen=True)
class ForwardStep:
    """megatron's ``forward_step_func`` for one objective.

    Runs the model on the next micro-batch and returns its output with the ``loss_func`` the
    schedule applies on the last pipeline stage. Unfused (``loss.config.implementation``):
    the model gets the labels and returns the per-token vocab-parallel CE, and the loss is
    ``loss(ce, mask, threshold, record_p)``. Fused: the model (built with the fused head)
    returns hidden states and :func:`head_loss` computes the fused linear + objective loss.

    ``threshold``: an absolute percentile threshold resolved by :func:`train_step` over the
    global batch; None applies the objective's own rule (see
    :meth:`~probsft_megatron.loss.ObjectiveLoss.default_threshold`). ``record_p``: every
    micro-batch also reports its response tokens' p (for a histogram).
    """

    loss: ObjectiveLoss
    device: Any = "cpu"
    threshold: float | None = None
    record_p: bool = False

    def __call__(self, data_iterator: Iterator[Batch], model):
        batch = next(data_iterator).to(self.device)
        if self.loss.config.implementation == "fused":
            out = model(*model_inputs(batch), **packed_kwargs(batch))
            return out, partial(
                head_loss,
                loss=self.loss,
                model=model,
                labels=batch.labels,
                loss_mask=batch.loss_mask,
                threshold=self.threshold,
                record_p=self.record_p,
            )
        out = model(*model_inputs(batch), labels=batch.labels, **packed_kwargs(batch))
        return out, partial(
            self.loss,
            loss_mask=batch.loss_mask,
            threshold=self.threshold,
            record_p=self.record_p,
            position_ids=batch.position_ids,  # where examples start (normalization=sample)
        )


def make_forward_step(loss: ObjectiveLoss, device) -> ForwardStep:
    """The :class:`ForwardStep` of ``loss`` on ``device``."""
    return ForwardStep(loss, device)


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
class MeasureStep:
    """``forward_step_func`` of a forward-only measurement: each micro-batch reports its
    rows' response-token CE (:func:`~probsft_megatron.loss.token_ce_triple`) and trains
    nothing. ``implementation``: the model's head (``unfused``: megatron's vocab-parallel
    CE; ``fused``: the fused head's chunked CE, ``chunk_size`` tokens at a time)."""

    device: Any = "cpu"
    implementation: str = "unfused"
    chunk_size: int = 4096

    def __call__(self, data_iterator: Iterator[Batch], model):
        batch = next(data_iterator).to(self.device)
        if self.implementation == "fused":
            out = model(*model_inputs(batch), **packed_kwargs(batch))
            return out, partial(
                _fused_token_ce,
                model=model,
                labels=batch.labels,
                loss_mask=batch.loss_mask,
                chunk_size=self.chunk_size,
            )
        out = model(*model_inputs(batch), labels=batch.labels, **packed_kwargs(batch))
        return out, partial(token_ce_triple, loss_mask=batch.loss_mask)


def measure_token_ce(
    model_chunks: list,
    micro_batches: list[Batch],
    step: MeasureStep,
    *,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> list[torch.Tensor]:
    """Forward-only pass over ``micro_batches`` (megatron's schedule, a collective over the
    pipeline); returns every row's response-token CE in micro-batch and row order on the last
    pipeline stage, ``[]`` on other stages. ``seq_length``/``micro_batch_size``: default
    :func:`batch_shape` of ``micro_batches``."""
    if seq_length is None or micro_batch_size is None:
        seq_length, micro_batch_size = batch_shape(micro_batches)
    with torch.no_grad():
        reports = compat.get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=model_chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    if not is_last_stage():
        return []
    return [row for report in reports for row in report["token_ce"]]


# -- the training step -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step reports.

    Every rank: ``grad_norm``, ``update_successful``, ``local_loss_finite`` and
    ``local_grads_finite`` (whether this rank's own loss sums and gradients were all finite
    before the data-parallel reduction mixed them with the other ranks'; the gradients are
    checked when the model comes from :func:`build_training_model`, else reported finite).
    The last pipeline stage (where the loss is computed; None elsewhere): ``loss`` (global
    loss sum / global normalizer count), ``loss_sum``, ``response_tokens``, ``kept_tokens``,
    ``mean_p``, ``frac_kept``, ``mean_w``, ``tokens`` (non-padding tokens of the global
    batch), ``positions`` (positions computed for the global batch, padding included),
    ``units`` (examples or turns with a trained token, the normalizer of
    ``loss.normalization=sample``),
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


def global_threshold(
    model_chunks: list,
    step: ForwardStep,
    micro_batches: list[Batch],
    *,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
) -> float | None:
    """The objective's percentile over the response tokens of the whole global batch (all
    micro-batches, all DP ranks): a forward-only measurement pass, then the percentile of
    the gathered p on the last stage (None on other stages, which do not need it)."""
    measure = MeasureStep(step.device, step.loss.config.implementation, step.loss.config.chunk_size)
    rows = measure_token_ce(
        model_chunks,
        micro_batches,
        measure,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    if not is_last_stage():
        return None
    local = (
        torch.exp(-torch.cat(rows)).to(torch.float64)
        if rows
        else torch.zeros(0, dtype=torch.float64)
    )
    return resolve_percentile(
        gather_varlen(local, step.loss.dp_group), step.loss.objective.threshold.value
    )


def train_step(
    model_chunks: list,
    optimizer,
    forward_step: Callable,
    micro_batches: list[Batch],
    *,
    seq_length: int | None = None,
    micro_batch_size: int | None = None,
    record_p: bool = False,
) -> StepStats:
    """One optimizer step over ``micro_batches`` (gradient accumulation inside megatron's
    schedule); a collective over the whole job.

    ``forward_step``: a :class:`ForwardStep` (or any megatron ``forward_step_func``, which is
    run as it is). A ForwardStep whose objective needs a global-batch percentile gets it
    resolved first (:func:`global_threshold`); ``record_p`` asks for the response tokens' p.
    ``seq_length``/``micro_batch_size`` (what pipeline stages exchange): default
    :func:`batch_shape` of ``micro_batches`` (dynamic padding and packing change it per step).
    """
    if seq_length is None or micro_batch_size is None:
        seq_length, micro_batch_size = batch_shape(micro_batches)
    run = partial(
        compat.get_forward_backward_func(),
        model=model_chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    threshold = None
    normalization = None
    if isinstance(forward_step, ForwardStep):
        normalization = forward_step.loss.normalization
        if forward_step.threshold is None and forward_step.loss.needs_global_threshold:
            threshold = global_threshold(
                model_chunks,
                forward_step,
                micro_batches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
            )
            forward_step = dataclasses.replace(forward_step, threshold=threshold)
        if record_p:
            forward_step = dataclasses.replace(forward_step, record_p=True)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    grad_check = getattr(
        getattr(model_chunks[0], "config", None), "finalize_model_grads_func", None
    )
    if isinstance(grad_check, GradCheck):
        grad_check.local_finite = None
    losses = run(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), forward_only=False
    )
    local_grads_finite = True
    if isinstance(grad_check, GradCheck) and grad_check.local_finite is not None:
        local_grads_finite = bool(grad_check.local_finite)
    local_losses = [d["stats"][0] for d in losses if isinstance(d, dict) and "stats" in d]
    local_loss_finite = not local_losses or bool(torch.isfinite(torch.stack(local_losses)).all())
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
            if normalization is not None:
                stats["loss"] = step_loss(stats, normalization)
        stats["threshold"] = threshold
    return StepStats(
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=bool(update_successful),
        local_loss_finite=local_loss_finite,
        local_grads_finite=local_grads_finite,
        **stats,
    )


def eval_step(model_chunks: list, forward_step: ForwardStep, micro_batches: list[Batch]) -> dict:
    """The validation loss of one global batch: forward only, no gradient, nothing updated; a
    collective over the whole job like :func:`train_step`.

    One measuring pass gives every response token's CE (the plain NLL, and the global-batch
    percentile when the objective needs one); a second runs ``forward_step`` (the training
    objective, its normalization) over the same micro-batches. Both are summed over
    micro-batches and DP ranks. Returns on the last pipeline stage ``loss_sum`` (objective),
    ``count`` (its normalizer), ``nll_sum``, ``response_tokens``, ``p_sum`` (summable over
    several batches); ``{}`` on other stages.
    """
    seq_length, micro_batch_size = batch_shape(micro_batches)
    shape = {"seq_length": seq_length, "micro_batch_size": micro_batch_size}
    measure = MeasureStep(
        forward_step.device,
        forward_step.loss.config.implementation,
        forward_step.loss.config.chunk_size,
    )
    rows = measure_token_ce(model_chunks, micro_batches, measure, **shape)
    threshold = forward_step.threshold
    if is_last_stage():
        ce = torch.cat(rows).to(torch.float64) if rows else torch.zeros(0, dtype=torch.float64)
        if threshold is None and forward_step.loss.needs_global_threshold:
            threshold = resolve_percentile(
                gather_varlen(torch.exp(-ce), forward_step.loss.dp_group),
                forward_step.loss.objective.threshold.value,
            )
    step = dataclasses.replace(forward_step, threshold=threshold, record_p=False)
    with torch.no_grad():
        losses = compat.get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(micro_batches),
            model=model_chunks,
            num_microbatches=len(micro_batches),
            forward_only=True,
            **shape,
        )
    if not is_last_stage():
        return {}
    nll = torch.stack([ce.sum(), torch.tensor(float(ce.numel()), dtype=torch.float64)])
    group = dp_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(nll, group=group)
    stats = reduce_stats(losses, group)
    normalization = forward_step.loss.normalization
    count = {"kept": stats["kept_tokens"], "sample": stats["units"]}.get(
        normalization, stats["response_tokens"]
    )
    return {
        "loss_sum": stats["loss_sum"],
        "count": float(count),
        "nll_sum": float(nll[0]),
        "response_tokens": int(nll[1]),
        "p_sum": stats["mean_p"] * stats["response_tokens"],
    }


class GradCheck:
    """megatron's ``finalize_model_grads_func``, noting first whether this rank's own
    gradients are all finite.

    ``finalize`` reduces the gradients over the data-parallel ranks, after which a NaN of one
    rank is on every rank: only before it can a non-finite gradient be traced to the rank
    that produced it. :func:`build_training_model` installs it; :func:`train_step` reads
    ``local_finite`` (a bool tensor, set without a host synchronization) into
    :attr:`StepStats.local_grads_finite`.
    """

    def __init__(self, finalize: Callable) -> None:
        self.finalize = finalize
        self.local_finite: torch.Tensor | None = None

    def __call__(self, model, *args, **kwargs):
        self.local_finite = grads_finite(model if isinstance(model, list) else [model])
        return self.finalize(model, *args, **kwargs)


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

_LEGACY_OPTIM_KEYS = {"adam_betas": ("adam_beta1", "adam_beta2")}


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
    its fields (``lr=...``, ``weight_decay=...``, ``adam_betas=(b1, b2)``) apply on top.
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
    for key, value in optim_overrides.items():
        names = _LEGACY_OPTIM_KEYS.get(key)
        optim = dataclasses.replace(optim, **(dict(zip(names, value)) if names else {key: value}))
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
    tconfig.finalize_model_grads_func = GradCheck(compat.finalize_model_grads_func())
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
