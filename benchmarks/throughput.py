"""Training throughput: megatron (local vs SDPA vs TE attention) vs plain Hugging Face, one run.

Every variant trains the same decoder shape (random weights, random tokens, NLL) with AdamW
for a few steps in a fresh process (``sdpa+fused``: SDPA attention with the fused loss
head); the script reports median step time, tokens/s, peak memory and MFU (model FLOPs per
second over the device's peak; FLOPs = 6 * parameters + 12 * layers * hidden * sequence per
token, the usual dense-transformer count), and the ratio of each variant's tokens/s to the
Hugging Face baseline.

    python benchmarks/throughput.py                       # CPU: reduced shape, fp32
    python benchmarks/throughput.py --shape qwen2.5-1.5b --seq 4096   # GPU: bf16

Targets (one H100, Qwen2.5-1.5B shape, seq 4096): sdpa MFU >= 45% and >= 1.3x the Hugging
Face baseline's tokens/s. CPU numbers only compare implementations on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import device_name, device_tag, write_results

SHAPES = {
    "qwen2.5-1.5b": dict(
        num_layers=28,
        hidden_size=1536,
        ffn_hidden_size=8960,
        num_attention_heads=12,
        num_query_groups=2,
        vocab_size=151936,
    ),
    # SmolLM2-135M's dimensions (the embedded default), in Qwen2-style blocks like the others
    "smollm2-135m": dict(
        num_layers=30,
        hidden_size=576,
        ffn_hidden_size=1536,
        num_attention_heads=9,
        num_query_groups=3,
        vocab_size=49152,
    ),
    "small": dict(
        num_layers=4,
        hidden_size=512,
        ffn_hidden_size=1408,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=8192,
    ),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> float | None:
    name = device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_megatron(shape: dict, variant: str, seq: int, mbs: int, steps: int, bf16: bool):
    """``variant``: an attention implementation, optionally ``+fused`` (the fused loss head)."""
    from probsft_megatron import runtime
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

    cfg = ModelConfig(arch="qwen2", max_position_embeddings=max(seq, 2048), **shape)
    parallel = ParallelConfig()
    runtime.init_distributed(parallel, seed=0, model=cfg)
    tconfig = transformer_config(
        cfg, parallel, params_dtype=torch.bfloat16 if bf16 else torch.float32
    )
    attention, _, head = variant.partition("+")
    loss_cfg = LossConfig("original", implementation="fused" if head == "fused" else "unfused")
    chunks, optimizer = runtime.build_training_model(
        cfg, tconfig, lr=1e-5, weight_decay=0.01, attention=attention, loss_config=loss_cfg
    )
    dev = runtime.cpu_backend.device()
    fwd = runtime.loss_head(ObjectiveLoss(loss_cfg), dev)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g)
    batch = runtime.Batch(
        tokens[:, :-1].contiguous(),
        tokens[:, 1:].contiguous(),
        torch.ones(mbs, seq),
        torch.arange(seq)[None].expand(mbs, -1).contiguous(),
    )

    def step():
        runtime.train_step(chunks, optimizer, fwd, [batch], seq_length=seq, micro_batch_size=mbs)

    return cfg.num_parameters(), cfg, step


def run_hf(shape: dict, seq: int, mbs: int, steps: int, bf16: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from probsft_megatron.model import ModelConfig

    cfg = ModelConfig(arch="qwen2", max_position_embeddings=max(seq, 2048), **shape)
    hf_cfg = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen2ForCausalLM(hf_cfg).to(dev, torch.bfloat16 if bf16 else torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (mbs, seq + 1), generator=g).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return sum(p.numel() for p in model.parameters()), cfg, step


def child(args) -> None:
    shape = SHAPES[args.shape]
    bf16 = torch.cuda.is_available()
    if args.variant == "huggingface":
        n_params, cfg, step = run_hf(shape, args.seq, args.micro_batch, args.steps, bf16)
    else:
        n_params, cfg, step = run_megatron(
            shape, args.variant, args.seq, args.micro_batch, args.steps, bf16
        )
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = args.micro_batch * args.seq
    med = statistics.median(times)
    flops_per_token = 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * args.seq
    achieved = flops_per_token * tokens / med / 1e12
    peak = peak_tflops()
    print(
        json.dumps(
            {
                "variant": args.variant,
                "median_step_s": med,
                "tokens_per_s": tokens / med,
                "peak_memory_gib": peak_memory_gib(),
                "achieved_tflops": achieved,
                "mfu": achieved / peak if peak else None,
                "params": n_params,
                "dtype": "bf16" if bf16 else "fp32",
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--variants",
        default="local,sdpa,sdpa+fused,te,huggingface",
        help="attention implementations (local, sdpa, te), each optionally with "
        "'+fused' (the fused loss head), and huggingface",
    )
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.variant:
        child(args)
        return 0
    from probsft_megatron import hardware

    rows, failed = [], []
    for variant in args.variants.split(","):
        if variant.startswith("te") and not (torch.cuda.is_available() and hardware.te_available()):
            print(
                f"[throughput] {variant}: skipped (Transformer Engine or CUDA not available)",
                file=sys.stderr,
            )
            continue
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--shape",
            args.shape,
            "--seq",
            str(args.seq),
            "--micro-batch",
            str(args.micro_batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not line:
            print(f"[throughput] {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            failed.append(variant)
            continue
        rows.append(json.loads(line[-1]))
        print(f"[throughput] {variant}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        _write(args, rows, failed)  # after every variant: a run cut short keeps what it has
    if rows:
        print(_write(args, rows, failed))
    if failed:
        print(f"[throughput] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write(args, rows: list[dict], failed: list[str]) -> str:
    """The result files of the rows so far; returns the markdown table."""
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "huggingface"), None)
    for r in rows:
        r["vs_huggingface"] = r["tokens_per_s"] / base if base else None
    dev = device_name()
    md = [
        f"Training throughput, {args.shape} shape, seq {args.seq}, micro batch "
        f"{args.micro_batch} ({dev}, {rows[0]['dtype']}, torch {torch.__version__})",
        "",
        "| variant | step (s) | tokens/s | x Hugging Face | peak mem (GiB) | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no bf16 peak for a CPU)"
        ratio = f"{r['vs_huggingface']:.2f}" if r["vs_huggingface"] else "-"
        md.append(
            f"| {r['variant']} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{ratio} | {r['peak_memory_gib']:.2f} | {r['achieved_tflops']:.3f} | {mfu} |"
        )
    write_results(
        args.out,
        f"throughput_{device_tag()}_{args.shape}_seq{args.seq}",
        {"device": dev, "args": vars(args), "rows": rows, "failed": failed},
        "\n".join(md),
    )
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
