"""Will it fit? Per-GPU memory of a training job, and the cheapest layout that fits.

Pure arithmetic on the model description and the layout: no torch model is built and
megatron is not imported, so the check is instant and safe to run before anything is
submitted (``probsft plan``; :func:`check_fits` for ``probsft train`` and ``probsft launch``).

What is counted, per GPU (each pipeline stage is estimated; the report shows the fullest):

* **Static parts, byte-exact** for the layout this project builds (megatron's local layer
  spec, megatron DDP with ``overlap_grad_reduce`` off, megatron's Adam optimizer):

  - *weights*: this rank's parameters. With the distributed optimizer megatron moves them
    into one contiguous buffer with the gradient buffer's padding, so the padded size counts.
  - *gradient buffer*: megatron DDP's ``grad_data``, float32 with ``grad_reduce_in_fp32``
    (else the parameter dtype). With the distributed optimizer every parameter starts at a
    multiple of 64 elements and every bucket ends at a multiple of ``lcm(DP, 128)``; a
    parameter shared between the first and last pipeline stage (tied embeddings, PP > 1)
    gets a bucket of its own.
  - *optimizer state*: float32 main weights for non-float32 parameters, Adam's two float32
    moments and torch's per-tensor ``step`` scalar (4 bytes). With the distributed optimizer
    each DP rank holds the part of every bucket that falls in its ``1/DP`` slice (the
    rank with the most elements is reported).

  ``tests/test_plan.py`` checks these three numbers against the tensors of really built
  models, DDP wrappers and optimizers (tiny models and the SmolLM2-135M shape at TP=1, TP=2,
  PP=2 and DP=2, with and without the distributed optimizer, float32 and bfloat16).

* **Activations**, analytic: the bytes each layer keeps for its backward, per micro-batch
  (``micro_batch_size x max_length`` tokens), enumerated tensor by tensor for this
  project's layer (RMSNorm, fused QKV with RoPE, SDPA / flash attention or megatron's local
  attention, SwiGLU MLP), with and without sequence parallelism, for each recompute setting
  (selective: core attention; full: ``uniform`` or ``block`` with a number of layers). With
  pipeline parallelism (1F1B) stage ``r`` of ``P`` holds ``min(P - r, micro-batches)``
  micro-batches at once. ``kernels="cuda"`` (default) assumes torch's fused RMSNorm (input
  and ``rstd`` saved) and flash attention's output layout; ``kernels="cpu"`` is what torch's
  CPU kernels save (the composite RMSNorm keeps the input and the normalized input, both in
  float32), which the tests check exactly against the tensors autograd saves.
* **Loss head**: the unfused output layer keeps float32 logits ``tokens x V/TP`` (plus the
  bfloat16 logits while the float32 copy is made) and allocates the ``V/TP x h`` weight
  gradient in the backward; the fused head (``loss.implementation=fused``) holds one chunk
  of logits (``chunk_size x V/TP``) and two ``tokens x h`` buffers.
* **Transients**: the backward of one layer (its gradients, weight gradient and, with full
  recompute, the re-materialized layers), the word embedding's dense ``V/TP x h`` gradient
  at the end of the backward (three of them with tied embeddings on one stage and the
  unfused head: the output layer's gradient of the same weight waits for it, then the two
  are added) and the optimizer step (Adam's ``sqrt(v)``
  temporary over the whole local state, as torch's multi-tensor Adam allocates; float32
  copies of non-float32 gradients).
* **Margin**: CUDA context, NCCL buffers, library workspaces and allocator fragmentation:
  ``DEFAULT_MARGIN_GIB`` plus ``FRAGMENTATION`` of everything else.

Peak per stage = static + max(activations + max(loss head, backward transient),
activations of the other in-flight micro-batches + embedding backward, optimizer-step
transient) + margin. Sizes in the report are GiB (2**30 bytes); a GPU sold
as "80 GB" is given as ``--gpu-memory 80``.

The recommendation walks layouts from the cheapest: no recompute before recompute; within
that, pipeline stages before nothing else (PP=1 first), and tensor parallelism grows within a
node (TP <= GPUs per node, dividing heads, query groups, vocabulary and FFN) before a
pipeline stage is added; sequence parallelism is on whenever TP > 1 and the distributed
optimizer whenever DP > 1. The first layout that fits is recommended; the report says why
each cheaper one does not.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from probsft_megatron.errors import ConfigError

GiB = 2 ** 30
DEFAULT_GPU_MEMORY_GB = 80.0
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_MARGIN_GIB = 2.0
"""Fixed part of the margin: CUDA context (~0.5-1 GiB), NCCL communicator buffers, cuBLAS /
Transformer Engine workspaces."""
FRAGMENTATION = 0.05
"""Proportional part of the margin: the caching allocator reserves more than it hands out."""
OVERRIDE_FLAG = "--no-fit-check"
"""How a user overrides a refused layout in ``probsft train`` / ``probsft launch``."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
KERNELS = ("cuda", "cpu")
ADAM_IMPLS = ("foreach", "single", "fused")


