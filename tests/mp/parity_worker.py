"""Multi-rank parity worker: train the tiny Qwen2-style model a few steps per objective.

Run under torchrun (gloo on CPU). Every layout trains on the same global batches from the
same initial weights (a torch_dist checkpoint written by the single-rank reference run and
resharded on load), so per-step losses and grad norms must agree across layouts.
Writes ``{objective: {"loss": [...], "grad_norm": [...], "mean_p": [...], ...}}`` as JSON
from the rank that holds the last pipeline stage and DP rank 0. ``--recompute`` trains the
parity steps with megatron's activation recomputation (the reference's pre-training never
recomputes), which must not change a single figure beyond rounding.

``--varlen`` trains instead on examples of varied lengths batched by the real
``GlobalBatchLoader`` in each layout of a micro-batch: ``max_length`` (every row padded to
``--seq``), ``longest`` (dynamic padding) and ``packed`` (one ``thd`` row with
``cu_seqlens``), plus ``packed_crossing`` for the first objective (negative control: one
sequence spanning the packed row, so attention crosses the examples' boundaries). Results
are keyed ``objective/layout``.

``--cases FILE`` (a JSON list of argument lists, each with its own ``--out``) runs several
cases in one launch: one process group, megatron's groups rebuilt for each case.
"""

import argparse
import json
import sys
import types

import torch

from probsft_megatron.fileio import atomic_write_json


