"""Static memory, byte-exact: one rank's weights, megatron DDP's gradient buffer and the
optimizer state, from the parameters of the real model built on the meta device."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

from probsft_megatron.errors import ConfigError
from probsft_megatron.plan.layout import Layout, Workload, dims, layout_problem

TIED_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class Param:
    """One parameter tensor of one rank, in ``named_parameters()`` order."""

    name: str
    numel: int
    shared_embedding: bool = False  # tied embedding weight on the first / last of PP > 1 stages


def stage_parameters(model, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> list[Param]:
    """The parameters one TP rank of pipeline stage ``pp_rank`` holds, in megatron's
    registration order. With tied embeddings and PP > 1 the first stage's word embedding and
    the last stage's copy are ``shared_embedding`` (a one-process build cannot show it)."""
    if problem := layout_problem(model, tp, pp):
        raise ConfigError(problem)
    first, last = pp_rank == 0, pp_rank == pp - 1
    shared = bool(model.tie_word_embeddings) and pp > 1
    return [
        Param(name, numel // tp if split else numel, shared and name in TIED_WEIGHTS)
        for name, numel, split in _meta_stage(model, pp, first, last)
    ]


@lru_cache(maxsize=64)
def _meta_stage(model, pp: int, first: bool, last: bool) -> tuple[tuple[str, int, bool], ...]:
    """``(name, elements of the whole tensor, split over TP)`` per parameter of one stage."""
    import torch

    from probsft_megatron.config import ParallelConfig
    from probsft_megatron.model import build_gpt_model, transformer_config

    # one stage's layers as a model of its own (a config with PP > 1 would have megatron
    # all-reduce the tied embedding copy between the stages while it builds)
    stage = replace(model, num_layers=model.num_layers // pp)
    with _one_process_megatron() as tp_now:
        # use_cpu_initialization: no device= of its own, so the meta device applies
        config = transformer_config(stage, ParallelConfig(), use_cpu_initialization=True)
        with torch.device("meta"):
            gpt = build_gpt_model(stage, config, pre_process=first, post_process=last)
        out = []
        for name, p in gpt.named_parameters():
            split = bool(getattr(p, "tensor_model_parallel", False))
            out.append((name, p.numel() * (tp_now if split else 1), split))
    return tuple(out)


@contextmanager
def _one_process_megatron():
    """megatron's layers read their TP group from its parallel state: a one-process gloo world
    while a model is built, torn down afterwards (existing groups are used as they are);
    yields the TP size."""
    import torch.distributed as dist

    from probsft_megatron import compat

    if dist.is_initialized() and compat.model_parallel_is_initialized():
        yield compat.rank_position().tp
        return
    own_world = not dist.is_initialized()
    if own_world:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        compat.initialize_model_parallel(1, 1)
        try:
            yield 1
        finally:
            compat.destroy_model_parallel()
    finally:
        if own_world:
            dist.destroy_process_group()


@dataclass
class GradBuffer:
    """megatron DDP's contiguous buffer for one stage: ``buckets`` are ``(start, end)``
    element offsets, ``ranges[i]`` is ``(start, end, bucket)`` of the ``i``-th parameter."""

    numel: int
    numel_unpadded: int
    buckets: list[tuple[int, int]]
    ranges: list[tuple[int, int, int]]

    def shard_numels(self, dp: int, dp_rank: int) -> list[int]:
        """Elements of each parameter in ``dp_rank``'s slice of the buckets (optimizer state)."""
        out = []
        for start, end, b in self.ranges:
            b_start, b_end = self.buckets[b]
            size = (b_end - b_start) // dp
            lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
            out.append(max(0, min(end, hi) - max(start, lo)))
        return out


def _round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def grad_buffer(
    params: list[Param], dp: int = 1, distributed_optimizer: bool = False
) -> GradBuffer:
    """Lay ``params`` out as megatron's ``_ParamAndGradBuffer`` does: in reverse registration
    order; with the distributed optimizer each parameter starts at a multiple of 64, each
    bucket ends at a multiple of ``lcm(dp, 128)`` and a ``shared_embedding`` parameter gets a
    bucket of its own; otherwise one bucket (this project sets no bucket size)."""
    ranges: list[tuple[int, int, int] | None] = [None] * len(params)
    buckets: list[tuple[int, int]] = []
    unpadded = bucket_start = start = end = in_bucket = 0

    def close(bucket_end: int) -> int:
        nonlocal bucket_start, in_bucket, unpadded
        unpadded += bucket_end - bucket_start
        if distributed_optimizer:
            bucket_end = _round_up(bucket_end, math.lcm(dp, 128))
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for i, p in reversed(list(enumerate(params))):
        shared = p.shared_embedding and distributed_optimizer
        if distributed_optimizer:
            start = _round_up(start, 64)
        if shared and in_bucket:
            start = close(start)
        end = start + p.numel
        ranges[i] = (start, end, len(buckets))
        in_bucket += 1
        start = close(end) if shared else end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return GradBuffer(numel, unpadded, buckets, ranges)  # type: ignore[arg-type]


@dataclass
class Static:
    """Byte counts of one rank's weights, gradient buffer and optimizer state."""

    weights: int
    grad_buffer: int
    main_params: int  # float32 copies of non-float32 weights
    adam_moments: int  # exp_avg + exp_avg_sq
    adam_steps: int  # torch Adam's per-tensor step scalar
    largest_shard: int  # elements of the largest parameter (shard) the optimizer steps

    @property
    def optimizer(self) -> int:
        return self.main_params + self.adam_moments + self.adam_steps

    @property
    def total(self) -> int:
        return self.weights + self.grad_buffer + self.optimizer


def lora_parameters(model, layout: Layout, workload: Workload) -> list[Param]:
    """The LoRA adapters one TP rank of a stage holds, in registration order: column-parallel
    ``A [r, in]``, ``B [out/TP, r]``; row-parallel ``A [r, in/TP]``, ``B [out, r]``."""
    d, r, tp = dims(model), workload.lora_rank, layout.tp
    shapes = {
        "linear_qkv": (r * d["h"], (d["q"] + 2 * d["kv"]) // tp * r),
        "linear_proj": (r * d["q"] // tp, d["h"] * r),
        "linear_fc1": (r * d["h"], 2 * d["f"] // tp * r),
        "linear_fc2": (r * d["f"] // tp, d["h"] * r),
    }
    out = []
    for layer in range(model.num_layers // layout.pp):
        for target, (a, b) in shapes.items():
            if target in workload.lora_targets:
                out += [Param(f"{layer}.{target}.lora_A", a), Param(f"{layer}.{target}.lora_B", b)]
    return out


def static_memory(
    model, layout: Layout, workload: Workload, pp_rank: int = 0, dp_rank: int = 0
) -> Static:
    """Exact bytes of weights, gradient buffer and optimizer state on one rank. With LoRA the
    frozen base weights are held outside the buffer; only the adapters have gradients and state."""
    params = stage_parameters(model, layout.tp, layout.pp, pp_rank)
    frozen = 0
    if workload.lora_rank > 0:
        frozen = sum(p.numel for p in params) * workload.param_bytes
        params = lora_parameters(model, layout, workload)
    dist_opt = layout.uses_distributed_optimizer
    buf = grad_buffer(params, layout.dp, dist_opt)
    pb = workload.param_bytes
    weights = (buf.numel if dist_opt else sum(p.numel for p in params)) * pb
    shards = buf.shard_numels(layout.dp, dp_rank) if dist_opt else [p.numel for p in params]
    held = [n for n in shards if n > 0]
    return Static(
        weights=weights + frozen,
        grad_buffer=buf.numel * workload.grad_bytes,
        main_params=sum(held) * 4 if pb != 4 else 0,
        adam_moments=sum(held) * 8,
        adam_steps=len(held) * 4,
        largest_shard=max(held, default=0),
    )
