"""Activations, analytic: what a layer and the loss head keep for backward, with recompute."""

from __future__ import annotations

import math
from dataclasses import dataclass

from probsft_megatron.plan.layout import Layout, Workload, dims


@dataclass
class LayerActivations:
    """Bytes one transformer layer keeps for its backward, per micro-batch, on one rank."""

    full: int  # nothing recomputed
    selective: int  # core attention recomputed
    checkpoint_input: int  # what a fully recomputed unit keeps: its input
    backward_transient: int  # gradients alive while this layer's backward runs


def layer_activations(model, layout: Layout, workload: Workload) -> LayerActivations:
    """The tensors autograd keeps per layer of this project's spec, per micro-batch of
    ``t = b * s`` tokens on one TP rank (``h``-sized tensors split by TP only under SP).
    SDPA/flash keeps fused QKV, rotated Q and K, the output (+ CUDA's copy for linear_proj)
    and float32 log-sum-exp; local attention keeps the ``s x s`` softmax; SwiGLU keeps ``5f``."""
    d = dims(model)
    tp, D = layout.tp, workload.param_bytes
    b, s = workload.micro_batch_size, workload.seq_length
    t = b * s
    sp = layout.sequence_parallel and tp > 1
    t_h = t // tp if sp else t  # tokens of the h-sized tensors on this rank
    q, kv, f = d["q"] // tp, d["kv"] // tp, d["f"] // tp
    heads = d["heads"] // tp
    cpu = workload.kernels == "cpu"
    # input + rstd; torch's CPU RMSNorm is composite: it keeps the input and the normalized
    # input, both upcast to float32
    norm = t_h * d["h"] * (8 if cpu else D) + t_h * 4
    # + the output each following linear keeps; the second norm's input is the residual sum
    norms = 2 * (norm + t_h * d["h"] * D)
    rope = 4 * s * d["hd"] * D
    mlp = 5 * t * f * D
    if workload.attention == "local":
        attn = 4 * t * q * D + b * heads * s * s * D + s * s
        attn_selective = t * (2 * q + 3 * kv) * D + rope  # checkpoint keeps Q, K, QKV; + context
        attn_full = attn + rope
    else:
        copy = workload.attention == "sdpa" and not cpu
        attn_full = (
            t * ((q + 2 * kv) + q + kv + q + (q if copy else 0)) * D + b * heads * s * 4 + rope
        )
        attn_selective = attn_full - b * heads * s * 4 + 4
    full = norms + mlp + attn_full
    selective = norms + mlp + attn_selective
    # backward of the MLP: while the saved tensors are still alive, the gradients of fc2's
    # input, the silu output and the linear half exist at once (3f) as fc2's input is freed:
    # 2f above what is saved; plus fc1's weight gradient and the input gradient (and the
    # re-gathered input under SP)
    transient = t * 2 * f * D + 2 * d["f"] // tp * d["h"] * D + t * d["h"] * D * (2 if sp else 1)
    return LayerActivations(
        full=full,
        selective=selective,
        checkpoint_input=t_h * d["h"] * D,
        backward_transient=transient,
    )


@dataclass
class Head:
    """The loss head of the last stage, per micro-batch."""

    saved: int  # kept from forward to backward (final norm, output-layer input, logits)
    peak: int  # saved + the largest transient of its forward/backward
    unfused_peak: int  # the same for the unfused head
    fused_peak: int  # the same for the fused head


def loss_head(model, layout: Layout, workload: Workload) -> Head:
    """Final norm + output layer + cross entropy of one micro-batch on one TP rank."""
    d = dims(model)
    tp, D = layout.tp, workload.param_bytes
    t = workload.micro_batch_size * workload.seq_length
    sp = layout.sequence_parallel and tp > 1
    t_h = t // tp if sp else t
    v = d["v"] // tp
    norm = t_h * d["h"] * (8 if workload.kernels == "cpu" else D) + t_h * 4  # cf. layer_activations
    gathered = t * d["h"] * D if sp else 0
    # unfused: megatron's output layer keeps its input; the vocab-parallel cross entropy keeps
    # float32 logits (exp, in place), the masked targets, one boolean mask (two at TP > 1)
    u_saved = norm + t_h * d["h"] * D + t * v * 4 + t * (8 + (2 if tp > 1 else 1))
    cast = t * v * D if D != 4 else 0  # parameter-dtype logits next to the float32 copy
    u_backward = t * d["h"] * D + v * d["h"] * D + gathered  # d_input, weight grad
    u_peak = u_saved + max(cast, u_backward)
    # fused: the gathered hidden rows, d_hidden (both tokens x h), one chunk of logits in
    # float32 (+ its parameter-dtype product and gradient when D != 4)
    c = min(workload.chunk_size, t)
    f_saved = norm + gathered + 2 * t * d["h"] * D + t * (4 + 1 + 8)
    f_peak = f_saved + c * v * (4 + (2 * D if D != 4 else 0)) + t * d["h"] * D
    fused = workload.loss_implementation == "fused"
    return Head(
        saved=f_saved if fused else u_saved,
        peak=f_peak if fused else u_peak,
        unfused_peak=u_peak,
        fused_peak=f_peak,
    )


def recompute_terms(
    layer: LayerActivations, layout: Layout, layers: int, rope_bytes: int = 0
) -> tuple[int, int]:
    """(kept per micro-batch, re-materialized in one backward) for a stage of ``layers``; full
    recompute keeps each unit's input and once the float32 RoPE frequencies (``rope_bytes``)."""
    if layout.recompute == "selective":
        return layers * layer.selective, 0
    if layout.recompute == "full":
        n = min(layout.recompute_num_layers or 1, layers)
        if layout.recompute_method == "uniform":
            return math.ceil(layers / n) * layer.checkpoint_input + rope_bytes, n * layer.full
        return n * layer.checkpoint_input + (layers - n) * layer.full + rope_bytes, layer.full
    return layers * layer.full, 0
