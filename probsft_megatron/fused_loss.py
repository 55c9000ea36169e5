"""Fused vocab-parallel output layer + objective loss that never holds the full logits.

The unfused path computes ``logits = hidden @ W^T`` for the whole micro-batch (``[s, b, V/TP]``
per rank, plus float32 copies inside the cross entropy) and keeps them until the backward.
Every objective only needs, per token, the target logit and the log-sum-exp, and its logit
gradient ``w(p) * keep * (softmax - onehot)`` is known as soon as the CE is. So this module
walks over the tokens in chunks of ``LossConfig.chunk_size``: per chunk it forms the chunk's
logits, reduces max / sum-exp / target logit over the tensor-parallel (TP) group, derives the
CE, the objective's coefficient and the chunk's logit gradient, and immediately folds that
gradient into ``d_hidden`` (this chunk's rows) and the weight gradient (added to megatron
DDP's float32 ``main_grad`` buffer when the weight has one, else to a float32 accumulator
returned by the backward; nothing for a frozen weight). At most one chunk of logits exists at
a time; the backward only hands back the saved gradients, scaled by the incoming gradient of
the loss sum.

Distributed contract of :func:`fused_objective_loss` (what every rank passes and gets):

* ``hidden``: ``[b, s, h]`` the final hidden states, replicated over the TP group; with
  sequence parallelism (SP) ``[b, s/TP, h]``, this TP rank's slice of the sequence (megatron
  splits ``[s, b, h]`` along ``s``). SP gathers the sequence with megatron's
  ``gather_from_sequence_parallel_region`` (backward: reduce-scatter); without SP the input
  goes through ``copy_to_tensor_model_parallel_region`` (backward: all-reduce). These are the
  collectives megatron's ``ColumnParallelLinear`` output layer uses.
* ``weight``: ``[V/TP, h]`` this TP rank's rows of the output weight (vocabulary ids
  ``[rank * V/TP, (rank + 1) * V/TP)``), the tensor the unfused output layer multiplies with.
* ``labels``, ``loss_mask``: ``[b, s]`` for the full sequence, identical on every TP rank.
* Returns ``(loss_sum, num_tokens, {"stats": ...})`` exactly like
  :func:`~probsft_megatron.loss.objective_loss` (same values on every TP rank). Backward:
  ``d_hidden`` has ``hidden``'s shape (TP-reduced by the collective above), ``d_weight`` is
  this rank's shard.

Two collectives per chunk run on the TP group: an all-reduce MAX of the row maxima and one
all-reduce SUM of the stacked ``[target logit, sum of exp]`` (only the rank owning a target id
contributes its logit). All TP ranks hold the same tokens and labels, so they walk the same
chunks in lockstep.

Tokens outside ``loss_mask`` are skipped: the objective gives them coefficient 0 in both
paths (zero loss and zero gradient), so only response tokens are multiplied with the weight.

Thresholds are passed the way :func:`probsft_megatron.loss.objective_loss` takes them. An
absolute ``q`` (an absolute threshold, or ``train_step``'s global-batch pre-pass) makes the
chunk loop a single pass. A :class:`~probsft_megatron.loss.MicroBatchPercentile` depends on
this micro-batch's CE: a first pass computes only the CE (no gradient work, O(tokens)
memory), the threshold is resolved, and the gradient pass recomputes the logits: one extra
``hidden @ W^T`` per chunk. :func:`fused_token_ce` is the CE-only pass on its own (the
probe's and the pre-pass's measurement).

The model side (an output layer that hands back its input) is
:mod:`probsft_megatron.fused_head`; the step that connects the two is
:class:`probsft_megatron.runtime.FusedLossHead`.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    loss_triple,
    resolve_threshold,
)
from probsft_megatron.objectives import Objective

__all__ = ["fused_objective_loss", "fused_token_ce"]


# -- the chunked linear + cross entropy ------------------------------------------------------
def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _reduce_max(values: Tensor, group) -> None:
    """All-reduce MAX of the per-row logit maxima over the TP group (in place)."""
    if _tp_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)


def _reduce_partials(partials: Tensor, group) -> None:
    """All-reduce SUM of ``[2, C]``: row 0 the target logit (0 on ranks not owning the target
    id), row 1 the sum of ``exp(logit - max)`` over the local vocabulary (in place)."""
    if _tp_size(group) > 1:
        dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)


def _chunk_ce(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, group):
    """Cross entropy of one chunk of tokens against the local vocabulary shard.

    Returns ``(ce [C] float32, exp_logits [C, V/TP] float32, sum_exp [C], local_target [C],
    owned [C] bool)`` where ``exp_logits = exp(logits - global max)`` and ``sum_exp`` is its
    sum over the full vocabulary; the operations follow megatron's vocab-parallel cross
    entropy (max subtracted before the target logit is read, ``ce = log(sum_exp) - target``).
    """
    logits = torch.mm(hidden, weight.t()).float()
    logits_max = logits.max(dim=1).values
    _reduce_max(logits_max, group)
    logits.sub_(logits_max.unsqueeze(1))
    local = labels - vocab_start
    owned = (local >= 0) & (local < logits.shape[1])
    local = torch.where(owned, local, torch.zeros_like(local))
    target = logits.gather(1, local.unsqueeze(1)).squeeze(1)
    target = torch.where(owned, target, torch.zeros_like(target))
    logits.exp_()
    partials = torch.stack([target, logits.sum(dim=1)])
    _reduce_partials(partials, group)
    target, sum_exp = partials[0], partials[1]
    ce = torch.log(sum_exp) - target
    return ce, logits, sum_exp, local, owned


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _ce_only(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, vocab_start: int, group
) -> Tensor:
    """Per-token CE ``[N]`` (float32) without gradients: one matmul per chunk."""
    ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for start, end in _chunks(hidden.shape[0], chunk_size):
            ce[start:end] = _chunk_ce(
                hidden[start:end], weight, labels[start:end], vocab_start, group
            )[0]
    return ce


def _main_grad(weight: Tensor) -> Tensor | None:
    """megatron DDP's gradient-buffer view for ``weight`` (``param.main_grad``), if any."""
    target = getattr(weight, "main_grad", None)
    if isinstance(target, Tensor) and target.shape == weight.shape:
        return target
    return None


