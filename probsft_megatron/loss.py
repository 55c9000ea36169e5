"""The objective loss: per-token cross entropy -> objective -> globally normalized sum.

Contract (unfused path). The model's output layer keeps the logits split over the vocabulary
on each tensor-parallel (TP) rank; megatron's vocab-parallel cross entropy all-reduces the
max, the sum of exponentials and the target logit over the TP group and returns the per-token
CE ``[b, s]``, identical on every TP rank (with sequence parallelism the output layer has
already gathered the sequence). No rank ever holds the full vocabulary. Every objective is an
elementwise map of that CE (``p = exp(-CE)``), so it is exact under any TP/SP/PP layout, and
its logit gradient is ``w(p)`` times the NLL gradient through the same backward.

Normalization is global. Each micro-batch returns the *sum* of its token losses and the
number of tokens it normalizes by; megatron's schedule (``calculate_per_token_loss=True``)
adds the counts over micro-batches, ``finalize_model_grads`` all-reduces them over the
data-parallel (DP) group and divides the gradients once. ``normalization="kept"`` (the
default, as the paper's code) divides by the tokens a threshold keeps; ``"response"`` divides
by all response tokens.

Percentile thresholds (``OnlyTopP-K20``) are resolved over the response tokens of the whole
global batch (all micro-batches, all DP ranks), so the threshold does not depend on the
layout (``LossConfig.percentile_scope="global"``, the default):
:func:`probsft_megatron.runtime.train_step` first runs a forward-only pass that
collects the probabilities (:meth:`ObjectiveLoss.start_collecting`), all-gathers them over the DP
group, resolves the percentile and fixes the absolute threshold for the training pass. The
extra forward costs about a third of a step, and only for percentile objectives;
``percentile_scope="micro"`` skips it and thresholds each micro-batch on its own tokens
(gathered over DP), which then depends on how the batch is split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron.errors import ConfigError
from probsft_megatron.objectives import Objective, parse_objective, resolve_percentile

NORMALIZATIONS = ("kept", "response")
STAT_FIELDS = ("loss_sum", "response_tokens", "kept_tokens", "p_sum", "w_sum")
"""Per-micro-batch statistics, summed over micro-batches and DP ranks by :func:`reduce_stats`."""


IMPLEMENTATIONS = ("unfused", "fused")
PERCENTILE_SCOPES = ("global", "micro")


@dataclass
class LossConfig:
    """``objective``: a name or dict (see :mod:`probsft_megatron.objectives`);
    ``normalization``: ``kept`` | ``response``; ``implementation``: ``unfused`` (megatron's
    output layer + vocab-parallel CE) or ``fused`` (chunked linear + CE that never holds the
    full logits); ``chunk_size``: tokens per chunk of the fused path (its logits workspace is
    ``chunk_size x V/TP`` floats, see :mod:`probsft_megatron.fused_loss`); ``percentile_scope``:
    where percentile thresholds are taken, ``global`` (the whole global batch, exact and
    layout-independent, one extra forward per step) or ``micro`` (each micro-batch's tokens
    on all DP ranks, no extra forward; depends on the micro-batch split)."""

    objective: Any = "original"
    normalization: str = "kept"
    implementation: str = "unfused"
    chunk_size: int = 512
    percentile_scope: str = "global"

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size < 1:
            raise ConfigError(
                f"loss.chunk_size={self.chunk_size!r} is invalid; use a positive number of tokens "
                "per chunk of the fused loss (e.g. 512)"
            )
        if self.percentile_scope not in PERCENTILE_SCOPES:
            raise ConfigError(
                f"loss.percentile_scope={self.percentile_scope!r} is invalid; use 'global' "
                "(exact over the global batch) or 'micro' (per micro-batch, no extra forward)"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"loss.implementation={self.implementation!r} is invalid; use one of "
                f"{', '.join(IMPLEMENTATIONS)}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"loss.normalization={self.normalization!r} is invalid; use 'kept' (divide by the "
                "tokens the objective keeps, the paper's default) or 'response' (all response tokens)"
            )


def _gather_varlen(values: torch.Tensor, group) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths over ``group``; returns their concatenation."""
    world = dist.get_world_size(group)
    if world == 1:
        return values
    n = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)])


