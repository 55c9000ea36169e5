"""LoRA vs full fine-tuning on one device: trainable parameters, peak memory, step time.

Both variants train the same decoder shape (random weights, random tokens, NLL, megatron's
Adam through ``runtime.build_training_model``) for a few steps, each in a fresh process so
its peak resident memory is its own; the script reports, per variant, the trainable and
total parameters, megatron DDP's gradient buffer and the optimizer state (bytes, counted on
the objects), the process's peak RSS, the median step time, and every LoRA/full ratio, all
measured in one run.

    python benchmarks/lora.py                      # SmolLM2-135M shape, CPU, fp32
    python benchmarks/lora.py --shape tiny --steps 2 --seq 32     # seconds (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import device_name, device_tag, write_results

from probsft_megatron.config import load_preset

SHAPES = {
    # the shipped preset (configs/models/smollm2-135m.yaml), not a second copy of it
    "smollm2-135m": load_preset("smollm2-135m"),
    "tiny": dict(
        arch="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=256,
        tie_word_embeddings=True,
        qkv_bias=False,
    ),
}


def run_variant(args) -> dict:
    """Train ``args.variant`` in this process; returns its measurements."""
    from probsft_megatron import runtime
    from probsft_megatron.config import ModelConfig, ParallelConfig, PeftConfig
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import transformer_config

    torch.manual_seed(0)
    model = ModelConfig(**SHAPES[args.shape])
    parallel = ParallelConfig()
    runtime.init_distributed(parallel, seed=1234)
    peft = PeftConfig(method="lora", rank=args.rank, alpha=2.0 * args.rank)
    chunks, optimizer = runtime.build_training_model(
        model,
        transformer_config(model, parallel),
        lr=1e-4,
        peft=peft if args.variant == "lora" else None,
    )
    gpt = chunks[0].module
    total = sum(p.numel() for p in gpt.parameters())
    trainable = sum(p.numel() for p in gpt.parameters() if p.requires_grad)
    grad_buffer = sum(b.grad_data.numel() * b.grad_data.element_size() for b in chunks[0].buffers)
    fwd = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cpu")
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        shape = (args.micro_batch_size, args.seq + 1)
        tokens = torch.randint(0, model.vocab_size, shape, generator=g)
        batch = runtime.Batch(
            tokens[:, :-1].contiguous(),
            tokens[:, 1:].contiguous(),
            torch.ones(args.micro_batch_size, args.seq),
            torch.arange(args.seq)[None].expand(args.micro_batch_size, -1).contiguous(),
        )
        t0 = time.perf_counter()
        runtime.train_step(
            chunks,
            optimizer,
            fwd,
            [batch],
            seq_length=args.seq,
            micro_batch_size=args.micro_batch_size,
        )
        times.append(time.perf_counter() - t0)
    state = [
        t
        for s in optimizer.optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    ]
    result = {
        "variant": args.variant,
        "total_parameters": int(total),
        "trainable_parameters": int(trainable),
        "weight_bytes": int(sum(p.numel() * p.element_size() for p in gpt.parameters())),
        "grad_buffer_bytes": int(grad_buffer),
        "optimizer_state_bytes": int(sum(t.numel() * t.element_size() for t in state)),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "median_step_s": statistics.median(times[args.warmup :]),
        "step_times_s": times[args.warmup :],
    }
    runtime.shutdown()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--variant", choices=("full", "lora"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:  # a child: one variant, its own process
        Path(args.json).write_text(json.dumps(run_variant(args)))
        return 0

    rows = {}
    for variant in ("full", "lora"):
        child = Path(args.out) / f".lora_{variant}.json"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--json", str(child)]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        subprocess.run(cmd, check=True, env=env)
        rows[variant] = json.loads(child.read_text())
        child.unlink()
        print(
            f"{variant}: {rows[variant]['trainable_parameters']:,} trainable, "
            f"peak RSS {rows[variant]['peak_rss_bytes'] / 2**30:.2f} GiB, "
            f"{rows[variant]['median_step_s']:.3f} s/step",
            flush=True,
        )
    keys = (
        "trainable_parameters",
        "grad_buffer_bytes",
        "optimizer_state_bytes",
        "peak_rss_bytes",
        "median_step_s",
    )
    ratios = {k: rows["lora"][k] / rows["full"][k] for k in keys}
    result = {
        "device": device_name(),
        "shape": args.shape,
        "model": SHAPES[args.shape],
        "rank": args.rank,
        "seq": args.seq,
        "micro_batch_size": args.micro_batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "rows": [rows["full"], rows["lora"]],
        "lora_over_full": ratios,
    }
    lines = [
        f"LoRA (rank {args.rank}, qkv/proj/fc1/fc2) vs full fine-tuning, {args.shape} shape, "
        f"seq {args.seq} x {args.micro_batch_size}, fp32, {device_name()}, one run",
        "",
        "| | full | LoRA | LoRA / full |",
        "|---|---:|---:|---:|",
        f"| trainable parameters | {rows['full']['trainable_parameters']:,} | "
        f"{rows['lora']['trainable_parameters']:,} | {ratios['trainable_parameters']:.4f} |",
    ]
    for key, label, scale, unit in (
        ("grad_buffer_bytes", "gradient buffer", 2**20, "MiB"),
        ("optimizer_state_bytes", "optimizer state", 2**20, "MiB"),
        ("peak_rss_bytes", "peak RSS of the process", 2**30, "GiB"),
        ("median_step_s", "median step time", 1, "s"),
    ):
        lines.append(
            f"| {label} ({unit}) | {rows['full'][key] / scale:.3f} | "
            f"{rows['lora'][key] / scale:.3f} | {ratios[key]:.3f} |"
        )
    write_results(args.out, f"lora_{device_tag()}_{args.shape}", result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