# -- the layout and the workload ------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How one job is split over ``tp * pp * dp`` GPUs, and what it recomputes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    recompute_method: str | None = None  # full: uniform | block
    recompute_num_layers: int | None = None  # full: layers per unit (uniform) / per stage (block)

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ConfigError(f"TP, PP and DP must be >= 1 (got TP={self.tp} PP={self.pp} "
                              f"DP={self.dp})")
        if self.recompute not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"parallel.recompute_granularity={self.recompute!r} is invalid; "
                              f"use one of {', '.join(RECOMPUTE_GRANULARITIES)}")
        if self.recompute == "full":
            if self.recompute_method not in RECOMPUTE_METHODS:
                raise ConfigError("parallel.recompute_granularity=full needs "
                                  "parallel.recompute_method=uniform or block")
            if not self.recompute_num_layers or self.recompute_num_layers < 1:
                raise ConfigError("parallel.recompute_granularity=full needs "
                                  "parallel.recompute_num_layers >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def uses_distributed_optimizer(self) -> bool:
        """megatron's distributed optimizer only shards when there is more than one DP rank
        (``probsft train`` turns it off at DP=1)."""
        return self.distributed_optimizer and self.dp > 1

    def label(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}"]
        if self.sequence_parallel:
            parts.append("SP")
        if self.uses_distributed_optimizer:
            parts.append("dist-opt")
        if self.recompute == "selective":
            parts.append("recompute=selective")
        elif self.recompute == "full":
            parts.append(f"recompute=full/{self.recompute_method}/{self.recompute_num_layers}")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that select this layout."""
        out = [f"parallel.tensor_model_parallel_size={self.tp}",
               f"parallel.pipeline_model_parallel_size={self.pp}",
               f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
               f"optim.use_distributed_optimizer={str(self.distributed_optimizer).lower()}"]
        if self.recompute != "none":
            out.append(f"parallel.recompute_granularity={self.recompute}")
        if self.recompute == "full":
            out += [f"parallel.recompute_method={self.recompute_method}",
                    f"parallel.recompute_num_layers={self.recompute_num_layers}"]
        return out


@dataclass(frozen=True)
class Workload:
    """What one step runs: tokens per micro-batch, precision, loss head, kernels."""

    micro_batch_size: int = 1
    seq_length: int = 2048
    global_batch_size: int | None = None  # None: as many micro-batches as pipeline stages
    params_dtype: str = "bf16"  # bf16 | fp32
    grad_reduce_in_fp32: bool = True
    loss_implementation: str = "unfused"  # unfused | fused
    chunk_size: int = 512
    attention: str = "sdpa"  # sdpa | te | local (auto counts as sdpa)
    packing: bool = False
    kernels: str = "cuda"  # cuda | cpu: which kernels' saved tensors to count
    adam: str = "foreach"  # foreach | single (torch's multi-/single-tensor Adam) | fused (TE/apex)

    def __post_init__(self) -> None:
        if self.params_dtype not in DTYPE_BYTES:
            raise ConfigError(f"unknown parameter dtype {self.params_dtype!r}; "
                              f"use {' or '.join(DTYPE_BYTES)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"unknown kernels {self.kernels!r}; use {' or '.join(KERNELS)}")
        if self.adam not in ADAM_IMPLS:
            raise ConfigError(f"unknown Adam implementation {self.adam!r}; use one of "
                              f"{', '.join(ADAM_IMPLS)}")

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.params_dtype]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_reduce_in_fp32 else self.param_bytes

    def num_microbatches(self, dp: int, pp: int) -> int:
        if self.global_batch_size is None:
            return pp
        return max(1, self.global_batch_size // (self.micro_batch_size * dp))


# -- parameters and megatron's gradient buffer ------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One parameter tensor of one rank, in ``named_parameters()`` order."""

    name: str
    numel: int
    shared_embedding: bool = False  # tied embedding weight on the first / last of PP > 1 stages


def _dims(model) -> dict[str, int]:
    hd = model.head_dim or model.hidden_size // model.num_attention_heads
    return dict(h=model.hidden_size, f=model.ffn_hidden_size, v=model.vocab_size,
                q=model.num_attention_heads * hd, kv=model.num_query_groups * hd, hd=hd,
                heads=model.num_attention_heads, groups=model.num_query_groups,
                layers=model.num_layers)


def layout_problem(model, tp: int, pp: int) -> str | None:
    """Why ``model`` cannot be split ``tp`` x ``pp`` (None when it can)."""
    for key in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
        if getattr(model, key) % tp:
            return f"TP={tp} does not divide model.{key}={getattr(model, key)}"
    if model.num_layers % pp:
        return f"PP={pp} does not divide model.num_layers={model.num_layers}"
    return None


def stage_parameters(model, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> list[Param]:
    """The parameters one tensor-parallel rank of pipeline stage ``pp_rank`` holds, in the
    order megatron's ``GPTModel`` (local spec) registers them."""
    problem = layout_problem(model, tp, pp)
    if problem:
        raise ConfigError(problem)
    d = _dims(model)
    h, tied = d["h"], bool(model.tie_word_embeddings)
    first, last = pp_rank == 0, pp_rank == pp - 1
    qkv = (d["q"] + 2 * d["kv"]) // tp
    out: list[Param] = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", d["v"] // tp * h, tied and pp > 1))
    for i in range(d["layers"] // pp):
        pre = f"decoder.layers.{i}."
        out += [Param(pre + "input_layernorm.weight", h),
                Param(pre + "self_attention.linear_proj.weight", h * d["q"] // tp),
                Param(pre + "self_attention.linear_qkv.weight", qkv * h)]
        if model.qkv_bias:
            out.append(Param(pre + "self_attention.linear_qkv.bias", qkv))
        out += [Param(pre + "pre_mlp_layernorm.weight", h),
                Param(pre + "mlp.linear_fc1.weight", 2 * d["f"] // tp * h),
                Param(pre + "mlp.linear_fc2.weight", h * d["f"] // tp)]
    if last:
        out.append(Param("decoder.final_layernorm.weight", h))
        if not tied:
            out.append(Param("output_layer.weight", d["v"] // tp * h))
        elif pp > 1:  # the last stage keeps its own copy of the tied embedding
            out.append(Param("output_layer.weight", d["v"] // tp * h, True))
    return out


@dataclass
class GradBuffer:
    """megatron DDP's contiguous buffer for one stage: ``buckets`` are ``(start, end)``
    element offsets, ``ranges[i]`` is ``(start, end, bucket)`` of ``params[i]``."""

    params: list[Param]
    numel: int
    numel_unpadded: int
    buckets: list[tuple[int, int]]
    ranges: list[tuple[int, int, int]]

    def shard_numels(self, dp: int, dp_rank: int) -> list[int]:
        """Elements of each parameter inside ``dp_rank``'s slice of every bucket (what the
        distributed optimizer keeps state for)."""
        out = []
        for start, end, b in self.ranges:
            b_start, b_end = self.buckets[b]
            size = (b_end - b_start) // dp
            lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
            out.append(max(0, min(end, hi) - max(start, lo)))
        return out


def _round_up(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def grad_buffer(params: list[Param], dp: int = 1, distributed_optimizer: bool = False,
                bucket_size: int | None = None) -> GradBuffer:
    """Lay ``params`` out the way megatron's ``_ParamAndGradBuffer`` does.

    Parameters are placed in reverse registration order (roughly backward order). With the
    distributed optimizer each parameter starts at a multiple of 64 elements, each bucket
    ends at a multiple of ``lcm(dp, 128)``, and a ``shared_embedding`` parameter closes the
    bucket before it and gets its own. ``bucket_size`` (elements) is megatron's bucketing
    with ``overlap_grad_reduce``; None (this project's setting, and every stage after the
    first) is one bucket.
    """
    order = list(range(len(params)))[::-1]
    ranges: list[tuple[int, int, int] | None] = [None] * len(params)
    buckets: list[tuple[int, int]] = []
    unpadded = 0
    bucket_start = start = end = 0
    in_bucket = 0

    def close(bucket_end: int) -> int:
        nonlocal bucket_start, in_bucket, unpadded
        unpadded += bucket_end - bucket_start
        if distributed_optimizer:
            bucket_end = _round_up(bucket_end, math.lcm(dp, 128))
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for i in order:
        p = params[i]
        shared = p.shared_embedding and distributed_optimizer
        if distributed_optimizer:
            start = _round_up(start, 64)
        if shared and in_bucket:
            start = close(start)
        end = start + p.numel
        ranges[i] = (start, end, len(buckets))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or shared:
            start = close(end)
        else:
            start = end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return GradBuffer(params, numel, unpadded, buckets, ranges)  # type: ignore[arg-type]


# -- static memory ----------------------------------------------------------------------------
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


def static_memory(model, layout: Layout, workload: Workload, pp_rank: int = 0,
                  dp_rank: int = 0, bucket_size: int | None = None) -> Static:
    """Exact bytes of weights, gradient buffer and optimizer state on one rank."""
    params = stage_parameters(model, layout.tp, layout.pp, pp_rank)
    dist_opt = layout.uses_distributed_optimizer
    buf = grad_buffer(params, layout.dp, dist_opt, bucket_size if pp_rank == 0 else None)
    pb = workload.param_bytes
    if dist_opt:
        weights = buf.numel * pb
        shards = buf.shard_numels(layout.dp, dp_rank)
    else:
        weights = sum(p.numel for p in params) * pb
        shards = [p.numel for p in params]
    held = [n for n in shards if n > 0]
    return Static(
        weights=weights,
        grad_buffer=buf.numel * workload.grad_bytes,
        main_params=sum(held) * 4 if pb != 4 else 0,
        adam_moments=sum(held) * 8,
        adam_steps=len(held) * 4,
        largest_shard=max(held, default=0),
    )


# -- activations ------------------------------------------------------------------------------
@dataclass
class LayerActivations:
    """Bytes one transformer layer keeps for its backward, per micro-batch, on one rank."""

    full: int  # nothing recomputed
    selective: int  # core attention recomputed
    checkpoint_input: int  # what a fully recomputed unit keeps: its input
    backward_transient: int  # gradients alive while this layer's backward runs


def layer_activations(model, layout: Layout, workload: Workload) -> LayerActivations:
    """The tensors autograd keeps per layer, enumerated for this project's layer spec.

    Per micro-batch of ``t = b * s`` tokens on one TP rank (``D`` bytes per element of the
    parameter dtype; ``/TP`` sizes split by tensor parallelism; ``h``-sized tensors outside
    the TP region are split by TP only under sequence parallelism):

    * each RMSNorm (the first's input is the layer input, the second's the residual sum): its
      input and float32 ``rstd`` (CPU kernels: the input and the normalized input, both in
      float32), and its output, kept by the following linear;
    * attention (SDPA / flash): the fused QKV output (V is a view of it), the rotated Q and
      K, the attention output (and, with CUDA's flash layout, its copy for ``linear_proj``),
      the float32 log-sum-exp ``b x heads x s``; RoPE's cos/sin (4 x ``s x head_dim``);
    * attention (megatron's local): Q, K and V expanded to all heads, the softmax
      ``b x heads x s x s``, the context copy, the ``s x s`` mask;
    * SwiGLU MLP: ``fc1``'s output (``2f``), ``silu`` of the gate, the linear half (+0 offset,
      a new tensor), their product (``fc2``'s input): ``5f``.
    """
    d = _dims(model)
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
        attn_full = t * ((q + 2 * kv) + q + kv + q + (q if copy else 0)) * D + b * heads * s * 4 \
            + rope
        attn_selective = attn_full - b * heads * s * 4 + 4
    full = norms + mlp + attn_full
    selective = norms + mlp + attn_selective
    # backward of the MLP: while the saved tensors are still alive, the gradients of fc2's
    # input, the silu output and the linear half exist at once (3f) as fc2's input is freed:
    # 2f above what is saved; plus fc1's weight gradient and the input gradient (and the
    # re-gathered input under SP)
    transient = t * 2 * f * D + 2 * d["f"] // tp * d["h"] * D + t * d["h"] * D * (2 if sp else 1)
    return LayerActivations(full=full, selective=selective,
                            checkpoint_input=t_h * d["h"] * D,
                            backward_transient=transient)


@dataclass
class Head:
    """The loss head of the last stage, per micro-batch."""

    saved: int  # kept from forward to backward (final norm, output-layer input, logits)
    peak: int  # saved + the largest transient of its forward/backward
    unfused_peak: int  # the same for the unfused head
    fused_peak: int  # the same for the fused head


def loss_head(model, layout: Layout, workload: Workload) -> Head:
    """Final norm + output layer + cross entropy of one micro-batch on one TP rank."""
    d = _dims(model)
    tp, D = layout.tp, workload.param_bytes
    b, s = workload.micro_batch_size, workload.seq_length
    t = b * s
    sp = layout.sequence_parallel and tp > 1
    t_h = t // tp if sp else t
    v = d["v"] // tp
    cpu = workload.kernels == "cpu"
    norm = t_h * d["h"] * (8 if cpu else D) + t_h * 4  # as in layer_activations
    gathered = t * d["h"] * D if sp else 0
    # unfused: megatron's output layer keeps its input; the vocab-parallel cross entropy keeps
    # float32 logits (exp, in place), the masked targets, one boolean mask (two at TP > 1)
    u_saved = norm + t_h * d["h"] * D + t * v * 4 + t * (8 + (2 if tp > 1 else 1))
    cast = t * v * D if D != 4 else 0  # parameter-dtype logits next to the float32 copy
    u_backward = (t * d["h"] * D + v * d["h"] * D + gathered)  # d_input, weight grad
    u_peak = u_saved + max(cast, u_backward)
    # fused: the gathered hidden rows, d_hidden (both tokens x h), one chunk of logits in
    # float32 (+ its parameter-dtype product and gradient when D != 4)
    c = min(workload.chunk_size, t)
    f_saved = norm + gathered + 2 * t * d["h"] * D + t * (4 + 1 + 8)
    f_peak = f_saved + c * v * (4 + (2 * D if D != 4 else 0)) + t * d["h"] * D
    fused = workload.loss_implementation == "fused"
    return Head(saved=f_saved if fused else u_saved, peak=f_peak if fused else u_peak,
                unfused_peak=u_peak, fused_peak=f_peak)


@dataclass
class StageEstimate:
    """The peak of one pipeline stage (bytes), with its parts."""

    pp_rank: int
    static: Static
    static_other_optimizer: Static  # the same with the distributed optimizer toggled
    in_flight: int  # micro-batches whose activations this stage holds at once
    per_micro_batch: int  # activations one micro-batch keeps on this stage
    loss_head: int  # last stage: peak of the loss head (0 elsewhere)
    backward_transient: int  # one layer's backward (+ re-materialized layers, + a waiting
    #                          tied-embedding gradient)
    embedding_backward: int  # first stage: the word-embedding gradient(s) at the end of backward
    optimizer_step: int  # transient of the optimizer step
    margin: int

    @property
    def activations(self) -> int:
        return self.in_flight * self.per_micro_batch

    @property
    def dynamic(self) -> int:
        """The most bytes above the static parts at any moment of a step: the forward/loss/
        layer-backward phase, the embedding's backward (the other in-flight micro-batches
        still held), or the optimizer step."""
        layers = self.activations + max(self.loss_head, self.backward_transient)
        embedding = self.activations - self.per_micro_batch + self.embedding_backward
        return max(layers, embedding, self.optimizer_step)

    @property
    def total(self) -> int:
        return self.static.total + self.dynamic + self.margin


def recompute_terms(layer: LayerActivations, layout: Layout, layers: int,
                    rope_bytes: int = 0) -> tuple[int, int]:
    """(kept per micro-batch, re-materialized during one backward) for a stage of ``layers``.

    Full recompute keeps each checkpointed unit's input, and once the float32 RoPE
    frequencies the checkpoints receive (``rope_bytes``: ``s x head_dim x 4``)."""
    if layout.recompute == "selective":
        return layers * layer.selective, 0
    if layout.recompute == "full":
        n = min(layout.recompute_num_layers or 1, layers)
        if layout.recompute_method == "uniform":
            return math.ceil(layers / n) * layer.checkpoint_input + rope_bytes, n * layer.full
        return n * layer.checkpoint_input + (layers - n) * layer.full + rope_bytes, layer.full
    return layers * layer.full, 0


def estimate_stage(model, layout: Layout, workload: Workload, pp_rank: int,
                   margin_gib: float = DEFAULT_MARGIN_GIB, dp_rank: int | None = None) -> StageEstimate:
    """Peak memory of one rank of pipeline stage ``pp_rank`` (``dp_rank`` None: the DP rank
    with the most optimizer state)."""
    ranks = range(layout.dp) if dp_rank is None and layout.uses_distributed_optimizer else [dp_rank or 0]
    static = max((static_memory(model, layout, workload, pp_rank, r) for r in ranks),
                 key=lambda st: st.total)
    other = dataclasses.replace(layout, distributed_optimizer=not layout.distributed_optimizer)
    other_static = max((static_memory(model, other, workload, pp_rank, r)
                        for r in (range(other.dp) if other.uses_distributed_optimizer else [0])),
                       key=lambda st: st.total)
    d = _dims(model)
    layers = d["layers"] // layout.pp
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    layer = layer_activations(model, layout, workload)
    kept, remat = recompute_terms(layer, layout, layers, workload.seq_length * d["hd"] * 4)
    t = workload.micro_batch_size * workload.seq_length
    per_mb = kept
    if first:
        per_mb += t * 8  # token ids kept by the embedding
    if not last:
        per_mb += layer.checkpoint_input  # the stage output the 1F1B schedule keeps until backward
    if workload.packing:
        per_mb += workload.micro_batch_size * workload.seq_length ** 2  # boolean [b,1,s,s] mask
    m = workload.num_microbatches(layout.dp, layout.pp)
    in_flight = min(layout.pp - pp_rank, m) if layout.pp > 1 else 1
    head = loss_head(model, layout, workload).peak if last else 0
    # Adam: torch's multi-tensor step allocates sqrt(v) for all local state, the single-tensor
    # step sqrt(v) and its quotient for one tensor at a time; float32 grads are copied for
    # non-float32 gradient buffers; grad clipping scales one tensor at a time
    held = static.adam_moments // 8
    step = 4 * static.largest_shard
    if workload.adam == "foreach":
        step += 4 * held
    elif workload.adam == "single":
        step += 4 * static.largest_shard
    if workload.grad_bytes != 4:
        step += 4 * held
    # the word-embedding gradient is a dense V/TP x h tensor; with tied embeddings on one
    # stage the unfused output layer's gradient of the same weight waits for it through the
    # whole backward, then autograd adds the two (a third tensor); the fused head adds its
    # part to DDP's buffer during the forward instead
    emb_grad = d["v"] // layout.tp * d["h"] * workload.param_bytes
    tied_one_stage = (bool(model.tie_word_embeddings) and layout.pp == 1
                      and workload.loss_implementation != "fused")
    waiting = emb_grad if tied_one_stage else 0
    est = StageEstimate(pp_rank=pp_rank, static=static, static_other_optimizer=other_static,
                        in_flight=in_flight, per_micro_batch=per_mb, loss_head=head,
                        backward_transient=remat + layer.backward_transient + waiting,
                        embedding_backward=(3 if tied_one_stage else 1) * emb_grad if first else 0,
                        optimizer_step=step, margin=0)
    est.margin = int(margin_gib * GiB + FRAGMENTATION * (static.total + est.dynamic))
    return est


@dataclass
class Estimate:
    """Every stage of one layout; ``worst`` is the stage the verdict is about."""

    layout: Layout
    workload: Workload
    stages: list[StageEstimate]

    @property
    def worst(self) -> StageEstimate:
        return max(self.stages, key=lambda st: st.total)

    @property
    def total(self) -> int:
        return self.worst.total

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total <= gpu_memory_gb * GiB

    def parts(self) -> dict[str, float]:
        """The worst stage's parts in GiB (for tables and JSON)."""
        w = self.worst
        return {
            "weights": w.static.weights / GiB,
            "gradient_buffer": w.static.grad_buffer / GiB,
            "optimizer_state": w.static.optimizer / GiB,
            "activations": w.activations / GiB,
            "loss_head": w.loss_head / GiB,
            "backward_transient": w.backward_transient / GiB,
            "embedding_backward": w.embedding_backward / GiB,
            "optimizer_step_transient": w.optimizer_step / GiB,
            "margin": w.margin / GiB,
            "total": w.total / GiB,
        }


def estimate(model, layout: Layout, workload: Workload,
             margin_gib: float = DEFAULT_MARGIN_GIB) -> Estimate:
    """The per-GPU estimate of ``layout`` (all pipeline stages)."""
    problem = layout_problem(model, layout.tp, layout.pp)
    if problem:
        raise ConfigError(problem)
    if layout.recompute == "full" and layout.recompute_method == "uniform":
        layers = model.num_layers // layout.pp
        if layers % min(layout.recompute_num_layers or 1, layers):
            raise ConfigError(f"parallel.recompute_num_layers={layout.recompute_num_layers} does "
                              f"not divide the {layers} layers of a pipeline stage "
                              "(recompute_method=uniform)")
    return Estimate(layout, workload, [estimate_stage(model, layout, workload, r, margin_gib)
                                       for r in range(layout.pp)])


# -- from a training config -------------------------------------------------------------------
def _opt(section: Any, name: str, default: Any) -> Any:
    value = getattr(section, name, default)
    return default if value is None else value


def layout_of(cfg, world_size: int) -> Layout:
    """The layout ``cfg`` asks for on ``world_size`` GPUs."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ConfigError(f"TP*PP = {tp}*{pp} does not divide the {world_size} GPUs; change "
                          "parallel.tensor_model_parallel_size / pipeline_model_parallel_size "
                          "or the number of GPUs")
    granularity = str(_opt(par, "recompute_granularity", "none")).lower()
    full = granularity == "full"
    return Layout(
        tp=tp, pp=pp, dp=world_size // (tp * pp),
        sequence_parallel=bool(par.sequence_parallel),
        distributed_optimizer=bool(_opt(cfg.optim, "use_distributed_optimizer", True)),
        recompute=granularity,
        recompute_method=str(_opt(par, "recompute_method", "uniform")) if full else None,
        recompute_num_layers=int(_opt(par, "recompute_num_layers", 1)) if full else None,
    )


def workload_of(cfg, device: str = "cuda") -> Workload:
    """The per-step workload of ``cfg`` on a ``device`` (``cuda``: ``precision=auto`` is
    bf16; ``cpu``: fp32, CPU kernels, torch's single-tensor Adam)."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    attention = cfg.train.attention if cfg.train.attention in ("local", "te") else "sdpa"
    return Workload(
        micro_batch_size=cfg.train.micro_batch_size,
        seq_length=cfg.data.max_length,
        global_batch_size=cfg.train.global_batch_size,
        params_dtype=precision,
        grad_reduce_in_fp32=bool(_opt(cfg.optim, "grad_reduce_in_fp32", True)),
        loss_implementation=cfg.loss.implementation,
        chunk_size=cfg.loss.chunk_size,
        attention=attention,
        packing=bool(getattr(cfg.data, "packing", False)),
        kernels=device,
        adam="foreach" if device == "cuda" else "single",
    )


# -- the recommendation ------------------------------------------------------------------------
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


def candidate_layouts(model, world_size: int, gpus_per_node: int,
                      distributed_optimizer: bool = True) -> list[Layout]:
    """Layouts from the cheapest: recompute last (none, selective, full/block with 1, 2, ...
    layers, full/uniform/1); for each, PP ascending and TP ascending within a node."""
    splits = [(tp, pp) for pp in _divisors(world_size) for tp in _divisors(world_size // pp)
              if tp <= gpus_per_node]
    splits.sort(key=lambda x: (x[1], x[0]))
    out: list[Layout] = []

    def add(**recompute) -> None:
        for tp, pp in splits:
            if recompute.get("recompute_num_layers", 0) > model.num_layers // pp:
                continue
            out.append(Layout(tp=tp, pp=pp, dp=world_size // (tp * pp),
                              sequence_parallel=tp > 1,
                              distributed_optimizer=distributed_optimizer, **recompute))

    add()
    add(recompute="selective")
    for n in range(1, model.num_layers + 1):
        add(recompute="full", recompute_method="block", recompute_num_layers=n)
    add(recompute="full", recompute_method="uniform", recompute_num_layers=1)
    return out


def evaluate(model, layout: Layout, workload: Workload, gpu_memory_gb: float,
             margin_gib: float = DEFAULT_MARGIN_GIB) -> Candidate:
    """One layout: possible? fits? (with the reason when not)."""
    problem = layout_problem(model, layout.tp, layout.pp)
    if problem:
        return Candidate(layout, None, problem)
    gbs, mbs = workload.global_batch_size, workload.micro_batch_size
    if gbs is not None and gbs % (mbs * layout.dp):
        return Candidate(layout, None, f"train.global_batch_size={gbs} is not a multiple of "
                                       f"micro batch x DP = {mbs}x{layout.dp}")
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
    rejected: list[Candidate] = field(default_factory=list)  # cheaper layouts that do not fit

    @property
    def fits(self) -> bool:
        return self.requested.fits


def plan_model(model, workload: Workload, requested: Layout, gpus: int,
               gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
               gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
               margin_gib: float = DEFAULT_MARGIN_GIB) -> Plan:
    """Estimate ``requested`` and search the cheapest layout that fits on ``gpus`` GPUs."""
    req = evaluate(model, requested, workload, gpu_memory_gb, margin_gib)
    rejected: list[Candidate] = []
    best = None
    for layout in candidate_layouts(model, gpus, min(gpus_per_node, gpus)):
        cand = evaluate(model, layout, workload, gpu_memory_gb, margin_gib)
        if cand.fits:
            best = cand
            break
        rejected.append(cand)
    return Plan(gpus, gpus_per_node, gpu_memory_gb, req, best, rejected)


def plan(cfg, gpus: int | None = None, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
         gpus_per_node: int = DEFAULT_GPUS_PER_NODE, device: str = "cuda",
         margin_gib: float = DEFAULT_MARGIN_GIB) -> Plan:
    """:func:`plan_model` for a :class:`~probsft_megatron.config.TrainJobConfig`."""
    gpus = gpus_per_node if gpus is None else gpus
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1 (got {gpus})")
    if gpu_memory_gb <= 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GB (got {gpu_memory_gb})")
    return plan_model(cfg.model, workload_of(cfg, device), layout_of(cfg, gpus), gpus,
                      gpu_memory_gb, gpus_per_node, margin_gib)


@dataclass
class Verdict:
    """What ``probsft train`` / ``probsft launch`` need: fits or not, and one line saying so."""

    fits: bool
    message: str
    needed_gib: float
    recommended: Layout | None
    plan: Plan


def check_fits(cfg, world_size: int, gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
               gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> Verdict:
    """Does ``cfg`` fit on ``world_size`` GPUs of ``gpu_memory_gb``? Arithmetic only (no model,
    no megatron import). A refusal's message is one line naming the recommended layout's
    overrides and the explicit override flag (:data:`OVERRIDE_FLAG`)."""
    p = plan(cfg, world_size, gpu_memory_gb, gpus_per_node)
    req = p.requested
    need = req.estimate.total / GiB if req.estimate else float("nan")
    if req.fits:
        msg = (f"fits: {req.layout.label()} needs {need:.1f} GiB of {gpu_memory_gb:g} per GPU")
        return Verdict(True, msg, need, req.layout, p)
    what = (f"{req.layout.label()} needs {need:.1f} GiB per GPU, more than the "
            f"{gpu_memory_gb:g} GiB of each of {world_size} GPU(s)") if req.estimate else \
        f"{req.layout.label()} is not possible ({req.reason})"
    if p.recommended is not None:
        rec = p.recommended
        fix = (f"use {rec.layout.label()} ({rec.estimate.total / GiB:.1f} GiB): "
               f"{' '.join(rec.layout.overrides())}")
    else:
        fix = "no layout fits on these GPUs: add GPUs, lower train.micro_batch_size or " \
              "data.max_length, or use loss.implementation=fused"
    msg = f"will not fit: {what}; {fix}; or pass {OVERRIDE_FLAG} to run it anyway"
    return Verdict(False, msg, need, p.recommended.layout if p.recommended else None, p)
