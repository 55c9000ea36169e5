"""Step-time cost of each objective relative to plain Megatron cross entropy, in one run.

The baseline's loss function is what a plain Megatron SFT step does with the per-token CE
(masked sum and token count). Every variant trains the same model on the same micro-batches
through megatron's schedule and optimizer; only the loss function differs. Variants are
timed in interleaved rounds (A B C ... A B C ...) so machine drift hits all of them alike,
and the median step time of each is divided by the baseline's median.

The weights never change: the optimizer is built with a valid learning rate and the step's
rate is then set to 0 through its parameter groups, the way the training loop's schedule sets
it every step. Adam still runs in full (its work is part of every variant's step), so every
variant times the same model; the script checks the weights are bit-identical at the end.
The 1-minute load average is recorded before and after (on a shared machine other work
slows every variant alike, which the interleaved rounds and the ratios absorb).

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
    dev = runtime.platform.device()
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

    def plain_forward_step(data_iterator, model):
        from functools import partial

        batch = next(data_iterator).to(dev)
        out = model(batch.tokens, batch.position_ids, None, labels=batch.labels)
        return out, partial(plain_ce, loss_mask=batch.loss_mask)

    variants = {"megatron CE (baseline)": plain_forward_step}
    for name in OBJECTIVES:
        variants[name] = runtime.make_forward_step(ObjectiveLoss(LossConfig(objective=name)), dev)

    def step(fwd):
        # the loss functions return sums (calculate_per_token_loss): no per-call bookkeeping
        runtime.train_step(chunks, optimizer, fwd, micro, seq_length=s, micro_batch_size=b)

    load_before = os.getloadavg()[0]
    for fwd in variants.values():  # warm-up
        step(fwd)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, fwd in variants.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(fwd)
                times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    load_after = os.getloadavg()[0]
    unchanged = all(
        torch.equal(a, b.detach()) for a, b in zip(weights_before, chunks[0].parameters())
    )
    if not unchanged:
        raise SystemExit("objective_overhead: the weights changed although the rate was 0")
    base = statistics.median(times["megatron CE (baseline)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "median_step_s": med,
                "ratio": med / base,
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
        "weights_unchanged": unchanged,
        "load_average_1min": {"before": load_before, "after": load_after},
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    lines = [
        f"Objective step-time overhead vs plain Megatron CE ({result['device']}, "
        f"torch {torch.__version__}, fp32, {args.micro_batches}x{b}x{s} tokens/step; "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps; 1-min load average "
        f"{load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores)",
        "",
        "| variant | median step (s) | ratio to baseline |",
        "|---|---|---|",
    ]
    for r in rows:
        note = " (global percentile: +1 forward by design)" if r["extra_forward"] else ""
        lines.append(f"| {r['variant']}{note} | {r['median_step_s']:.4f} | {r['ratio']:.3f} |")
    table = "\n".join(lines)
    print(table)
    write_results(args.out, f"objective_overhead_{device_tag()}", result, table)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
