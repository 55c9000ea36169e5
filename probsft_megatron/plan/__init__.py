"""Will it fit? Per-GPU memory of a training job, and the cheapest layout that fits.

The parameters are counted on the real model, built stage by stage on the meta device
(:func:`~probsft_megatron.plan.static.stage_parameters`: shapes only, no memory, no process
group left behind); everything else is arithmetic on the model description and the layout, so
the check takes seconds (most of it importing megatron) and is safe to run before anything is
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

The modules, one concern each:

* :mod:`~probsft_megatron.plan.layout`: :class:`Layout` and :class:`Workload` (the recompute
  choices are :mod:`probsft_megatron.config`'s), and whether a model splits ``TP x PP``;
* :mod:`~probsft_megatron.plan.static`: parameters per rank, megatron's gradient buffer and
  the optimizer state, byte-exact;
* :mod:`~probsft_megatron.plan.activations`: what a layer and the loss head keep for their
  backward, and what recomputation keeps instead;
* :mod:`~probsft_megatron.plan.estimate`: the peak of each pipeline stage;
* :mod:`~probsft_megatron.plan.search`: the layout of a config, the search for the cheapest
  layout that fits, :func:`check_fits`;
* :mod:`~probsft_megatron.plan.present`: the plan as JSON-ready data, text tables and the
  recipes table (what ``probsft plan`` prints).
"""

from __future__ import annotations

from probsft_megatron.plan.activations import (
    Head,
    LayerActivations,
    layer_activations,
    loss_head,
    recompute_terms,
)
from probsft_megatron.plan.estimate import (
    DEFAULT_MARGIN_GIB,
    FRAGMENTATION,
    Estimate,
    StageEstimate,
    estimate,
    estimate_stage,
)
from probsft_megatron.plan.layout import (
    ADAM_IMPLS,
    DTYPE_BYTES,
    KERNELS,
    GiB,
    Layout,
    Workload,
    dims,
    layout_problem,
)
from probsft_megatron.plan.present import (
    NODE_GPUS,
    NODE_MEMORIES_GB,
    NODE_RECIPE_MIN_PARAMS,
    alternatives,
    lora_table,
    node_recipes,
    plan_report,
    recipes_table,
    render_plan,
)
from probsft_megatron.plan.search import (
    DEFAULT_GPU_MEMORY_GB,
    DEFAULT_GPUS_PER_NODE,
    OVERRIDE_FLAG,
    Candidate,
    Plan,
    Verdict,
    candidate_layouts,
    check_fits,
    evaluate,
    layout_of,
    plan,
    plan_model,
    workload_of,
)
from probsft_megatron.plan.static import (
    GradBuffer,
    Param,
    Static,
    grad_buffer,
    stage_parameters,
    static_memory,
)

__all__ = [
    "ADAM_IMPLS",
    "DEFAULT_GPUS_PER_NODE",
    "DEFAULT_GPU_MEMORY_GB",
    "DEFAULT_MARGIN_GIB",
    "DTYPE_BYTES",
    "FRAGMENTATION",
    "KERNELS",
    "NODE_GPUS",
    "NODE_MEMORIES_GB",
    "NODE_RECIPE_MIN_PARAMS",
    "OVERRIDE_FLAG",
    "Candidate",
    "Estimate",
    "GiB",
    "GradBuffer",
    "Head",
    "LayerActivations",
    "Layout",
    "Param",
    "Plan",
    "StageEstimate",
    "Static",
    "Verdict",
    "Workload",
    "alternatives",
    "candidate_layouts",
    "check_fits",
    "dims",
    "estimate",
    "estimate_stage",
    "evaluate",
    "grad_buffer",
    "layer_activations",
    "layout_of",
    "layout_problem",
    "loss_head",
    "node_recipes",
    "plan",
    "plan_model",
    "plan_report",
    "recipes_table",
    "lora_table",
    "recompute_terms",
    "render_plan",
    "stage_parameters",
    "static_memory",
    "workload_of",
]
