"""The objective loss: per-token cross entropy -> objective -> globally normalized sum.

Stateless: :func:`objective_loss` is a function of (CE, loss mask, objective, resolved
threshold, normalization) that returns megatron's loss triple; nothing is remembered between
calls. :class:`ObjectiveLoss` binds a run's loss settings (objective, normalization, the
data-parallel group for percentiles) to that function and is immutable.

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
by all response tokens. The loss mask's values weight each token (1, or a conversation
message's own weight).

``normalization="sample"``: every example's mean token loss, averaged over the examples of
the global batch (``sample_unit="turn"``: every trained assistant turn's mean, averaged over
the turns). :func:`sample_weights` turns the loss mask into per-token weights ``m_t / W_u``
(``W_u``: the mask's sum over the token's unit) and counts the units with a trained token;
the count is the normalizer that megatron sums over micro-batches and DP ranks, so the
result is exact under every layout, gradient accumulation and packing (an example never
spans two micro-batches, and the loss sees whole rows after the sequence-parallel gather).
Units are found from the micro-batch alone: an example starts where ``position_ids`` is 0
(packed rows restart their positions), a turn is a run of trained labels (turns are
separated by their untrained role headers). A threshold drops tokens from a unit's sum but
not from ``W_u``: the unit's mean is over all its trained tokens, the per-example form of
``"response"``.

Thresholds. An absolute threshold (``OnlyTopP-0.5``) is part of the objective. A percentile
(``OnlyTopP-K20``) must be resolved to an absolute ``q`` before tokens can be kept, and the
caller says how, through the ``threshold`` argument:

* a float: ``q`` resolved elsewhere. :func:`probsft_megatron.runtime.train_step` does this for
  ``LossConfig.percentile_scope="global"`` (the default): a forward-only pre-pass measures the
  response tokens' CE of the whole global batch (:func:`token_ce_triple`), all-gathers it over
  the DP group, and resolves the percentile once, so the threshold does not depend on the
  layout. The extra forward costs about a third of a step, only for percentile objectives.
* :class:`MicroBatchPercentile`: ``q`` is the percentile of this micro-batch's response tokens
  gathered over the DP group (``percentile_scope="micro"``: no extra forward, but the result
  depends on how the batch is split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron.config import LossConfig
from probsft_megatron.objectives import Objective, parse_objective, resolve_percentile

__all__ = [
    "STAT_FIELDS",
    "LossConfig",
    "MicroBatchPercentile",
    "ObjectiveLoss",
    "gather_varlen",
    "loss_triple",
    "objective_loss",
    "reduce_stats",
    "resolve_threshold",
    "step_loss",
    "token_ce_triple",
]

STAT_FIELDS = ("loss_sum", "response_tokens", "kept_tokens", "p_sum", "w_sum", "units")
"""Per-micro-batch statistics, summed over micro-batches and DP ranks by :func:`reduce_stats`."""


def gather_varlen(values: torch.Tensor, group) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths over ``group``; returns their concatenation
    (``values`` itself without a group, outside torch.distributed, or on one rank)."""
    if group is None or not dist.is_initialized():
        return values
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


@dataclass(frozen=True)
class MicroBatchPercentile:
    """A percentile threshold resolved on each micro-batch's own response tokens, gathered
    over ``group`` (the DP group; resolving is a collective on it)."""

    percentile: float
    group: Any = None

    def resolve(self, p: torch.Tensor) -> float:
        return resolve_percentile(gather_varlen(p.to(torch.float64), self.group), self.percentile)


Threshold = float | None | MicroBatchPercentile
"""What the loss is told about the threshold: an absolute ``q``, None (the objective's own
absolute threshold, or none), or a rule resolved per micro-batch."""


def resolve_threshold(
    threshold: Threshold, ce: torch.Tensor, response: torch.Tensor
) -> float | None:
    """The absolute ``q`` for this micro-batch (reads ``ce``/``response`` only for a
    :class:`MicroBatchPercentile`, a collective on its group)."""
    if isinstance(threshold, MicroBatchPercentile):
        return threshold.resolve(torch.exp(-ce.detach()[response]))
    return threshold


def _work_dtype(ce: torch.Tensor) -> torch.dtype:
    return torch.promote_types(ce.dtype, torch.float32)  # bf16 -> fp32, fp64 stays


