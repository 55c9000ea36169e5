"""Fused vocab-parallel output layer + objective loss that never holds the full logits.

The tokens are walked in chunks of ``loss.chunk_size``: per chunk the logits' max, sum-exp and
target logit are reduced over TP (two all-reduces), and the objective's logit gradient is folded
into ``d_hidden`` and the weight gradient at once. Contract, thresholds: docs/fused_loss.md."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from probsft_megatron import compat
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import (
    MicroBatchPercentile,
    ObjectiveLoss,
    Threshold,
    group_size,
    loss_triple,
)
from probsft_megatron.objectives import Objective


def _reduce_partials(partials: Tensor, group) -> None:
    """In-place all-reduce SUM of ``[target logit (0 where not owned), local sum of exp]``."""
    if group_size(group) > 1:
        dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)


def _chunk_ce(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, group):
    """One chunk's CE against the local vocabulary shard, as megatron's vocab-parallel CE:
    ``(ce, exp(logits - max), sum_exp, local_target, owned)``, all float32 but the last two."""
    logits = torch.mm(hidden, weight.t()).float()
    logits_max = logits.max(dim=1).values
    if group_size(group) > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(logits_max.unsqueeze(1))
    local = labels - vocab_start
    owned = (local >= 0) & (local < logits.shape[1])
    local = torch.where(owned, local, torch.zeros_like(local))
    target = logits.gather(1, local.unsqueeze(1)).squeeze(1)
    target = torch.where(owned, target, torch.zeros_like(target))
    logits.exp_()
    partials = torch.stack([target, logits.sum(dim=1)])
    _reduce_partials(partials, group)
    target, sum_exp = partials
    return torch.log(sum_exp) - target, logits, sum_exp, local, owned


def _ce_only(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, vocab_start: int, group
) -> Tensor:
    ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            ce[rows] = _chunk_ce(hidden[rows], weight, labels[rows], vocab_start, group)[0]
    return ce


def _accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """``acc += grad_logits^T @ hidden``; across dtypes in blocks of vocabulary rows, so the
    temporary never exceeds the chunk's ``grad_logits`` (not a whole ``V/TP x h``)."""
    if grad_logits.dtype == acc.dtype and hidden.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    blocks = max(1, -(-hidden.shape[1] // max(grad_logits.shape[0], 1)))
    step = -(-acc.shape[0] // blocks)
    for start in range(0, acc.shape[0], step):
        rows = slice(start, start + step)
        acc[rows].add_(torch.mm(grad_logits[:, rows].t(), hidden))


class _LinearObjective(torch.autograd.Function):
    """``sum_t keep_t * f(p_t)`` over rows ``hidden [N, h]``, gradients formed in the forward;
    returns (loss sum, ce, keep). With ``main_grad`` the weight gradient goes into DDP's buffer
    during the forward, which needs an upstream gradient of 1 (checked in the backward)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        objective: Objective,
        q: float | None,
        chunk_size: int,
        vocab_start: int,
        group,
        main_grad: Tensor | None,
        need_weight_grad: bool = True,
    ):
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        keep = torch.empty(n, dtype=torch.bool, device=hidden.device)
        d_hidden = torch.empty_like(hidden)
        d_weight = main_grad if need_weight_grad else None  # None: a frozen output weight
        if need_weight_grad and main_grad is None:
            d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        arange = torch.arange(min(chunk_size, n), device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            ce_c, probs, sum_exp, local, owned = _chunk_ce(
                h, weight, labels[rows], vocab_start, group
            )
            keep_c = objective.keep_mask(ce_c, q)
            coef = objective.weight_from_ce(ce_c) * keep_c
            ce[rows], keep[rows] = ce_c, keep_c
            # d(coef * ce) / d logits = coef * (softmax - onehot), as megatron's CE backward;
            # one pass over the chunk: exp * (coef / sum_exp), then -coef at the owned target
            probs.mul_((coef / sum_exp).unsqueeze(1))
            probs[arange[: h.shape[0]], local] -= coef * owned.to(probs.dtype)
            grad_logits = probs.to(weight.dtype)
            torch.mm(grad_logits, weight, out=d_hidden[rows])
            if d_weight is not None:
                _accumulate_weight_grad(d_weight, grad_logits, h)
            del probs, grad_logits
        loss_sum = (objective.loss_from_ce(ce) * keep.to(ce.dtype)).sum()
        own = d_weight is not None and main_grad is None
        ctx.grads = (d_hidden, d_weight.to(weight.dtype) if own else None)
        ctx.weight_grad_in_buffer = need_weight_grad and main_grad is not None
        del d_weight
        ctx.mark_non_differentiable(ce, keep)
        return loss_sum, ce, keep

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_keep):
        if ctx.grads is None:
            raise RuntimeError("the fused objective loss supports a single backward per forward")
        d_hidden, d_weight = ctx.grads
        ctx.grads = None
        if not bool(grad_loss == 1):
            if ctx.weight_grad_in_buffer:
                raise RuntimeError(
                    f"the fused loss head added the output weight's gradient to megatron's "
                    f"main_grad during the forward, which assumes the loss sum is "
                    f"back-propagated with gradient 1, but got {float(grad_loss)}; pass "
                    f"weight_grad='autograd' to fused_objective_loss to scale it in the backward"
                )
            d_hidden.mul_(grad_loss.to(d_hidden.dtype))
            if d_weight is not None:
                d_weight.mul_(grad_loss.to(d_weight.dtype))
        return d_hidden, d_weight, None, None, None, None, None, None, None, None


def _response_rows(
    hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor, tp_group, sequence_parallel
):
    """The response rows after megatron's output-layer collective: ``(h [N, h], y [N],
    response [b, s], full, vocab_start)``; ``full`` scatters row values back to ``[b, s]``."""
    # e.g. megatron's Float16Module hands the last stage's output back in float32; the
    # unfused output layer multiplies in the weight's dtype, and so does this
    hidden = hidden.to(weight.dtype)
    tp = group_size(tp_group)
    if tp > 1 and sequence_parallel:
        hidden = compat.gather_from_sequence_parallel_region(hidden.transpose(0, 1), tp_group)
        hidden = hidden.transpose(0, 1)
    elif tp > 1:
        hidden = compat.copy_to_tensor_parallel_region(hidden, tp_group)
    b, s = labels.shape
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (b, s) or hidden.shape[2] != weight.shape[1]:
        raise ValueError(
            f"fused loss: hidden states of shape {tuple(hidden.shape)} (after the sequence "
            f"gather) do not match labels {tuple(labels.shape)} and an output weight of shape "
            f"{tuple(weight.shape)}; expected [b, s, h] with h = weight.shape[1]"
        )
    vocab_start = (dist.get_rank(tp_group) if tp > 1 else 0) * weight.shape[0]

    response = loss_mask.to(hidden.device) > 0
    rows = response.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(b * s, hidden.shape[2]).index_select(0, rows)
    y = labels.reshape(-1).index_select(0, rows)

    def full(values: Tensor) -> Tensor:
        out = torch.zeros(b * s, dtype=values.dtype, device=values.device)
        return out.index_copy_(0, rows, values).view(b, s)

    return h, y, response, full, vocab_start


def _check_chunk(chunk: int) -> int:
    chunk = int(chunk)
    if chunk < 1:
        raise ConfigError(f"loss.chunk_size={chunk} is invalid; use a positive number of tokens")
    return chunk


def fused_token_ce(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    chunk_size: int = 4096,
) -> Tensor:
    """The per-token CE ``[b, s]`` (float32, no gradient, 0 outside ``loss_mask``)."""
    with torch.no_grad():
        h, y, _, full, vocab_start = _response_rows(
            hidden, weight, labels, loss_mask, tp_group, sequence_parallel
        )
        return full(_ce_only(h, weight, y, _check_chunk(chunk_size), vocab_start, tp_group))


def fused_objective_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    objective_loss: ObjectiveLoss,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    chunk_size: int | None = None,
    weight_grad: str = "auto",
    threshold: Threshold = None,
    record_p: bool = False,
):
    """The loss triple of ``hidden @ weight^T`` without the logits; equal to the unfused loss.

    ``weight_grad``: ``main_grad`` (DDP's buffer, during the forward), ``autograd`` (into
    ``weight.grad``) or ``auto`` (``main_grad`` when the weight has one)."""
    chunk = _check_chunk(objective_loss.config.chunk_size if chunk_size is None else chunk_size)
    if weight_grad not in ("auto", "main_grad", "autograd"):
        raise ValueError(
            f"weight_grad={weight_grad!r} is invalid; use 'auto', 'main_grad' or 'autograd'"
        )
    main_grad = None if weight_grad == "autograd" else getattr(weight, "main_grad", None)
    if not isinstance(main_grad, Tensor) or main_grad.shape != weight.shape:
        main_grad = None  # no megatron DDP buffer for this weight
    if weight_grad == "main_grad" and main_grad is None:
        raise ValueError(
            "weight_grad='main_grad' needs a weight wrapped by megatron's "
            "DistributedDataParallel (it has no main_grad buffer); use 'auto'"
        )
    h, y, response, full, vocab_start = _response_rows(
        hidden, weight, labels, loss_mask, tp_group, sequence_parallel
    )
    q = objective_loss.threshold(threshold)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if not wants_grad or isinstance(q, MicroBatchPercentile):  # a CE-only pass (no gradient)
        ce = full(_ce_only(h, weight, y, chunk, vocab_start, tp_group))
        if not wants_grad:
            return objective_loss(ce, loss_mask, threshold=q, record_p=record_p)
        q = q.resolve(ce, response)
    objective = objective_loss.objective
    setup = (objective, q, chunk, vocab_start, tp_group, main_grad, weight.requires_grad)
    loss_sum, ce, keep = _LinearObjective.apply(h, weight, y, *setup)
    report = {"normalization": objective_loss.normalization, "record_p": record_p}
    return loss_triple(loss_sum, full(ce), full(keep), response, objective, **report)
