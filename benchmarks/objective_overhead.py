"""Step-time cost of each objective relative to plain Megatron cross entropy, in one run.

The baseline's loss function is what a plain Megatron SFT step does with the per-token CE
(masked sum and token count). Every variant trains the same model on the same micro-batches
through megatron's schedule and optimizer; only the loss function differs. Variants are
interleaved step by step (A B C ... B C ... A, the order rotated every step) so machine drift
hits all of them alike, and the median step time of each is divided by the baseline's median.

Two clocks are recorded for every step: wall time and this process's CPU time. On the CPU
torch runs ``--threads`` threads (default 1), so the CPU time is the step's own work and
barely moves when other processes share the machine, while wall time grows with the load;
``ratio`` is the CPU-time ratio there (``ratio_wall`` beside it). On CUDA each step ends with
a synchronize and ``ratio`` is the wall-time ratio.

The weights never change: the optimizer is built with a valid learning rate and the step's
rate is then set to 0 through its parameter groups, the way the training loop's schedule sets
it every step. Adam still runs in full (its work is part of every variant's step), so every
variant times the same model; the script checks the weights are bit-identical at the end.
The 1-minute load average is recorded after every round.

Usage: python benchmarks/objective_overhead.py [--steps 8 --rounds 5 --out benchmarks/results]
Target: ratio <= 1.02 for every objective that needs no extra pass (percentile thresholds
with percentile_scope=global add one forward by design and are reported separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import device_name, device_tag, write_results

OBJECTIVES = [
    "original",
    "p",
    "GeneralFamily-8",
    "OnlyTopP-0.5",
    "OnlyTopLogP-0.5",
    "UnlikehoodTop-0.5",
    "OnlyTopP-K20",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from probsft_megatron import runtime
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

    model_cfg = ModelConfig(
        arch="qwen2",
        num_layers=4,
        hidden_size=256,
        ffn_hidden_size=704,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=8192,
    )
    parallel = ParallelConfig()
    runtime.init_distributed(parallel, seed=0, model=model_cfg)
    dev = runtime.cpu_backend.device()
    tconfig = transformer_config(model_cfg, parallel)
    chunks, optimizer = runtime.build_training_model(model_cfg, tconfig)
    # measure without learning: the rate is zeroed the way the schedule sets it each step
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    weights_before = [p.detach().clone() for p in chunks[0].parameters()]

    g = torch.Generator().manual_seed(0)
    b, s = args.micro_batch_size, args.seq
    micro = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, model_cfg.vocab_size, (b, s + 1), generator=g)
        mask = (torch.rand(b, s, generator=g) < 0.8).float()
        pos = torch.arange(s)[None].expand(b, -1).contiguous()
        micro.append(
            runtime.Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask, pos)
        )

    def plain_ce(ce, loss_mask):
        """What a plain Megatron SFT step does with the per-token CE."""
        mask = loss_mask.float()
        loss = (ce.float() * mask).sum()
        return loss, mask.sum().to(torch.int), {"lm loss": loss.detach()}

    class PlainHead(runtime.LossHead):
        def objective(self, model, batch, threshold, record_p):
            from functools import partial

            return partial(plain_ce, loss_mask=batch.loss_mask)

    variants = {"megatron CE (baseline)": PlainHead(ObjectiveLoss(LossConfig()), dev)}
    for name in OBJECTIVES:
        variants[name] = runtime.loss_head(ObjectiveLoss(LossConfig(objective=name)), dev)

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)

    def step(fwd):
        # the loss functions return sums (calculate_per_token_loss): no per-call bookkeeping
        runtime.train_step(chunks, optimizer, fwd, micro, seq_length=s, micro_batch_size=b)
        if cuda:
            torch.cuda.synchronize()

    loads = [os.getloadavg()[0]]
    for fwd in variants.values():  # warm-up
        step(fwd)
    names = list(variants)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for i in range(args.steps):
            k = (r * args.steps + i) % len(names)
            for name in names[k:] + names[:k]:  # rotated: no variant always follows another
                w0, c0 = time.perf_counter(), time.process_time()
                step(variants[name])
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.1f})", file=sys.stderr)

    unchanged = all(
        torch.equal(a, b.detach()) for a, b in zip(weights_before, chunks[0].parameters())
    )
    if not unchanged:
        raise SystemExit("objective_overhead: the weights changed although the rate was 0")
    base_wall = statistics.median(wall[names[0]])
    base_cpu = statistics.median(cpu[names[0]])
    rows = []
    for name in names:
        med_wall, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        rows.append(
            {
                "variant": name,
                "median_step_s": med_wall,
                "median_cpu_s": med_cpu,
                "ratio_wall": med_wall / base_wall,
                "ratio_cpu": med_cpu / base_cpu,
                "ratio": med_wall / base_wall if cuda else med_cpu / base_cpu,
                "extra_forward": name.endswith("K20"),
            }
        )
    result = {
        "device": device_name(),
        "torch": torch.__version__,
        "model": model_cfg.to_dict(),
        "micro_batches": args.micro_batches,
        "micro_batch_size": b,
        "seq": s,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "clock": "wall" if cuda else "cpu",
        "weights_unchanged": unchanged,
        "load_average_1min": {"before": loads[0], "after": loads[-1], "per_round": loads[1:]},
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    lines = [
        f"Objective step-time overhead vs plain Megatron CE ({result['device']}, "
        f"torch {torch.__version__}, fp32, {args.micro_batches}x{b}x{s} tokens/step; "
        f"{result['threads']} thread(s); median of {args.rounds * args.steps} steps per "
        f"variant, interleaved step by step; 1-min load average {min(loads):.1f}-"
        f"{max(loads):.1f} on {os.cpu_count()} cores)",
        "",
        "| variant | median step, wall (s) | ratio, wall | median step, CPU time (s) "
        "| ratio, CPU time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        note = " (global percentile: +1 forward by design)" if r["extra_forward"] else ""
        lines.append(
            f"| {r['variant']}{note} | {r['median_step_s']:.4f} | {r['ratio_wall']:.3f} | "
            f"{r['median_cpu_s']:.4f} | {r['ratio_cpu']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    write_results(args.out, f"objective_overhead_{device_tag()}", result, table)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
