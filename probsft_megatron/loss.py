"""The objective loss: per-token vocab-parallel CE -> objective -> globally normalized sum.

Every objective is an elementwise map of megatron's per-token CE (no rank holds the full
vocabulary); each micro-batch returns its loss *sum* and normalizer count, which megatron sums
over micro-batches and DP and divides once (docs/objectives.md, docs/training.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron.config import LossConfig
from probsft_megatron.objectives import Objective, parse_objective, resolve_percentile, working_ce

# per-micro-batch statistics, summed over micro-batches and DP ranks by reduce_stats
STAT_FIELDS = ("loss_sum", "response_tokens", "kept_tokens", "p_sum", "w_sum", "units")


def group_size(group) -> int:
    """The number of ranks of ``group`` (1 without a group or without torch.distributed)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def gather_varlen(values: torch.Tensor, group) -> torch.Tensor:
    """All-gather 1-D tensors of different lengths over ``group`` and concatenate them."""
    world = group_size(group)
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
    """A percentile resolved on each micro-batch's response tokens gathered over ``group``."""

    percentile: float
    group: Any = None

    def resolve(self, ce: torch.Tensor, response: torch.Tensor) -> float:
        """The absolute ``q`` of this micro-batch's CE ``[b, s]`` (a collective over ``group``)."""
        p = torch.exp(-ce.detach()[response]).to(torch.float64)
        return resolve_percentile(gather_varlen(p, self.group), self.percentile)


# an absolute q, None (the objective's own absolute threshold, or none), or a per-micro-batch rule
Threshold = float | None | MicroBatchPercentile


def sample_weights(
    loss_mask: torch.Tensor, position_ids: torch.Tensor | None, unit: str = "example"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, units)`` of ``normalization="sample"``: ``loss_mask / W`` with ``W`` the
    mask's sum over the token's unit (an example starts where ``position_ids`` is 0; a turn is
    a run of trained labels), and the count of units with a trained token."""
    mask = loss_mask.to(torch.float64)
    b, s = mask.shape
    trained = mask > 0
    starts = (
        torch.zeros_like(trained) if position_ids is None else position_ids.to(mask.device) == 0
    )
    starts[:, 0] = True  # a row never continues the previous row's unit
    if unit == "turn":  # a run of trained labels starts a turn
        starts[:, 1:] |= trained[:, 1:] & ~trained[:, :-1]
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
    """The loss triple of one micro-batch ``(loss_sum, num_tokens, {"stats": ...})`` from the
    per-token CE ``[b, s]`` and the token weights ``loss_mask`` (0: not trained). A percentile
    objective needs ``threshold``; ``record_p`` adds the response tokens' ``"p"``."""
    ce = working_ce(ce)
    loss_mask = loss_mask.to(ce.device)
    response = loss_mask > 0
    weights, units = loss_mask, None
    if normalization == "sample":
        weights, units = sample_weights(loss_mask, position_ids, sample_unit)
    q = threshold
    if isinstance(q, MicroBatchPercentile):
        q = q.resolve(ce, response)
    if objective.needs_percentile and q is None:
        raise ValueError(
            f"objective {objective.name} has a percentile threshold: pass the "
            "resolved threshold (a float or a MicroBatchPercentile)"
        )
    keep = objective.keep_mask(ce.detach(), q) & response
    loss_sum = (objective.loss_from_ce(ce) * (keep.to(ce.dtype) * weights.to(ce.dtype))).sum()
    report = {"normalization": normalization, "record_p": record_p, "units": units}
    return loss_triple(loss_sum, ce, keep, response, objective, **report)


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
    """The loss triple of a computed ``loss_sum`` (shared with the fused loss, so both report
    the same counts); ``keep`` is within ``response``; ``units``: the ``sample`` normalizer."""
    if normalization == "sample":
        if units is None:
            raise ValueError("normalization='sample' needs the units count (sample_weights)")
        num_tokens = units.to(torch.int)
    else:
        counted = keep if normalization == "kept" else response
        num_tokens = counted.sum().to(torch.int)
    with torch.no_grad():
        ce = working_ce(ce.detach())
        keep_f, resp_f = keep.to(ce.dtype), response.to(ce.dtype)
        stats = torch.stack(
            [
                loss_sum.detach().to(ce.dtype),
                resp_f.sum(),
                keep_f.sum(),
                (torch.exp(-ce) * resp_f).sum(),
                (objective.weight_from_ce(ce) * keep_f).sum(),
                ce.new_zeros(()) if units is None else units.to(ce.dtype),
            ]
        ).to(torch.float64)
        report: dict[str, Any] = {"stats": stats}
        if record_p:
            report["p"] = torch.exp(-ce[response])
    return loss_sum, num_tokens, report


def token_ce_triple(ce: torch.Tensor, loss_mask: torch.Tensor):
    """A measuring loss triple: zero loss and count, and each row's response-token CE."""
    response = loss_mask.to(ce.device) > 0
    detached = working_ce(ce.detach())
    rows = [detached[row][response[row]] for row in range(ce.shape[0])]
    return ce.sum() * 0.0, torch.zeros((), dtype=torch.int), {"token_ce": rows}


class ObjectiveLoss:
    """A run's loss settings bound once (immutable); calling it is :func:`objective_loss`.
    ``threshold=None``: the objective's own rule (a percentile: per micro-batch over DP)."""

    __slots__ = ("config", "objective", "dp_group")

    def __init__(self, config: LossConfig, dp_group=None) -> None:
        # the section's own parse (``auto`` has none: parse_objective refuses it in one line)
        objective = config.parsed_objective or parse_objective(config.objective)
        for name, value in zip(self.__slots__, (config, objective, dp_group)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ObjectiveLoss is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return f"ObjectiveLoss({self.objective.name}, {self.config.normalization})"

    @property
    def normalization(self) -> str:
        return self.config.normalization

    @property
    def needs_global_threshold(self) -> bool:
        """A percentile objective with ``percentile_scope="global"``."""
        return self.objective.needs_percentile and self.config.percentile_scope == "global"

    def threshold(self, threshold: Threshold = None) -> Threshold:
        """``threshold``, else the objective's own rule (a percentile: per micro-batch over DP)."""
        if threshold is not None or not self.objective.needs_percentile:
            return threshold
        return MicroBatchPercentile(self.objective.threshold.value, self.dp_group)

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
    """A step's stats summed over micro-batches and DP (last stage; a collective), with
    ``extra`` counts in the same all-reduce and the gathered ``p`` when recorded; ``{}`` if none."""
    parts = [d["stats"] for d in losses_reduced if "stats" in d]
    if not parts:
        return {}
    extra = dict(extra or {})
    counts = torch.tensor(list(extra.values()), dtype=torch.float64, device=parts[0].device)
    total = torch.cat([torch.stack(parts).sum(0), counts])
    if group_size(dp_group) > 1:
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
    """The count a global loss sum is divided by under ``normalization``."""
    key = {"sample": "units", "kept": "kept_tokens"}.get(normalization, "response_tokens")
    return stats.get(key) or 0


def step_loss(stats: dict[str, float], normalization: str) -> float:
    """Global loss sum over the global normalizer count."""
    return stats["loss_sum"] / max(normalizer(stats, normalization), 1)