def sample_weights(
    loss_mask: torch.Tensor, position_ids: torch.Tensor | None, unit: str = "example"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of ``normalization="sample"`` and the number of units.

    ``loss_mask`` ``[b, s]`` (token weights, 0 = not trained), ``position_ids`` ``[b, s]``
    (0 where an example starts; None: one example per row). Returns ``(weights, units)``:
    ``weights[t] = loss_mask[t] / W`` with ``W`` the sum of ``loss_mask`` over the token's
    unit (an example, or with ``unit="turn"`` a run of trained labels), so each unit's
    weights sum to 1; ``units`` (int32 scalar) counts the units with a trained token.
    """
    mask = loss_mask.to(torch.float64)
    b, s = mask.shape
    trained = mask > 0
    if position_ids is None:
        starts = torch.zeros_like(trained)
    else:
        starts = position_ids.to(mask.device) == 0
    starts[:, 0] = True  # a row never continues the previous row's unit
    if unit == "turn":
        before = torch.zeros_like(trained)
        before[:, 1:] = trained[:, :-1]
        starts = starts | (trained & ~before)
    ids = torch.cumsum(starts.reshape(-1).to(torch.long), 0) - 1
    totals = torch.zeros(int(ids[-1]) + 1 if ids.numel() else 0, dtype=mask.dtype)
    totals = totals.to(mask.device).index_add_(0, ids, mask.reshape(-1))
    per_token = totals[ids].view(b, s)
    weights = torch.where(trained, mask / per_token.clamp_min(1e-300), torch.zeros_like(mask))
    return weights, (totals > 0).sum().to(torch.int)


def objective_loss(
    ce: torch.Tensor,
    loss_mask: torch.Tensor,
    objective: Objective,
    threshold: Threshold = None,
    *,
    normalization: str = "kept",
    record_p: bool = False,
    position_ids: torch.Tensor | None = None,
    sample_unit: str = "example",
):
    """The loss triple of one micro-batch: ``(loss_sum, num_tokens, {"stats": ...})``.

    ``ce``: per-token cross entropy ``[b, s]`` (differentiable); ``loss_mask``: the weight of
    each response token (1 usually), 0 elsewhere. ``loss_sum`` is the differentiable sum of
    ``f(p)`` times that weight over kept response tokens, ``num_tokens`` the int32
    normalizer count, ``stats`` the detached sums of :data:`STAT_FIELDS` (float64).
    ``record_p`` adds ``"p"``: the response tokens' p, for a histogram. A percentile
    objective needs ``threshold`` (see the module docstring). ``normalization="sample"``
    weights tokens by :func:`sample_weights` of ``loss_mask``, ``position_ids`` and
    ``sample_unit`` and counts units instead of tokens.
    """
    ce = ce.to(_work_dtype(ce))
    loss_mask = loss_mask.to(ce.device)
    response = loss_mask > 0
    units = None
    if normalization == "sample":
        weights, units = sample_weights(loss_mask, position_ids, sample_unit)
        weights = weights.to(ce.dtype)
    else:
        weights = loss_mask.to(ce.dtype)
    q = resolve_threshold(threshold, ce, response)
    if objective.needs_percentile and q is None:
        raise ValueError(
            f"objective {objective.name} has a percentile threshold: pass the "
            "resolved threshold (a float or a MicroBatchPercentile)"
        )
    keep = objective.keep_mask(ce.detach(), q) & response
    loss_sum = (objective.loss_from_ce(ce) * (keep.to(ce.dtype) * weights)).sum()
    return loss_triple(
        loss_sum,
        ce,
        keep,
        response,
        objective,
        normalization=normalization,
        record_p=record_p,
        units=units,
    )


def loss_triple(
    loss_sum: torch.Tensor,
    ce: torch.Tensor,
    keep: torch.Tensor,
    response: torch.Tensor,
    objective: Objective,
    *,
    normalization: str,
    record_p: bool = False,
    units: torch.Tensor | None = None,
):
    """The loss triple from an already computed differentiable ``loss_sum``.

    ``ce`` (float), ``keep`` and ``response`` (bool) have the micro-batch's shape; ``keep``
    must already be restricted to response tokens. Shared by :func:`objective_loss` and the
    fused output layer (:mod:`probsft_megatron.fused_loss`) so both report identical counts
    and statistics. ``units``: the number of examples (or turns) for ``normalization=
    "sample"``, which is then the normalizer count.
    """
    if normalization == "sample":
        if units is None:
            raise ValueError("normalization='sample' needs the units count (sample_weights)")
        num_tokens = units.to(torch.int)
    else:
        counted = keep if normalization == "kept" else response
        num_tokens = counted.sum().to(torch.int)
    with torch.no_grad():
        ce = ce.detach().to(_work_dtype(ce))
        keep_f, resp_f = keep.to(ce.dtype), response.to(ce.dtype)
        stats = torch.stack(
            [
                loss_sum.detach().to(ce.dtype),
                resp_f.sum(),
                keep_f.sum(),
                (torch.exp(-ce) * resp_f).sum(),
                (objective.weight_from_ce(ce) * keep_f).sum(),
                torch.zeros((), dtype=ce.dtype, device=ce.device)
                if units is None
                else units.to(ce.dtype),
            ]
        ).to(torch.float64)
        report: dict[str, Any] = {"stats": stats}
        if record_p:
            report["p"] = torch.exp(-ce[response])
    return loss_sum, num_tokens, report


def token_ce_triple(ce: torch.Tensor, loss_mask: torch.Tensor):
    """A measuring (not training) loss triple: zero loss and count, and ``{"token_ce": [...]}``
    with each row's response-token CE (1-D, detached, at least float32, in row order)."""
    response = loss_mask.to(ce.device) > 0
    detached = ce.detach().to(_work_dtype(ce))
    rows = [detached[row][response[row]] for row in range(ce.shape[0])]
    return ce.sum() * 0.0, torch.zeros((), dtype=torch.int), {"token_ce": rows}


class ObjectiveLoss:
    """A run's loss settings, bound once and immutable; calling it is :func:`objective_loss`.

    ``ObjectiveLoss(config, dp_group)(ce, loss_mask, threshold=None, record_p=False)`` is
    megatron's ``loss_func`` body for the unfused path. ``threshold=None`` applies the
    objective's own rule: its absolute threshold, or, for a percentile, the percentile of the
    micro-batch's response tokens over ``dp_group`` (:meth:`default_threshold`); a training
    step that resolved the percentile over the global batch passes that float instead.

    Args:
        config: objective, normalization, implementation and chunk size of the fused path,
            percentile scope.
        dp_group: the data-parallel process group over which percentile thresholds are
            resolved (``None``: no gathering, e.g. single process).
    """

    __slots__ = ("config", "objective", "dp_group")

    def __init__(self, config: LossConfig, dp_group=None) -> None:
        object.__setattr__(self, "config", config)
        # the section's own parse (``auto`` has none: parse_objective refuses it in one line)
        objective = config.parsed_objective
        object.__setattr__(self, "objective", objective or parse_objective(config.objective))
        object.__setattr__(self, "dp_group", dp_group)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ObjectiveLoss is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return f"ObjectiveLoss({self.objective.name}, {self.config.normalization})"

    @property
    def normalization(self) -> str:
        return self.config.normalization

    @property
    def needs_global_threshold(self) -> bool:
        """Whether a training step resolves this objective's percentile over the whole
        global batch first (a percentile objective with ``percentile_scope="global"``)."""
        return self.objective.needs_percentile and self.config.percentile_scope == "global"

    def default_threshold(self) -> Threshold:
        """The threshold when none is passed: None (absolute or no threshold) or the
        per-micro-batch percentile over the DP group."""
        if not self.objective.needs_percentile:
            return None
        return MicroBatchPercentile(self.objective.threshold.value, self.dp_group)

    def threshold(self, threshold: Threshold = None) -> Threshold:
        """``threshold``, or :meth:`default_threshold` when it is None."""
        return self.default_threshold() if threshold is None else threshold

    def __call__(
        self,
        ce: torch.Tensor,
        loss_mask: torch.Tensor,
        threshold: Threshold = None,
        record_p: bool = False,
        position_ids: torch.Tensor | None = None,
    ):
        return objective_loss(
            ce,
            loss_mask,
            self.objective,
            self.threshold(threshold),
            normalization=self.config.normalization,
            record_p=record_p,
            position_ids=position_ids,
            sample_unit=self.config.sample_unit,
        )


def reduce_stats(
    losses_reduced: list[dict], dp_group=None, extra: dict[str, float] | None = None
) -> dict[str, Any]:
    """Sum the per-micro-batch stats of one step over micro-batches and DP ranks.

    Call on the last pipeline stage (the only one with losses); a collective on ``dp_group``.
    Returns the step's ``loss_sum``, ``response_tokens``, ``kept_tokens``, ``mean_p`` over
    response tokens, ``frac_kept`` and ``mean_w`` (mean w(p)*keep over response tokens);
    ``extra`` counts (e.g. this rank's real tokens) are summed over DP ranks in the same
    all-reduce. When the micro-batches recorded ``"p"``, ``p`` holds the response tokens' p of
    the whole global batch (all DP ranks). Empty when no micro-batch reported stats.
    """
    parts = [d["stats"] for d in losses_reduced if "stats" in d]
    if not parts:
        return {}
    extra = dict(extra or {})
    total = torch.cat(
        [
            torch.stack(parts).sum(0),
            torch.tensor(list(extra.values()), dtype=torch.float64, device=parts[0].device),
        ]
    )
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, group=dp_group)
    values = total.tolist()
    s = dict(zip(STAT_FIELDS, values))
    resp = max(s["response_tokens"], 1.0)
    out: dict[str, Any] = {
        "loss_sum": s["loss_sum"],
        "response_tokens": int(s["response_tokens"]),
        "kept_tokens": int(s["kept_tokens"]),
        "mean_p": s["p_sum"] / resp,
        "frac_kept": s["kept_tokens"] / resp,
        "mean_w": s["w_sum"] / resp,
        "units": int(s["units"]),
    }
    out.update(zip(extra, values[len(STAT_FIELDS) :]))
    recorded = [d["p"] for d in losses_reduced if "p" in d]
    if recorded:
        out["p"] = gather_varlen(torch.cat(recorded).float(), dp_group)
    return out


def normalizer(stats: dict[str, float], normalization: str) -> float:
    """The count a step's (or a validation batch's) global loss sum is divided by: units
    (``sample``), kept tokens (``kept``) or response tokens."""
    key = {"sample": "units", "kept": "kept_tokens"}.get(normalization, "response_tokens")
    return stats.get(key) or 0


def step_loss(stats: dict[str, float], normalization: str) -> float:
    """The step's reported loss: global loss sum over the global normalizer count."""
    return stats["loss_sum"] / max(normalizer(stats, normalization), 1)
