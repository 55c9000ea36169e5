"""The layout search: the layout a config asks for, the layouts from the cheapest, the
first that fits, and the one-line verdict ``probsft train`` / ``probsft launch`` use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probsft_megatron.errors import ConfigError
from probsft_megatron.plan.estimate import DEFAULT_MARGIN_GIB, Estimate, estimate
from probsft_megatron.plan.layout import GiB, Layout, Workload, layout_problem

DEFAULT_GPU_MEMORY_GB = 80.0
DEFAULT_GPUS_PER_NODE = 8
if TYPE_CHECKING:
    from probsft_megatron.config import TrainJobConfig

OVERRIDE_FLAG = "--no-fit-check"
"""How a user overrides a refused layout in ``probsft train`` / ``probsft launch``."""
NO_FIT_HINT = (
    "add GPUs, lower train.micro_batch_size or data.max_length, or use loss.implementation=fused"
)


def layout_of(cfg: TrainJobConfig, world_size: int) -> Layout:
    """The layout ``cfg`` asks for on ``world_size`` GPUs (recompute method and layers count
    only with ``recompute_granularity: full``)."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ConfigError(
            f"TP*PP = {tp}*{pp} does not divide the {world_size} GPUs; change "
            "parallel.tensor_model_parallel_size / pipeline_model_parallel_size "
            "or the number of GPUs"
        )
    full = par.recompute_granularity == "full"
    return Layout(
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        sequence_parallel=par.sequence_parallel,
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
        recompute=par.recompute_granularity,
        recompute_method=par.recompute_method if full else None,
        recompute_num_layers=par.recompute_num_layers if full else None,
    )


def workload_of(cfg: TrainJobConfig, device: str = "cuda") -> Workload:
    """The per-step workload of ``cfg`` on a ``device`` (``cuda``: ``precision=auto`` is
    bf16; ``cpu``: fp32, CPU kernels, torch's single-tensor Adam)."""
    auto = "bf16" if device == "cuda" else "fp32"
    precision = auto if cfg.train.precision == "auto" else cfg.train.precision
    attention = cfg.train.attention if cfg.train.attention in ("local", "te") else "sdpa"
    return Workload(
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.data.max_length,
        global_batch_size=cfg.train.global_batch_size,
        params_dtype=precision,
        grad_reduce_in_fp32=cfg.optim.grad_reduce_in_fp32,
        loss_implementation=cfg.loss.implementation,
        chunk_size=cfg.loss.chunk_size,
        attention=attention,
        packing=cfg.data.packing,
        kernels=device,
        adam="foreach" if device == "cuda" else "single",
        lora_rank=cfg.peft.rank if cfg.peft.enabled else 0,
        lora_targets=tuple(cfg.peft.target_modules) if cfg.peft.enabled else (),
    )


