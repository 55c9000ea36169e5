"""Multi-rank exactness worker for the fused linear + objective loss (torchrun, gloo on CPU).

Two checks, both written as JSON by global rank 0:

* ``op`` (TP layouts only): the fused loss against the unfused computation at the *same*
  layout, on random fp32 inputs identical on every rank: megatron's output-layer collective
  (sequence gather under SP, copy-to-TP-region otherwise), ``hidden @ W_local^T``,
  ``vocab_parallel_cross_entropy`` and :class:`ObjectiveLoss`. Reports, per objective, the
  largest difference over ranks of the loss sum, the statistics, ``d_hidden`` (this rank's
  slice) and ``d_weight`` (this rank's shard), and the largest reference magnitudes.
* ``train``: a few optimizer steps of the tiny Qwen2-style model (untied and tied embeddings)
  per objective from a shared torch_dist initial checkpoint, through megatron's schedule and
  optimizer. Per-step losses and grad norms are compared by the test with those of a
  single-rank unfused run (``--layouts ref --save-init`` under one process).

Layouts: ``ref`` (TP=1, unfused, one process), ``tp2`` and ``tp2_sp`` (TP=2 fused, the latter
with sequence parallelism), ``pp2`` (PP=2 fused). Megatron's model-parallel groups are rebuilt
for each layout inside the same process group.

``--break-sumexp-reduce`` is the negative control: the fused op then skips the TP all-reduce
of the sum of exponentials (its target-logit reduction still runs), which the ``op`` check
must expose.
"""

import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from probsft_megatron.fileio import atomic_write_json

OBJECTIVES = (
    "original,p,GeneralFamily-8,OnlyTopP-0.3,UnlikehoodTop-0.5,OnlyBottomP-K50,"
    "OnlyBottomP-K50@micro"
)
TIED_OBJECTIVES = "original,UnlikehoodTop-0.5,OnlyBottomP-K50"
OP_OBJECTIVES = (
    "original,p,GeneralFamily-8,OnlyTopP-0.3,OnlyBottomP-0.3,OnlyTopLogP-0.3,"
    "OnlyBottomLogP-0.3,UnlikehoodTop-0.5,UnlikehoodBottom-0.3,OnlyBottomP-K50"
)
LAYOUTS = {
    "ref": (1, 1, False),
    "tp2": (2, 1, False),
    "tp2_sp": (2, 1, True),
    "pp2": (1, 2, False),
    "dp2": (1, 1, False),
}  # dp2: whatever ranks TP/PP leave


def loss_config(spec: str, implementation: str):
    """``name[@micro]`` -> LossConfig (``@micro``: per-micro-batch percentile, no pre-pass)."""
    from probsft_megatron.loss import LossConfig

    name, _, scope = spec.partition("@")
    return LossConfig(
        objective=name,
        implementation=implementation,
        percentile_scope=scope or "global",
        chunk_size=24,
    )


def break_sumexp_reduction() -> None:
    from probsft_megatron import fused_loss

    reduce_all = fused_loss._reduce_partials
    fused_loss._reduce_partials = lambda partials, group: reduce_all(partials[:1], group)


