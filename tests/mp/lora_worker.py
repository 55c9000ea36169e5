"""LoRA parity worker: train LoRA adapters on tiny Qwen2 and Llama shapes in many layouts.

Run under torchrun (gloo on CPU). ``--reference`` (one process): builds each model at TP=1,
saves its base weights as a torch_dist checkpoint and trains the adapters. Otherwise (two
processes) every layout of ``--layouts`` is set up in turn in the same launch (megatron's
model-parallel groups are torn down and built again), loads the base checkpoints (resharded
on load) and trains the same steps. Adapters start from :func:`probsft_megatron.lora.init_adapters`
(layout-independent, ``B`` non-zero so ``A`` gets gradients from the first step).

Per run (``model/objective/head``) the JSON holds the losses, the grad norms (megatron's,
over the adapters: the only parameters with gradients) and, after the last step, every
adapter's sum and sum of squares over the whole tensor (TP shards summed), which do not depend
on how a tensor is split. A layout named ``<layout>!<control>`` runs with a negative control:
``row-grad`` (the replicated B of a row-parallel layer keeps its rank's partial gradient,
not summed over TP) or ``glu-shard`` (the gated fc1's B split as one block instead of per
gate/up half, like its weight).
"""

import argparse
import dataclasses
import sys
import types

import torch

from probsft_megatron.fileio import atomic_write_json

RUNS = (
    ("qwen2", "original", "unfused"),
    ("qwen2", "p", "fused"),
    ("qwen2", "OnlyBottomP-K50", "unfused"),
    ("llama", "GeneralFamily-0.5", "unfused"),
    ("llama", "original", "fused"),
)
LAYOUTS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2),
    "dp2": dict(),
    "dp2_distributed_optimizer": dict(distopt=True),
}


def models():
    from tiny_model import TINY_QWEN2

    llama = dataclasses.replace(
        TINY_QWEN2, arch="llama", qkv_bias=False, rope_theta=1e4, tie_word_embeddings=True
    )
    return {"qwen2": TINY_QWEN2, "llama": llama}


def batches(steps, global_batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (global_batch, 1), generator=g)
        tokens = (start + torch.arange(seq + 1)[None, :]) % vocab
        noisy = torch.rand(global_batch, seq + 1, generator=g) < 0.3
        tokens = torch.where(noisy, torch.randint(0, vocab, tokens.shape, generator=g), tokens)
        prompt = torch.randint(1, seq // 2, (global_batch,), generator=g)
        mask = (torch.arange(seq)[None, :] >= prompt[:, None]).float()
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask))
    return out


def break_lora(kind):
    """Apply negative control ``kind``; returns the function that undoes it."""
    from probsft_megatron import lora

    if kind == "row-grad":
        real = lora.compat

        def copy_to(x, group):
            if isinstance(x, torch.nn.Parameter):
                return x
            return real.copy_to_tensor_parallel_region(x, group)

        lora.compat = types.SimpleNamespace(
            copy_to_tensor_parallel_region=copy_to,
            gather_from_sequence_parallel_region=real.gather_from_sequence_parallel_region,
            dist_load=real.dist_load,
        )
        return lambda: setattr(lora, "compat", real)
    if kind == "glu-shard":
        real_shard = lora._shard
        lora._shard = lambda full, dim, rank, size, glu: real_shard(full, dim, rank, size, False)
        return lambda: setattr(lora, "_shard", real_shard)
    raise SystemExit(f"unknown negative control {kind}")


def adapter_stats(gpt):
    """``{"<layer>.<target>.<A|B>": [sum, sum of squares]}`` over whole tensors."""
    from probsft_megatron import lora

    out = {}
    for number, target, module in lora.adapter_modules(gpt):
        column = target in lora.COLUMN_TARGETS
        tensors = (("A", module.lora_A, not column), ("B", module.lora_B, column))
        for name, param, sharded in tensors:
            x = param.detach().to(torch.float64)
            s = torch.stack([x.sum(), (x * x).sum()])
            if sharded and torch.distributed.get_world_size(module.tp_group) > 1:
                torch.distributed.all_reduce(s, group=module.tp_group)
            out[f"{number}.{target}.{name}"] = s.tolist()
    return out


def run_layout(args, layout, init_dir):
    from megatron.core import parallel_state

    from probsft_megatron import compat, lora, runtime
    from probsft_megatron.config import PeftConfig
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ParallelConfig, transformer_config

    parallel = ParallelConfig(layout.get("tp", 1), layout.get("pp", 1), layout.get("sp", False))
    dp = runtime.init_distributed(parallel, seed=1234)
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = args.global_batch // dp
    peft = PeftConfig(method="lora", rank=4, alpha=8.0)
    results = {}
    saved = set() if args.reference else set(models())
    for model_name, objective, head in RUNS:
        model = models()[model_name]
        tconfig = transformer_config(model, parallel)
        loss_config = LossConfig(objective, implementation=head, chunk_size=16)
        chunks, optimizer = runtime.build_training_model(
            model,
            tconfig,
            lr=1e-2,
            use_distributed_optimizer=layout.get("distopt", False),
            load_dir=None if model_name not in saved else f"{init_dir}/{model_name}",
            loss_config=loss_config,
            peft=peft,
        )
        gpt = chunks[0].module
        if model_name not in saved:  # the reference's random base, once per model
            runtime.save_model_weights(gpt, f"{init_dir}/{model_name}")  # adapters included
            torch.distributed.barrier()
            saved.add(model_name)
        lora.init_adapters(gpt, seed=5, b_std=0.05)
        fwd = runtime.loss_head(
            ObjectiveLoss(loss_config, dp_group=compat.data_parallel_group()), "cpu"
        )
        rec = {"loss": [], "grad_norm": []}
        for tokens, labels, mask in batches(args.steps, args.global_batch, args.seq, 256):
            sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
            pos = torch.arange(args.seq)[None, :].expand(args.micro_batch, -1).contiguous()
            mbs = [
                runtime.Batch(
                    tokens[sl][i : i + args.micro_batch],
                    labels[sl][i : i + args.micro_batch],
                    mask[sl][i : i + args.micro_batch],
                    pos,
                )
                for i in range(0, per_rank, args.micro_batch)
            ]
            stats = runtime.train_step(
                chunks, optimizer, fwd, mbs, seq_length=args.seq, micro_batch_size=args.micro_batch
            )
            rec["grad_norm"].append(stats.grad_norm)
            if stats.loss_sum is not None:
                rec["loss"].append(stats.loss)
        first = dp_rank == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
        mine = {
            "rec": rec if first and runtime.is_last_stage() else None,
            "adapters": adapter_stats(gpt) if dp_rank == 0 else {},
        }
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        merged = next(p["rec"] for p in parts if p["rec"] is not None)
        merged["adapters"] = {k: v for p in parts for k, v in p["adapters"].items()}
        trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
        merged["trainable_fraction"] = trainable / sum(p.numel() for p in gpt.parameters())
        results[f"{model_name}/{objective}/{head}"] = merged
    compat.destroy_model_parallel()
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--init-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    from probsft_megatron import runtime

    names = ["tp1"] if args.reference else args.layouts.split(",")
    out = {}
    for name in names:  # "<layout>" or "<layout>!<negative control>"
        layout, _, broken = name.partition("!")
        undo = break_lora(broken) if broken else None
        out[name] = run_layout(args, LAYOUTS.get(layout, {}), args.init_dir)
        if undo is not None:
            undo()
    if torch.distributed.get_rank() == 0:
        atomic_write_json(args.out, out, indent=None)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
