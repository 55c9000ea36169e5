"""What the data path costs: computed positions per real token, and the start of a run.

Two parts (``--part layout``, ``--part store`` or ``--part all``):

* **layout**: a long-tailed length mix (generated; lognormal, see :func:`length_mix`) batched
  by the real ``GlobalBatchLoader`` three ways at each ``--max-lengths`` value: rows padded to
  ``max_length``, rows padded to the micro-batch's longest (dynamic padding), and packed rows
  (``cu_seqlens``). Counts the positions computed per real token over the epoch and times
  ``--steps`` training steps of a small model (megatron, one CPU process, one thread: CPU
  seconds per step, which a loaded machine does not change, beside the wall time) per layout.
* **store**: NuminaMath-format records (prompts of 20-80 words, solutions of 100-400 words)
  generated at each ``--records`` size, tokenized with SmolLM2's chat template. For each
  size, cache miss then cache hit, with 1 and 2 processes (``LOCAL_RANK`` 0/1; rank 0 builds,
  the other waits and maps), each process measures the seconds from its start to its first
  global batch (imports, tokenizer, dataset, ``GlobalBatchLoader``, first batch) and its peak
  RSS (the builder's tokenizing workers' CPU time is reported apart). ``--cases off`` measures
  ``data.cache=false``: every process tokenizes the whole dataset in memory itself.

Writes ``data_efficiency_<part>_cpu.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, write_results

WORDS = (
    "let the number of solutions be x so we have y equals two times the sum of a and b then "
    "since each term is positive it follows that the answer is therefore we compute the value "
    "of f at n which gives the result of this step by the formula above and check it"
).split()


def length_mix(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """``n`` example lengths: lognormal (median 450 tokens, sigma 0.6), clipped to
    ``[32, max_length]``: most SFT answers are a few hundred tokens, a few are long."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(450), 0.6, n).astype(np.int64), 32, max_length)


def load_average() -> float:
    return os.getloadavg()[0]


# -- part (a): layouts -----------------------------------------------------------------------


