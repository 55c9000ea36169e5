"""The peak of a training step on one GPU, per pipeline stage, with its parts (PARTS)."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from probsft_megatron.errors import ConfigError
from probsft_megatron.plan.activations import layer_activations, loss_head, recompute_terms
from probsft_megatron.plan.layout import GiB, Layout, Workload, dims, layout_problem
from probsft_megatron.plan.static import Static, static_memory

DEFAULT_MARGIN_GIB = 2.0
"""Fixed part of the margin: CUDA context (~0.5-1 GiB), NCCL communicator buffers, cuBLAS /
Transformer Engine workspaces."""
FRAGMENTATION = 0.05
"""Proportional part of the margin: the caching allocator reserves more than it hands out."""
PARTS = (  # JSON key, table label, attribute of a StageEstimate
    ("weights", "weights", "static.weights"),
    ("gradient_buffer", "gradient buffer", "static.grad_buffer"),
    ("optimizer_state", "optimizer state", "static.optimizer"),
    ("activations", "activations (in flight)", "activations"),
    ("loss_head", "loss head", "loss_head"),
    ("backward_transient", "backward transient", "backward_transient"),
    ("embedding_backward", "embedding backward", "embedding_backward"),
    ("optimizer_step_transient", "optimizer-step transient", "optimizer_step"),
    ("margin", "margin", "margin"),
    ("total", "peak per GPU", "total"),
)


@dataclass
class StageEstimate:
    """The peak of one pipeline stage (bytes), with its parts."""

    pp_rank: int
    static: Static
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
        """The most bytes above the static parts: the layer phase, the embedding's backward
        (the other in-flight micro-batches held) or the optimizer step."""
        layers = self.activations + max(self.loss_head, self.backward_transient)
        embedding = self.activations - self.per_micro_batch + self.embedding_backward
        return max(layers, embedding, self.optimizer_step)

    @property
    def total(self) -> int:
        return self.static.total + self.dynamic + self.margin


def estimate_stage(
    model, layout: Layout, workload: Workload, pp_rank: int, margin_gib: float = DEFAULT_MARGIN_GIB
) -> StageEstimate:
    """Peak memory of pipeline stage ``pp_rank`` on its DP rank with the most optimizer state."""
    ranks = range(layout.dp) if layout.uses_distributed_optimizer else [0]
    parts = (static_memory(model, layout, workload, pp_rank, r) for r in ranks)
    static = max(parts, key=attrgetter("total"))
    d = dims(model)
    layers = d["layers"] // layout.pp
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    layer = layer_activations(model, layout, workload)
    kept, remat = recompute_terms(layer, layout, layers, workload.seq_length * d["hd"] * 4)
    t = workload.micro_batch_size * workload.seq_length
    # + the token ids the embedding keeps (first stage), + the stage output the 1F1B schedule
    # keeps until its backward (all but the last)
    per_mb = kept + (t * 8 if first else 0) + (0 if last else layer.checkpoint_input)
    # packing (cu_seqlens, one row of the micro-batch's tokens) keeps no s x s mask
    m = workload.num_microbatches(layout.dp, layout.pp)
    in_flight = min(layout.pp - pp_rank, m) if layout.pp > 1 else 1
    head = loss_head(model, layout, workload).peak if last else 0
    # Adam: torch's multi-tensor step allocates sqrt(v) for all local state, the single-tensor
    # step sqrt(v) and its quotient for one tensor at a time; float32 grads are copied for
    # non-float32 gradient buffers; grad clipping scales one tensor at a time
    held = static.adam_moments // 8
    adam = {"foreach": held, "single": static.largest_shard}.get(workload.adam, 0)
    step = 4 * (static.largest_shard + adam + (held if workload.grad_bytes != 4 else 0))
    # the word-embedding gradient is a dense V/TP x h tensor; with tied embeddings on one
    # stage the unfused output layer's gradient of the same weight waits for it through the
    # whole backward, then autograd adds the two (a third tensor); the fused head adds its
    # part to DDP's buffer during the forward instead
    emb_grad = d["v"] // layout.tp * d["h"] * workload.param_bytes
    unfused = workload.loss_implementation != "fused"
    tied_one_stage = bool(model.tie_word_embeddings) and layout.pp == 1 and unfused
    waiting = emb_grad if tied_one_stage else 0
    est = StageEstimate(
        pp_rank=pp_rank,
        static=static,
        in_flight=in_flight,
        per_micro_batch=per_mb,
        loss_head=head,
        backward_transient=remat + layer.backward_transient + waiting,
        embedding_backward=(3 if tied_one_stage else 1) * emb_grad if first else 0,
        optimizer_step=step,
        margin=0,
    )
    est.margin = int(margin_gib * GiB + FRAGMENTATION * (static.total + est.dynamic))
    return est


@dataclass
class Estimate:
    """Every stage of one layout; ``worst`` is the stage the verdict is about."""

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
        return {key: attrgetter(attr)(self.worst) / GiB for key, _, attr in PARTS}


def estimate(
    model, layout: Layout, workload: Workload, margin_gib: float = DEFAULT_MARGIN_GIB
) -> Estimate:
    """The per-GPU estimate of ``layout`` (all pipeline stages)."""
    if problem := layout_problem(model, layout.tp, layout.pp):
        raise ConfigError(problem)
    if layout.recompute == "full" and layout.recompute_method == "uniform":
        layers = model.num_layers // layout.pp
        if layers % min(layout.recompute_num_layers or 1, layers):
            raise ConfigError(
                f"parallel.recompute_num_layers={layout.recompute_num_layers} does not divide "
                f"the {layers} layers of a pipeline stage (recompute_method=uniform)"
            )
    return Estimate(
        [estimate_stage(model, layout, workload, r, margin_gib) for r in range(layout.pp)]
    )