def break_tp_reduction():
    """Negative control: skip the SUM all-reduces inside megatron's vocab-parallel CE.
    Returns the function that puts them back."""
    import megatron.core.tensor_parallel.cross_entropy as ce_mod

    real_torch, real_dist = ce_mod.torch, torch.distributed

    def all_reduce(tensor, op=real_dist.ReduceOp.SUM, group=None, async_op=False):
        if op == real_dist.ReduceOp.SUM:
            return None
        return real_dist.all_reduce(tensor, op=op, group=group, async_op=async_op)

    fake_dist = types.SimpleNamespace(
        **{k: getattr(real_dist, k) for k in dir(real_dist) if not k.startswith("__")}
    )
    fake_dist.all_reduce = all_reduce
    fake_torch = types.SimpleNamespace(
        **{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")}
    )
    fake_torch.distributed = fake_dist
    ce_mod.torch = fake_torch
    return lambda: setattr(ce_mod, "torch", real_torch)


def global_batches(steps, global_batch, seq, vocab, seed=0, noise=0.3):
    """Counting sequences (next = token + 1) with a fraction of random tokens: learnable,
    so a briefly pre-trained model has token probabilities spread over (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (global_batch, 1), generator=g)
        tokens = (start + torch.arange(seq + 1)[None, :]) % vocab
        noisy = torch.rand(global_batch, seq + 1, generator=g) < noise
        tokens = torch.where(noisy, torch.randint(0, vocab, tokens.shape, generator=g), tokens)
        prompt_len = torch.randint(1, seq // 2, (global_batch,), generator=g)
        mask = (torch.arange(seq)[None, :] >= prompt_len[:, None]).float()
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask))
    return out


class VarlenExamples:
    """The rows of :func:`global_batches` cut to random lengths (4 to ``seq + 1`` tokens):
    ``dataset[i] -> {"input_ids", "loss_mask"}`` in the data package's convention."""

    def __init__(self, n_batches, global_batch, seq, vocab, seed=0):
        g = torch.Generator().manual_seed(seed + 1)
        self.items = []
        for tokens, labels, mask in global_batches(n_batches, global_batch, seq, vocab, seed):
            full = torch.cat([tokens, labels[:, -1:]], 1)
            for i in range(global_batch):
                n = int(torch.randint(4, seq + 2, (1,), generator=g))
                loss_mask = torch.cat([mask[i], torch.zeros(1)])[:n].clone()
                loss_mask[-1] = 0  # the last position of an example is never trained
                self.items.append({"input_ids": full[i, :n], "loss_mask": loss_mask})
        self.lengths = [len(item["input_ids"]) for item in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def crossing(batch):
    """Negative control: the packed row as one sequence (attention crosses examples)."""
    import dataclasses

    t = batch.tokens.shape[1]
    return dataclasses.replace(
        batch, cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t
    )


def run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument(
        "--objectives", default="original,p,GeneralFamily-8,OnlyTopP-0.3,OnlyBottomP-K50"
    )
    ap.add_argument("--normalization", default="kept")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--init-ckpt", required=True)
    ap.add_argument("--save-init", action="store_true")
    ap.add_argument("--pretrain-steps", type=int, default=100)
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--break-tp-reduction", action="store_true")
    ap.add_argument(
        "--recompute",
        default="none",
        help="activation recomputation: none, selective or full:<uniform|block>:<layers>",
    )
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from megatron.core import parallel_state
    from tiny_model import TINY_QWEN2

    from probsft_megatron import compat, runtime
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ParallelConfig, transformer_config

    torch.use_deterministic_algorithms(True)
    undo = break_tp_reduction() if args.break_tp_reduction else None
    parallel = ParallelConfig(args.tp, args.pp, args.sp)
    dp = runtime.init_distributed(parallel, seed=1234, model=TINY_QWEN2)
    dp_rank = parallel_state.get_data_parallel_rank()
    if args.save_init:  # the reference's pre-training runs without recomputation
        tconfig = transformer_config(TINY_QWEN2, parallel)
    recompute = dict(
        zip(
            ("recompute_granularity", "recompute_method", "recompute_num_layers"),
            args.recompute.split(":"),
        )
    )
    if "recompute_num_layers" in recompute:
        recompute["recompute_num_layers"] = int(recompute["recompute_num_layers"])
    parallel = ParallelConfig(args.tp, args.pp, args.sp, **recompute)

    per_rank = args.global_batch // dp

    def micro_batches(tokens, labels, mask):
        sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        pos = torch.arange(args.seq)[None, :].expand(per_rank, -1).contiguous()
        return [
            runtime.Batch(
                tokens[sl][i : i + args.micro_batch],
                labels[sl][i : i + args.micro_batch],
                mask[sl][i : i + args.micro_batch],
                pos[i : i + args.micro_batch],
            )
            for i in range(0, per_rank, args.micro_batch)
        ]

    if args.save_init:
        # Pre-train briefly with NLL so the parity steps see p spread over (0, 1).
        chunks, optimizer = runtime.build_training_model(TINY_QWEN2, tconfig, lr=1e-2)
        fwd = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cpu")
        for batch in global_batches(
            args.pretrain_steps, args.global_batch, args.seq, TINY_QWEN2.vocab_size, seed=99
        ):
            runtime.train_step(
                chunks,
                optimizer,
                fwd,
                micro_batches(*batch),
                seq_length=args.seq,
                micro_batch_size=args.micro_batch,
            )
        runtime.save_model_weights(chunks[0].module, args.init_ckpt)
        torch.distributed.barrier()

    tconfig = transformer_config(TINY_QWEN2, parallel)
    results = {}
    runs = [(name, None) for name in args.objectives.split(",")]
    if args.varlen:
        first = args.objectives.split(",")[0]
        modes = ("max_length", "longest", "packed")
        runs = [(name, mode) for name in args.objectives.split(",") for mode in modes]
        runs.append((first, "packed_crossing"))
        from probsft_megatron.data import GlobalBatchLoader, pad_multiple

        examples = VarlenExamples(args.steps, args.global_batch, args.seq, TINY_QWEN2.vocab_size)

        def varlen_steps(mode):
            loader = GlobalBatchLoader(
                examples,
                global_batch_size=args.global_batch,
                micro_batch_size=args.micro_batch,
                dp_rank=dp_rank,
                dp_size=dp,
                seq_length=args.seq + 1,
                seed=5,
                packing=mode.startswith("packed"),
                padding="max_length" if mode == "max_length" else "longest",
                pad_multiple=pad_multiple(args.tp),
                same_length_per_step=args.pp > 1,
            )
            for step in loader:
                yield [crossing(b) for b in step] if mode == "packed_crossing" else step

    for name, mode in runs:
        chunks, optimizer = runtime.build_training_model(
            TINY_QWEN2,
            tconfig,
            lr=1e-3,
            use_distributed_optimizer=args.distributed_optimizer,
            load_dir=args.init_ckpt,
        )
        loss = ObjectiveLoss(
            LossConfig(objective=name, normalization=args.normalization),
            dp_group=compat.data_parallel_group(),
        )
        fwd = runtime.loss_head(loss, "cpu")
        rec = {k: [] for k in ("loss", "grad_norm", "mean_p", "frac_kept", "mean_w")}
        if mode is None:
            steps = (
                micro_batches(*batch)
                for batch in global_batches(
                    args.steps, args.global_batch, args.seq, TINY_QWEN2.vocab_size
                )
            )
        else:
            steps = varlen_steps(mode)
        for step_batches in steps:
            stats = runtime.train_step(chunks, optimizer, fwd, step_batches)
            rec["grad_norm"].append(stats.grad_norm)
            if stats.loss_sum is not None:
                rec["loss"].append(stats.loss)
                for k in ("mean_p", "frac_kept", "mean_w"):
                    rec[k].append(getattr(stats, k))
        results[name if mode is None else f"{name}/{mode}"] = rec

    if (
        runtime.is_last_stage()
        and dp_rank == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    ):
        atomic_write_json(args.out, {"dp": dp, "results": results}, indent=None)
    compat.destroy_model_parallel()
    if undo is not None:
        undo()


def main() -> int:
    from probsft_megatron import runtime

    argv = sys.argv[1:]
    cases = json.loads(open(argv[1]).read()) if argv[:1] == ["--cases"] else [argv]
    for case in cases:
        run(case)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