@dataclass
class Candidate:
    layout: Layout
    estimate: Estimate | None  # None: the layout is not possible
    reason: str  # why it does not fit / is impossible ("" when it fits)

    @property
    def fits(self) -> bool:
        return self.estimate is not None and not self.reason


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(
    model, world_size: int, gpus_per_node: int, distributed_optimizer: bool = True
) -> list[Layout]:
    """Layouts from the cheapest: recompute last (none, selective, full/block with 1, 2, ...
    layers, full/uniform/1); for each, PP ascending and TP ascending within a node."""
    splits = [  # (PP, TP) ascending: the divisors come in ascending order
        (tp, pp, world_size // (tp * pp))
        for pp in _divisors(world_size)
        for tp in _divisors(world_size // pp)
        if tp <= gpus_per_node
    ]
    full = [("block", n) for n in range(1, model.num_layers + 1)] + [("uniform", 1)]
    recomputes = [{}, {"recompute": "selective"}] + [
        {"recompute": "full", "recompute_method": m, "recompute_num_layers": n} for m, n in full
    ]
    return [
        Layout(
            tp, pp, dp, sequence_parallel=tp > 1, distributed_optimizer=distributed_optimizer, **r
        )
        for r in recomputes
        for tp, pp, dp in splits
        if r.get("recompute_num_layers", 0) <= model.num_layers // pp
    ]


def evaluate(
    model,
    layout: Layout,
    workload: Workload,
    gpu_memory_gb: float,
    margin_gib: float = DEFAULT_MARGIN_GIB,
) -> Candidate:
    """One layout: possible? fits? (with the reason when not)."""
    if problem := layout_problem(model, layout.tp, layout.pp):
        return Candidate(layout, None, problem)
    gbs, mbs = workload.global_batch_size, workload.micro_batch_size
    if gbs is not None and gbs % (mbs * layout.dp):
        why = f"is not a multiple of micro batch x DP = {mbs}x{layout.dp}"
        return Candidate(layout, None, f"train.global_batch_size={gbs} {why}")
    try:
        est = estimate(model, layout, workload, margin_gib)
    except ConfigError as exc:
        return Candidate(layout, None, str(exc))
    if est.fits(gpu_memory_gb):
        return Candidate(layout, est, "")
    return Candidate(layout, est, f"needs {est.total / GiB:.1f} GiB > {gpu_memory_gb:g} GiB")


@dataclass
class Plan:
    """The requested layout's estimate, and the cheapest layout that fits."""

    gpus: int
    gpus_per_node: int
    gpu_memory_gb: float
    requested: Candidate
    recommended: Candidate | None
    rejected: list[Candidate]  # cheaper layouts that do not fit

    @property
    def fits(self) -> bool:
        return self.requested.fits


def plan(
    cfg: TrainJobConfig,
    gpus: int | None = None,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
    device: str = "cuda",
    margin_gib: float = DEFAULT_MARGIN_GIB,
) -> Plan:
    """Estimate the layout ``cfg`` asks for and search the cheapest layout that fits on ``gpus``
    GPUs (default: one node). A GPU count, memory or margin that cannot be planned for is a
    one-line :class:`ConfigError` naming the option."""
    gpus = gpus_per_node if gpus is None else gpus
    for flag, n in (("--gpus-per-node", gpus_per_node), ("--gpus", gpus)):
        if n < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {n})")
    if not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise ConfigError(
            f"--gpu-memory must be a positive number of GB, e.g. 80 (got {gpu_memory_gb:g})"
        )
    if not (math.isfinite(margin_gib) and margin_gib >= 0):
        raise ConfigError(f"--margin-gb must be a number >= 0 (got {margin_gib:g})")
    positions = cfg.model.max_position_embeddings
    if cfg.data.max_length > positions:  # memory is not the problem: no layout helps
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's "
            f"max_position_embeddings={positions}: no layout or number of GPUs changes that; "
            f"set data.max_length={positions} or lower"
        )
    model, workload = cfg.model, workload_of(cfg, device)
    req = evaluate(model, layout_of(cfg, gpus), workload, gpu_memory_gb, margin_gib)
    rejected: list[Candidate] = []
    for layout in candidate_layouts(model, gpus, min(gpus_per_node, gpus)):
        cand = evaluate(model, layout, workload, gpu_memory_gb, margin_gib)
        if cand.fits:
            return Plan(gpus, gpus_per_node, gpu_memory_gb, req, cand, rejected)
        rejected.append(cand)
    return Plan(gpus, gpus_per_node, gpu_memory_gb, req, None, rejected)


@dataclass
class Verdict:
    """What ``probsft train`` / ``probsft launch`` need: fits or not, and one line saying so."""

    fits: bool
    message: str
    recommended: Layout | None
    plan: Plan


def check_fits(
    cfg,
    world_size: int,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
) -> Verdict:
    """Does ``cfg`` fit on ``world_size`` GPUs of ``gpu_memory_gb``? A refusal is one line naming
    the recommended layout's overrides and :data:`OVERRIDE_FLAG`."""
    p = plan(cfg, world_size, gpu_memory_gb, gpus_per_node)
    req, rec = p.requested, p.recommended
    need = req.estimate.total / GiB if req.estimate else float("nan")
    if req.fits:
        msg = f"fits: {req.layout.label()} needs {need:.1f} GiB of {gpu_memory_gb:g} per GPU"
        return Verdict(True, msg, req.layout, p)
    what = f"{req.layout.label()} is not possible ({req.reason})"
    if req.estimate:
        what = (
            f"{req.layout.label()} needs {need:.1f} GiB per GPU, more than the "
            f"{gpu_memory_gb:g} GiB of each of {world_size} GPU(s)"
        )
    fix = f"no layout fits on these GPUs: {NO_FIT_HINT}"
    if rec is not None:
        overrides = " ".join(rec.layout.overrides())
        fix = f"use {rec.layout.label()} ({rec.estimate.total / GiB:.1f} GiB): {overrides}"
    msg = f"will not fit: {what}; {fix}; or pass {OVERRIDE_FLAG} to run it anyway"
    return Verdict(False, msg, rec.layout if rec else None, p)