class Lengths:
    """Examples of given lengths (random tokens; a response after the first quarter)."""

    def __init__(self, lengths: np.ndarray, vocab: int):
        self.lengths = lengths
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        import torch

        n = int(self.lengths[i])
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(n)
        mask[n // 4 : n - 1] = 1
        return {"input_ids": torch.randint(1, self.vocab, (n,), generator=g), "loss_mask": mask}


def run_layouts(args) -> dict:
    import torch

    from probsft_megatron import runtime
    from probsft_megatron.config import ModelConfig, ParallelConfig
    from probsft_megatron.data import GlobalBatchLoader
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import transformer_config

    model = ModelConfig(
        arch="qwen2",
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        max_position_embeddings=max(args.max_lengths),
    )
    torch.set_num_threads(1)  # CPU seconds per step: comparable on a shared, loaded machine
    runtime.init_distributed(ParallelConfig(), seed=0, model=model)
    rows = []
    load_before = load_average()
    for max_length in args.max_lengths:
        lengths = length_mix(args.examples, max_length)
        data = Lengths(lengths, model.vocab_size)
        for name, kw in (
            ("padded to max_length", {"padding": "max_length"}),
            ("dynamic padding", {"padding": "longest"}),
            ("packing", {"packing": True}),
        ):
            loader = GlobalBatchLoader(
                data,
                global_batch_size=args.global_batch,
                micro_batch_size=args.micro_batch,
                dp_rank=0,
                dp_size=1,
                seq_length=max_length,
                seed=1,
                **kw,
            )
            real = positions = 0
            steps = list(loader)
            for step in steps:
                real += sum(b.real_tokens for b in step)
                positions += sum(b.positions for b in step)
            chunks, optimizer = runtime.build_training_model(
                model, transformer_config(model, ParallelConfig()), lr=1e-4
            )
            fwd = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cpu")
            times, cpu = [], []
            for step in steps[: args.steps + 1]:
                t0, c0 = time.perf_counter(), time.process_time()
                runtime.train_step(chunks, optimizer, fwd, step)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            times, cpu = times[1:] or times, cpu[1:] or cpu  # the first step warms up
            rows.append(
                {
                    "max_length": max_length,
                    "layout": name,
                    "examples": int(len(lengths)),
                    "real_tokens": int(real),
                    "positions": int(positions),
                    "positions_per_token": positions / real,
                    "median_step_s": float(np.median(times)),
                    "median_step_cpu_s": float(np.median(cpu)),
                    "tokens_per_cpu_s": sum(b.real_tokens for b in steps[0])
                    / float(np.median(cpu)),
                }
            )
            print(f"[layout] {rows[-1]}", file=sys.stderr)
            del chunks, optimizer
    runtime.shutdown()
    mix = length_mix(args.examples, max(args.max_lengths))
    return {
        "device": f"CPU: {cpu_name()}",
        "length_mix": "lognormal(median 450, sigma 0.6) tokens clipped to [32, max_length]; "
        f"mean {mix.mean():.0f}, p50 {np.median(mix):.0f}, p90 {np.percentile(mix, 90):.0f}, "
        f"p99 {np.percentile(mix, 99):.0f}, max {mix.max()} at max_length "
        f"{max(args.max_lengths)}",
        "model": "2 layers, hidden 128, 4 heads (2 KV groups), vocab 512, fp32, SDPA",
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "load_average_1min": {"before": load_before, "after": load_average()},
        "rows": rows,
    }


def layout_markdown(r: dict) -> str:
    lines = [
        "# Positions computed per real token, and step time, by batch layout",
        "",
        f"{r['device']}; {r['model']}; global batch {r['global_batch']} examples, micro-batch "
        f"{r['micro_batch']}. Lengths: {r['length_mix']}. Load average "
        f"{r['load_average_1min']['before']:.1f} -> {r['load_average_1min']['after']:.1f}; "
        "one thread, so the CPU seconds of a step do not depend on the other processes of the "
        "machine (the wall time does).",
        "",
        "| max_length | layout | positions per real token | step CPU s (median) | "
        "real tokens per CPU s | step wall s (median) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['max_length']} | {row['layout']} | {row['positions_per_token']:.3f} | "
            f"{row['median_step_cpu_s']:.2f} | {row['tokens_per_cpu_s']:.0f} | "
            f"{row['median_step_s']:.2f} |"
        )
    return "\n".join(lines)


# -- part (b): the store -----------------------------------------------------------------------


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """``n`` NuminaMath-format records: ``problem`` of 20-80 words, ``solution`` of 100-400."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            problem = " ".join(rng.choices(WORDS, k=rng.randint(20, 80)))
            solution = " ".join(rng.choices(WORDS, k=rng.randint(100, 400)))
            f.write(
                json.dumps(
                    {
                        "source": "generated",
                        "problem": f"Problem {i}: {problem}?",
                        "solution": solution,
                    }
                )
                + "\n"
            )


CHILD = r"""
import json, os, resource, sys, time
t0 = float(sys.argv[1])
from probsft_megatron.config import DataConfig
from probsft_megatron.data import GlobalBatchLoader
from probsft_megatron.data.store import open_dataset
from probsft_megatron.tokenizers import load_tokenizer
imports_s = time.time() - t0
cfg = DataConfig(train_files=[sys.argv[2]], format="numina", max_length=1024,
                 cache_dir=sys.argv[3], cache=sys.argv[5] != "off")
tok = load_tokenizer(sys.argv[4])
rank = int(os.environ["LOCAL_RANK"])
ds = open_dataset(cfg, tok, builder=rank == 0)
loader = GlobalBatchLoader(ds, global_batch_size=16, micro_batch_size=4, dp_rank=rank,
                           dp_size=int(os.environ["WORLD"]), seq_length=1024, seed=1)
first = next(iter(loader))
first_batch_s = time.time() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "rank": rank,
    "first_batch_s": first_batch_s,
    "imports_s": imports_s,
    "cpu_s": me.ru_utime + me.ru_stime,
    "workers_cpu_s": kids.ru_utime + kids.ru_stime,
    "peak_rss_mib": hwm / 1024,
    "examples": len(ds),
    "index_mib": (ds._offsets.nbytes + ds.prompt_lengths.nbytes) / 2**20,
}))
"""


def run_start(path: Path, cache: Path, world: int, tokenizer: Path, case: str) -> list[dict]:
    """Start ``world`` processes at once (LOCAL_RANK 0..world-1); their measurements."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "LOCAL_RANK": str(rank), "WORLD": str(world)}
        env.setdefault("PROBSFT_LOG_LEVEL", "WARNING")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(time.time()),
                    str(path),
                    str(cache),
                    str(tokenizer),
                    case,
                ],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a measuring process failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return sorted(out, key=lambda r: r["rank"])


