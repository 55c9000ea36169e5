"""Peak host memory of `probsft convert` in both directions on a Qwen2.5-1.5B-shaped model.

A checkpoint with Qwen2.5-1.5B's config.json (bf16, tied embeddings, 1.54B parameters) and
random weights is written as HF safetensors first (one file, like the published model).
Then `probsft convert hf-to-megatron` and `probsft convert megatron-to-hf` run as separate
processes while this script samples them:

* ``peak_rss``: the conversion process's own peak resident set (``getrusage``, exact);
* ``peak_tree_pss``: the largest sum of proportional set sizes over the process and its
  children (megatron's checkpoint writer forks workers that share the parent's pages; PSS
  counts each shared page once), sampled every 0.1 s.

Both are compared with the model's size in bytes (``ratio``); ``baseline_rss`` is the RSS of
a process that imported the same libraries and converted nothing, so ``(peak - baseline) /
model`` is what the conversion itself holds.

Usage: python benchmarks/convert_memory.py [--work /tmp/convert_memory] [--out benchmarks/results]
Target: peak_rss / model_bytes close to 1 (the model once), far from 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from common import cpu_name, write_results

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 131072,
    "max_window_layers": 21,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
"""config.json of Qwen/Qwen2.5-1.5B (weights are random here)."""
TINY = dict(
    QWEN25_15B,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_window_layers=2,
    vocab_size=1024,
    bos_token_id=1,
    eos_token_id=1,
)
"""A Qwen2 config of the same form at a size that converts in seconds (the smoke test's)."""
SHAPES = {"qwen2.5-1.5b": QWEN25_15B, "tiny": TINY}
_MB = 1024**2
_BASELINE = (
    "import psutil, probsft_megatron.converters.api, megatron.core.dist_checkpointing; "
    "from megatron.core.models.gpt import GPTModel; "
    "print(psutil.Process().memory_info().rss)"
)
# Runs `probsft ARGS` and reports the process's own peak RSS (KiB) on its last stderr line.
_RUNNER = (
    "import resource, sys; from probsft_megatron.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "file=sys.stderr); sys.exit(rc)"
)


def write_random_checkpoint(folder: Path, config: dict) -> int:
    """Write the random bf16 checkpoint one tensor at a time; returns its size in bytes."""
    from probsft_megatron.converters.hf_config import model_config_from_hf
    from probsft_megatron.converters.mapping import tensor_maps
    from probsft_megatron.converters.safetensors_io import write_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
            indent=2,
        )
    )
    maps = tensor_maps(model_config_from_hf(config))
    shapes = {tm.hf_name: tm.hf_shape for tm in maps}
    gen = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        if len(shapes[name]) == 1:
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        return (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)

    return write_file(
        folder / "model.safetensors",
        [(tm.hf_name, tm.hf_shape, torch.bfloat16) for tm in maps],
        produce,
    )


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; its exact peak RSS and the sampled peak PSS of its process tree."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_pss": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
            peak["tree_pss"] = max(peak["tree_pss"], total)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    peak_rss = int(err.split("PEAK_RSS_KB")[-1].split()[0]) * 1024
    return {
        "peak_rss": peak_rss,
        "peak_tree_pss": peak["tree_pss"],
        "seconds": round(wall, 1),
        "log": err.strip().splitlines()[-6:],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/convert_memory", help="scratch folder (~10 GB)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="qwen2.5-1.5b",
        help="tiny: a small Qwen2 checkpoint (checks the script; its ratios mean little)",
    )
    ap.add_argument("--write-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    work = Path(args.work)
    if args.write_checkpoint:
        print(write_random_checkpoint(work / "hf", SHAPES[args.shape]))
        return 0
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    # A child process writes it: Linux carries a process's peak RSS over fork+exec, so this
    # process stays small for the measured children to report their own peaks.
    model_bytes = int(
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--shape",
                args.shape,
                "--write-checkpoint",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[-1]
    )
    print(
        f"wrote random {args.shape}-shaped checkpoint: {model_bytes / 1e9:.3f} GB "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    probsft = [sys.executable, "-c", _RUNNER, "convert"]
    baseline = int(
        subprocess.run(
            [sys.executable, "-c", _BASELINE], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    runs = {}
    for name, cmd in (
        (
            "hf_to_megatron",
            [*probsft, "hf-to-megatron", "--hf", str(work / "hf"), "--out", str(work / "megatron")],
        ),
        (
            "megatron_to_hf",
            [
                *probsft,
                "megatron-to-hf",
                "--ckpt",
                str(work / "megatron"),
                "--out",
                str(work / "export"),
            ],
        ),
    ):
        r = measure(cmd)
        runs[name] = r
        print(
            f"{name}: peak RSS {r['peak_rss'] / _MB:.0f} MiB, peak tree PSS "
            f"{r['peak_tree_pss'] / _MB:.0f} MiB, {r['seconds']} s",
            flush=True,
        )
    export_bytes = sum(f.stat().st_size for f in (work / "export").glob("*.safetensors"))
    result = {
        "model": (
            "Qwen2.5-1.5B config"
            if args.shape == "qwen2.5-1.5b"
            else f"Qwen2 config, {args.shape} shape"
        )
        + ", random bf16 weights (tied embeddings)",
        "shape": args.shape,
        "parameters": model_bytes // 2,
        "model_bytes": model_bytes,
        "export_safetensors_bytes": export_bytes,
        "baseline_rss": baseline,
        "machine": f"CPU: {cpu_name()}, {psutil.virtual_memory().total / 1024**3:.0f} GiB RAM",
        "torch": torch.__version__,
        "directions": {
            name: {
                **{k: v for k, v in r.items() if k != "log"},
                "peak_rss_ratio": round(r["peak_rss"] / model_bytes, 3),
                "peak_tree_pss_ratio": round(r["peak_tree_pss"] / model_bytes, 3),
                "conversion_rss_ratio": round((r["peak_rss"] - baseline) / model_bytes, 3),
            }
            for name, r in runs.items()
        },
    }
    lines = [
        f"Peak host memory of `probsft convert` ({result['model']}; {result['machine']}, "
        f"torch {result['torch']})",
        "",
        f"Model size: {model_bytes:,} bytes ({model_bytes / 1e9:.3f} GB, "
        f"{result['parameters']:,} parameters in bf16). Baseline process after imports: "
        f"{baseline / _MB:.0f} MiB.",
        "",
        "| direction | peak RSS (MiB) | peak RSS / model | (peak RSS - baseline) / model "
        "| peak tree PSS (MiB) | tree PSS / model | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["directions"].items():
        lines.append(
            f"| {name.replace('_', '-')} | {r['peak_rss'] / _MB:.0f} "
            f"| {r['peak_rss_ratio']:.2f} "
            f"| {r['conversion_rss_ratio']:.2f} | {r['peak_tree_pss'] / _MB:.0f} "
            f"| {r['peak_tree_pss_ratio']:.2f} | {r['seconds']} |"
        )
    stem = "convert_memory" if args.shape == "qwen2.5-1.5b" else f"convert_memory_{args.shape}"
    write_results(args.out, stem, result, "\n".join(lines))
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