def _accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """``acc += grad_logits^T @ hidden`` into a (float32) accumulator.

    Same dtypes: one in-place ``addmm_``. Otherwise (bf16 gradients into a float32 buffer) the
    product is formed in blocks of vocabulary rows, so the temporary in the input dtype never
    exceeds the chunk's ``grad_logits`` (``h / C`` blocks) instead of a whole ``V/TP x h``.
    """
    if grad_logits.dtype == acc.dtype and hidden.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    rows = acc.shape[0]
    blocks = max(1, -(-hidden.shape[1] // max(grad_logits.shape[0], 1)))
    step = -(-rows // blocks)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        acc[start:end].add_(torch.mm(grad_logits[:, start:end].t(), hidden))


class _LinearObjective(torch.autograd.Function):
    """``sum_t keep_t * f(p_t)`` over token rows, with its gradients formed in the forward.

    Inputs: ``hidden [N, h]`` (the same rows on every TP rank), ``weight [V/TP, h]`` (local
    shard), ``labels [N]`` (global vocabulary ids). Outputs: the loss sum (differentiable),
    ``ce [N]`` and ``keep [N]`` (not differentiable). The backward returns this rank's
    partial ``d_hidden`` (the caller's collective reduces it over TP) and its ``d_weight``
    shard, both scaled by the incoming gradient.

    ``main_grad``: megatron DDP's float32 gradient buffer for ``weight``. When given, the
    weight gradient is added to it chunk by chunk during the forward (no ``V/TP x h``
    accumulator is held until the backward), and the backward returns no weight gradient;
    this needs the loss sum's upstream gradient to be 1, which megatron's schedule gives
    (no loss scaler in bf16/fp32), and is checked.
    """

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
        if not need_weight_grad:
            d_weight = None  # a frozen output weight: no weight-gradient work at all
        elif main_grad is None:
            d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        else:
            d_weight = main_grad
        arange = torch.arange(min(chunk_size, n), device=hidden.device)
        for start, end in _chunks(n, chunk_size):
            h = hidden[start:end]
            ce_c, probs, sum_exp, local, owned = _chunk_ce(
                h, weight, labels[start:end], vocab_start, group
            )
            keep_c = objective.keep_mask(ce_c, q)
            coef = objective.weight_from_ce(ce_c) * keep_c
            ce[start:end], keep[start:end] = ce_c, keep_c
            # d(coef * ce) / d logits = coef * (softmax - onehot), as megatron's CE backward;
            # one pass over the chunk: exp * (coef / sum_exp), then -coef at the owned target
            probs.mul_((coef / sum_exp).unsqueeze(1))
            probs[arange[: end - start], local] -= coef * owned.to(probs.dtype)
            grad_logits = probs.to(weight.dtype)
            torch.mm(grad_logits, weight, out=d_hidden[start:end])
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
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    tp_group,
    sequence_parallel: bool,
):
    """The response tokens' rows of the full-sequence hidden states, after megatron's
    output-layer collective; returns ``(h [N, h], y [N], response [b, s], full, vocab_start)``
    where ``full`` scatters per-row values back to ``[b, s]``."""
    if hidden.dtype != weight.dtype:
        # e.g. megatron's Float16Module hands the last stage's output back in float32; the
        # unfused output layer multiplies in the weight's dtype, and so does this
        hidden = hidden.to(weight.dtype)
    tp = _tp_size(tp_group)
    if tp > 1:
        if sequence_parallel:
            hidden = compat.gather_from_sequence_parallel_region(
                hidden.transpose(0, 1), tp_group
            ).transpose(0, 1)
        else:
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
    """The per-token CE ``[b, s]`` (float32, no gradient; 0 outside ``loss_mask``) of
    ``hidden @ weight^T``, one chunk of logits at a time; same contract as
    :func:`fused_objective_loss`."""
    with torch.no_grad():
        h, y, _, full, vocab_start = _response_rows(
            hidden, weight, labels, loss_mask, tp_group, sequence_parallel
        )
        return full(_ce_only(h, weight, y, _check_chunk(int(chunk_size)), vocab_start, tp_group))


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
    """The objective loss of ``hidden @ weight^T`` without materializing the logits.

    See the module docstring for the distributed contract (shapes per TP rank, collectives,
    what each rank returns). ``tp_group``: megatron's tensor-parallel group (``None``: a
    single rank, no collectives). ``chunk_size``: tokens per chunk (default
    ``objective_loss.config.chunk_size``). ``threshold`` and ``record_p``: as for
    :meth:`ObjectiveLoss.__call__` (None: the objective's own rule).
    ``weight_grad``: where the output weight's gradient goes. ``"main_grad"``: added to
    megatron DDP's float32 gradient buffer (``weight.main_grad``) chunk by chunk during the
    forward, so no ``V/TP x h`` gradient is ever allocated (DDP's backward hook, with
    ``overlap_grad_reduce`` off, then finds no ``.grad`` to add); the loss sum must be
    back-propagated with gradient 1, as megatron's schedule does without a loss scaler.
    ``"autograd"``: accumulated in a private float32 buffer and returned by the backward into
    ``weight.grad`` (scaled by any upstream gradient). ``"auto"`` (default): ``main_grad``
    when the weight has one, else ``autograd``.

    Equivalent to the unfused ``objective_loss(vocab_parallel_cross_entropy(hidden @ W^T,
    labels), loss_mask)``: same loss sum, counts and statistics, same gradients.
    """
    chunk = _check_chunk(
        objective_loss.config.chunk_size if chunk_size is None else int(chunk_size)
    )
    if weight_grad not in ("auto", "main_grad", "autograd"):
        raise ValueError(
            f"weight_grad={weight_grad!r} is invalid; use 'auto', 'main_grad' or 'autograd'"
        )
    main_grad = None if weight_grad == "autograd" else _main_grad(weight)
    if weight_grad == "main_grad" and main_grad is None:
        raise ValueError(
            "weight_grad='main_grad' needs a weight wrapped by megatron's "
            "DistributedDataParallel (it has no main_grad buffer); use 'auto'"
        )
    h, y, response, full, vocab_start = _response_rows(
        hidden, weight, labels, loss_mask, tp_group, sequence_parallel
    )
    threshold = objective_loss.threshold(threshold)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if not wants_grad:
        ce = full(_ce_only(h, weight, y, chunk, vocab_start, tp_group))
        return objective_loss(ce, loss_mask, threshold=threshold, record_p=record_p)
    if not isinstance(threshold, MicroBatchPercentile):
        q = threshold
    else:  # resolved on this micro-batch's CE: a CE-only pass first
        ce = full(_ce_only(h.detach(), weight.detach(), y, chunk, vocab_start, tp_group))
        q = resolve_threshold(threshold, ce, response)
    loss_sum, ce, keep = _LinearObjective.apply(
        h,
        weight,
        y,
        objective_loss.objective,
        q,
        chunk,
        vocab_start,
        tp_group,
        main_grad,
        weight.requires_grad,
    )
    return loss_triple(
        loss_sum,
        full(ce),
        full(keep),
        response,
        objective_loss.objective,
        normalization=objective_loss.normalization,
        record_p=record_p,
    )