def run_store(args) -> dict:
    rows = []
    from probsft_megatron.tokenizers import load_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="probsft-store-bench-", dir=args.scratch))
    try:
        # SmolLM2's tokenizer as a model folder holds it (tokenizer.json), as training loads it
        tokenizer = scratch / "tokenizer"
        load_tokenizer("smollm2").save_pretrained(tokenizer)
        for n in args.records:
            data = scratch / f"numina_{n}.jsonl"
            t0 = time.perf_counter()
            write_records(data, n)
            print(
                f"[store] {n} records: {data.stat().st_size / 2**20:.0f} MiB of jsonl "
                f"generated in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
            for world in args.ranks:
                cache = scratch / f"cache_{n}_{world}"
                for case in args.cases:
                    load = load_average()
                    per_rank = run_start(data, cache, world, tokenizer, case)
                    rows.append(
                        {
                            "records": n,
                            "jsonl_mib": data.stat().st_size / 2**20,
                            "ranks": world,
                            "cache": case,
                            "load_average_1min": load,
                            "per_rank": per_rank,
                        }
                    )
                    print(f"[store] {rows[-1]}", file=sys.stderr)
                shutil.rmtree(cache, ignore_errors=True)
            data.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "device": f"CPU: {cpu_name()}",
        "tokenizer": "SmolLM2-135M-Instruct's (a tokenizer.json folder, chat template), "
        "data.max_length 1024",
        "records": "NuminaMath format: problem of 20-80 words, solution of 100-400 words",
        "tokenizing_processes": "every CPU the builder may use",
        "rows": rows,
    }


def store_markdown(r: dict) -> str:
    lines = [
        "# Time to the first global batch and peak RSS per process: tokenized store",
        "",
        f"{r['device']}; {r['tokenizer']}; records: {r['records']}. Each process: its start "
        "(imports included) to its first global batch, wall clock, and the CPU seconds it "
        "used (its tokenizing workers' in brackets); peak RSS is the process's own high-water "
        "mark (VmHWM; the workers are forks sharing its pages). Cache off: data.cache=false, "
        "every process tokenizes the whole dataset in memory (how every rank started before "
        "the store); miss: rank 0 builds the store, rank 1 waits and maps it; hit: every "
        "process maps it. Wall times depend on the load average (last column); CPU seconds "
        "much less.",
        "",
        "| records | jsonl MiB | ranks | cache | first batch (s) per rank | CPU s per rank | "
        "imports (s) | peak RSS (MiB) per rank | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        times = " / ".join(f"{p['first_batch_s']:.1f}" for p in row["per_rank"])
        cpu = " / ".join(
            f"{p['cpu_s']:.1f}" + (f" [{p['workers_cpu_s']:.0f}]" if p["workers_cpu_s"] else "")
            for p in row["per_rank"]
        )
        imports = " / ".join(f"{p['imports_s']:.1f}" for p in row["per_rank"])
        rss = " / ".join(f"{p['peak_rss_mib']:.0f}" for p in row["per_rank"])
        lines.append(
            f"| {row['records']:,} | {row['jsonl_mib']:.0f} | {row['ranks']} | {row['cache']} | "
            f"{times} | {cpu} | {imports} | {rss} | {row['load_average_1min']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("layout", "store", "all"), default="all")
    ap.add_argument("--max-lengths", type=int, nargs="+", default=[1024, 3072])
    ap.add_argument("--examples", type=int, default=2048, help="examples of the length mix")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    ap.add_argument("--records", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--cases",
        nargs="+",
        choices=("miss", "hit", "off"),
        default=["miss", "hit"],
        help="miss: build the store; hit: map it (run after miss); off: data.cache=false, "
        "every process tokenizes in memory (how every rank started before the store)",
    )
    ap.add_argument("--scratch", default=None, help="folder for the generated data and stores")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.part in ("layout", "all"):
        r = run_layouts(args)
        write_results(args.out, "data_efficiency_layout_cpu", r, layout_markdown(r))
    if args.part in ("store", "all"):
        r = run_store(args)
        write_results(args.out, "data_efficiency_store_cpu", r, store_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