def batches(steps, global_batch, seq, vocab, seed, stay=0.7):
    """Random tokens that repeat the previous one with probability ``stay``, and a prompt
    prefix outside the loss mask. With :func:`save_init`'s weights the model predicts
    "next = current", so target probabilities spread over (0, 1) without ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        fresh = torch.randint(0, vocab, (global_batch, seq + 1), generator=g)
        repeat = torch.rand(global_batch, seq + 1, generator=g) < stay
        tokens = fresh.clone()
        for t in range(1, seq + 1):
            tokens[:, t] = torch.where(repeat[:, t], tokens[:, t - 1], fresh[:, t])
        prompt = torch.randint(1, seq // 2, (global_batch,), generator=g)
        mask = (torch.arange(seq)[None, :] >= prompt[:, None]).float()
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask))
    return out


def set_layout(name: str):
    from probsft_megatron import compat
    from probsft_megatron.model import ParallelConfig

    tp, pp, sp = LAYOUTS[name]
    compat.destroy_model_parallel()
    compat.initialize_model_parallel(tp, pp)
    compat.seed_model_parallel(1234)
    return ParallelConfig(tp, pp, sp)


def op_check(sp: bool, objectives: list[str]) -> dict:
    """Fused vs unfused at the current TP layout on random inputs; max diffs over ranks."""
    from megatron.core import parallel_state, tensor_parallel

    from probsft_megatron.fused_loss import fused_objective_loss
    from probsft_megatron.loss import ObjectiveLoss

    group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    b, s, h, vocab = 3, 10, 16, 64
    g = torch.Generator().manual_seed(7)
    hidden_full = torch.randn(b, s, h, generator=g)
    weight_full = torch.randn(vocab, h, generator=g) * 0.6
    with torch.no_grad():  # labels drawn from the model itself: p spread over (0, 1)
        labels = torch.multinomial(
            torch.softmax(hidden_full @ weight_full.T, -1).view(-1, vocab), 1, generator=g
        ).view(b, s)
    mask = (torch.rand(b, s, generator=g) < 0.75).float()
    rows = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    seq = slice(rank * s // tp, (rank + 1) * s // tp) if sp else slice(None)

    def leaves():
        return (
            hidden_full[:, seq].clone().requires_grad_(True),
            weight_full[rows].clone().requires_grad_(True),
        )

    out = {}
    for spec in objectives:
        cfg = loss_config(spec, "fused")
        # unfused: the output layer's collective, the local logits, megatron's vocab-parallel CE
        hid, w = leaves()
        x = hid.transpose(0, 1)
        x = (
            tensor_parallel.gather_from_sequence_parallel_region(x, group=group)
            if sp
            else tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)
        )
        ce = tensor_parallel.vocab_parallel_cross_entropy(x @ w.T, labels.T.contiguous()).T
        ref_sum, ref_n, ref_extra = ObjectiveLoss(cfg)(ce, mask)
        ref_dh, ref_dw = torch.autograd.grad(ref_sum, [hid, w])
        # fused
        hid, w = leaves()
        got_sum, got_n, got_extra = fused_objective_loss(
            hid,
            w,
            labels,
            mask,
            ObjectiveLoss(cfg),
            tp_group=group,
            sequence_parallel=sp,
            chunk_size=7,
        )
        got_dh, got_dw = torch.autograd.grad(got_sum, [hid, w])
        diffs = torch.tensor(
            [
                (got_sum - ref_sum).abs().item(),
                float(int(got_n) != int(ref_n)),
                (got_extra["stats"] - ref_extra["stats"]).abs().max().item(),
                (got_dh - ref_dh).abs().max().item(),
                (got_dw - ref_dw).abs().max().item(),
                ref_sum.abs().item(),
                ref_dh.abs().max().item(),
                ref_dw.abs().max().item(),
                float(int(ref_n)),
                ref_extra["stats"][1].item(),
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        out[spec] = dict(
            zip(
                [
                    "loss",
                    "count",
                    "stats",
                    "d_hidden",
                    "d_weight",
                    "ref_loss",
                    "ref_d_hidden",
                    "ref_d_weight",
                    "ref_count",
                    "ref_response",
                ],
                diffs.tolist(),
            )
        )
    return out


def train(parallel, model_cfg, objectives, implementation, init_ckpt, steps) -> dict:
    """Per-objective per-step losses (last stage) and grad norms from the shared init."""
    from megatron.core import parallel_state

    from probsft_megatron import compat, runtime
    from probsft_megatron.loss import ObjectiveLoss
    from probsft_megatron.model import transformer_config

    tconfig = transformer_config(model_cfg, parallel)
    global_batch, micro, seq = 4, 2, 24
    # each data-parallel rank trains its own slice of the global batch
    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    mine = range(dp_rank * global_batch // dp, (dp_rank + 1) * global_batch // dp, micro)
    pos = torch.arange(seq)[None, :].expand(micro, -1).contiguous()
    out = {}
    for spec in objectives:
        cfg = loss_config(spec, implementation)
        chunks, optimizer = runtime.build_training_model(
            model_cfg, tconfig, lr=1e-3, load_dir=init_ckpt, loss_config=cfg
        )
        loss = ObjectiveLoss(cfg, dp_group=compat.data_parallel_group())
        fwd = runtime.loss_head(loss, "cpu")
        rec = {"loss": [], "grad_norm": [], "frac_kept": []}
        for tokens, labels, mask in batches(steps, global_batch, seq, model_cfg.vocab_size, seed=0):
            mbs = [
                runtime.Batch(
                    tokens[i : i + micro], labels[i : i + micro], mask[i : i + micro], pos
                )
                for i in mine
            ]
            stats = runtime.train_step(
                chunks, optimizer, fwd, mbs, seq_length=seq, micro_batch_size=micro
            )
            rec["grad_norm"].append(stats.grad_norm)
            if stats.loss_sum is not None:
                rec["loss"].append(stats.loss)
                rec["frac_kept"].append(stats.frac_kept)
        out[spec] = (
            rec
            if (runtime.is_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0)
            else None
        )
    return out


def save_init(model_cfg, init_ckpt, emb_std=0.1) -> None:
    """Initial weights that already predict "next token = current token" (output weight =
    word embeddings, scaled so the copy probability is moderate); saved as torch_dist."""
    from probsft_megatron import runtime
    from probsft_megatron.model import ParallelConfig, build_gpt_model, transformer_config

    gpt = build_gpt_model(model_cfg, transformer_config(model_cfg, ParallelConfig()))
    with torch.no_grad():
        emb = gpt.embedding.word_embeddings.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(5)) * emb_std)
        if not model_cfg.tie_word_embeddings:
            gpt.output_layer.weight.copy_(emb)
    runtime.save_model_weights(gpt, init_ckpt)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="tp2,tp2_sp,pp2")
    ap.add_argument("--objectives", default=OBJECTIVES, help="trained objectives")
    ap.add_argument(
        "--op-objectives", default=OP_OBJECTIVES, help="objectives of the op-level comparison"
    )
    ap.add_argument(
        "--tied-objectives",
        default=TIED_OBJECTIVES,
        help="objectives trained with tied embeddings too",
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--init-ckpt", help="folder holding the untied/ and tied/ checkpoints")
    ap.add_argument("--save-init", action="store_true")
    ap.add_argument("--op-only", action="store_true", help="skip the training steps")
    ap.add_argument("--break-sumexp-reduce", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from tiny_model import TINY_QWEN2

    from probsft_megatron import runtime
    from probsft_megatron.model import ParallelConfig

    torch.use_deterministic_algorithms(True)
    if args.break_sumexp_reduce:
        break_sumexp_reduction()
    objectives = args.objectives.split(",")
    models = {
        "untied": TINY_QWEN2,
        "tied": dataclasses.replace(TINY_QWEN2, tie_word_embeddings=True),
    }
    runtime.init_distributed(ParallelConfig(1, 1), seed=1234)
    if args.save_init:
        for tie, cfg in models.items():
            save_init(cfg, os.path.join(args.init_ckpt, tie))
        dist.barrier()

    result = {"op": {}, "train": {}}
    for layout in args.layouts.split(","):
        parallel = set_layout(layout)
        if parallel.tensor_model_parallel_size > 1:
            result["op"][layout] = op_check(
                parallel.sequence_parallel, args.op_objectives.split(",")
            )
        if args.op_only:
            continue
        implementation = "unfused" if layout == "ref" else "fused"
        per_tie = {"untied": objectives, "tied": args.tied_objectives.split(",")}
        if (
            dist.get_world_size()
            // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)
            > 1
        ):
            # a per-micro-batch percentile depends on how micro-batches split over DP ranks
            per_tie = {k: [o for o in v if not o.endswith("@micro")] for k, v in per_tie.items()}
        result["train"][layout] = {
            tie: train(
                parallel,
                cfg,
                per_tie[tie],
                implementation,
                os.path.join(args.init_ckpt, tie),
                args.steps,
            )
            for tie, cfg in models.items()
        }

    # Losses live on the last stage's TP rank 0; merge every rank's records on rank 0.
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        for layout, per_tie in result["train"].items():
            for tie, per_obj in per_tie.items():
                for spec in per_obj:
                    per_obj[spec] = next(
                        r["train"][layout][tie][spec]
                        for r in gathered
                        if r["train"][layout][tie][spec] is not None
                    )
        atomic_write_json(args.out, result, indent=None)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