class ObjectiveLoss:
    """Callable used as megatron's ``loss_func``: ``(ce [b, s], loss_mask [b, s]) -> triple``.

    Returns ``(loss_sum, num_tokens, {"stats": tensor[len(STAT_FIELDS)]})`` where ``loss_sum``
    is the differentiable sum of kept token losses, ``num_tokens`` the int32 normalizer count
    of this micro-batch, and the stats are detached sums (see :data:`STAT_FIELDS`).

    Args:
        config: objective and normalization.
        dp_group: the data-parallel process group over which percentile thresholds are
            resolved (``None``: no gathering, e.g. single process).
    """

    def __init__(self, config: LossConfig, dp_group=None) -> None:
        self.config = config
        self.objective: Objective = parse_objective(config.objective)
        self.dp_group = dp_group
        self._collected: list[torch.Tensor] | None = None
        self._fixed_q: float | None = None
        self.record_p = False  # keep this step's response-token p for a histogram
        self._recorded: list[torch.Tensor] = []

    def gathered_p(self) -> torch.Tensor:
        """Response-token p recorded this step on all DP ranks (then forgotten)."""
        local = (torch.cat(self._recorded) if self._recorded
                 else torch.zeros(0, dtype=torch.float32))
        self._recorded = []
        if self.dp_group is not None and dist.is_initialized():
            local = _gather_varlen(local, self.dp_group)
        return local

    # -- percentile thresholds over the global batch ------------------------------------
    def start_collecting(self) -> None:
        """Next calls only record response-token probabilities (forward-only pre-pass)."""
        self._collected, self._fixed_q = [], None

    def finish_collecting(self) -> float:
        """Resolve the percentile over everything collected on all DP ranks; fix it."""
        local = (torch.cat(self._collected) if self._collected
                 else torch.zeros(0, dtype=torch.float64))
        self._collected = None
        if self.dp_group is not None and dist.is_initialized():
            local = _gather_varlen(local, self.dp_group)
        self._fixed_q = resolve_percentile(local, self.objective.threshold.value)
        return self._fixed_q

    @property
    def collecting(self) -> bool:
        """Whether calls only record probabilities (between start and finish_collecting)."""
        return self._collected is not None

    @property
    def threshold_needs_ce(self) -> bool:
        """Whether :meth:`threshold` depends on this micro-batch's CE: a percentile threshold
        without a fixed global-batch value (no pre-pass ran)."""
        return self.objective.needs_percentile and self._fixed_q is None

    def threshold(self, ce: torch.Tensor | None, response: torch.Tensor | None) -> float | None:
        """The absolute probability threshold (None when the objective has none to resolve).

        Uses the global-batch value fixed by :meth:`finish_collecting`; without a pre-pass
        (``percentile_scope="micro"``, or a single forward) it takes the percentile of this
        micro-batch's response tokens gathered over the DP group (a collective on that group),
        the only case that reads ``ce`` and ``response`` (see :attr:`threshold_needs_ce`).
        """
        if not self.objective.needs_percentile:
            return None
        if self._fixed_q is not None:
            return self._fixed_q
        p = torch.exp(-ce.detach()[response]).to(torch.float64)
        if self.dp_group is not None and dist.is_initialized():
            p = _gather_varlen(p, self.dp_group)
        return resolve_percentile(p, self.objective.threshold.value)

    def __call__(self, ce: torch.Tensor, loss_mask: torch.Tensor):
        ce = ce.to(torch.promote_types(ce.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
        response = loss_mask.to(ce.device) > 0
        if self.collecting:
            self._collected.append(torch.exp(-ce.detach()[response]).to(torch.float64))
            return ce.sum() * 0.0, torch.zeros((), dtype=torch.int), {}
        keep = self.objective.keep_mask(ce.detach(), self.threshold(ce, response)) & response
        loss_sum = (self.objective.loss_from_ce(ce) * keep.to(ce.dtype)).sum()
        return self.summarize(loss_sum, ce, keep, response)

    def summarize(self, loss_sum: torch.Tensor, ce: torch.Tensor, keep: torch.Tensor,
                  response: torch.Tensor):
        """The loss-function triple from an already computed differentiable ``loss_sum``.

        ``ce`` (float), ``keep`` and ``response`` (bool) have the micro-batch's shape; ``keep``
        must already be restricted to response tokens. Shared by :meth:`__call__` and the fused
        output layer (:mod:`probsft_megatron.fused_loss`) so both report identical counts and
        statistics.
        """
        counted = keep if self.config.normalization == "kept" else response
        num_tokens = counted.sum().to(torch.int)
        with torch.no_grad():
            ce = ce.detach().to(torch.promote_types(ce.dtype, torch.float32))
            if self.record_p:
                self._recorded.append(torch.exp(-ce[response]))
            keep_f, resp_f = keep.to(ce.dtype), response.to(ce.dtype)
            stats = torch.stack([
                loss_sum.detach().to(ce.dtype),
                resp_f.sum(),
                keep_f.sum(),
                (torch.exp(-ce) * resp_f).sum(),
                (self.objective.weight_from_ce(ce) * keep_f).sum(),
            ]).to(torch.float64)
        return loss_sum, num_tokens, {"stats": stats}


def reduce_stats(losses_reduced: list[dict], dp_group=None) -> dict[str, float]:
    """Sum the per-micro-batch stats of one step over micro-batches and DP ranks.

    Call on the last pipeline stage (the only one with losses). Returns the step's
    ``loss`` (global loss sum / global normalizer count), ``mean_p`` over response tokens,
    ``frac_kept`` and ``mean_w`` (mean w(p)*keep over response tokens), plus raw counts.
    """
    parts = [d["stats"] for d in losses_reduced if "stats" in d]
    if not parts:
        return {}
    total = torch.stack(parts).sum(0)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, group=dp_group)
    s = dict(zip(STAT_FIELDS, total.tolist()))
    resp = max(s["response_tokens"], 1.0)
    return {
        "loss_sum": s["loss_sum"],
        "response_tokens": int(s["response_tokens"]),
        "kept_tokens": int(s["kept_tokens"]),
        "mean_p": s["p_sum"] / resp,
        "frac_kept": s["kept_tokens"] / resp,
        "mean_w": s["w_sum"] / resp,
    }


def step_loss(stats: dict[str, float], normalization: str) -> float:
    """The step's reported loss: global loss sum over the global normalizer count."""
    count = stats["kept_tokens"] if normalization == "kept" else stats["response_tokens"]
    return stats["loss_sum"] / max(count, 1)
