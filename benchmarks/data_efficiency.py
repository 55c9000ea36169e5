"""What the data path costs: computed positions per real token, and the start of a run.

Two parts (``--part layout``, ``--part store`` or ``--part all``), and a GPU check:

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
  ``--one-build``: build each size's store once and map it from every rank count.
* **packed-te** (``--part packed-te``; ``scripts/gpu_benchmarks.sh`` runs it): on a GPU with
  Transformer Engine, a few training steps of packed and of dynamically padded micro-batches
  from the same weights through TE's attention (``thd`` with ``cu_seqlens``), and a control
  whose packed rows are one sequence each (attention crosses the examples): packed must match
  padded and the control must not (exit 1 otherwise). Skipped, exit 0, elsewhere.

Writes ``data_efficiency_<part>_cpu.json`` and ``.md`` under ``--out``
(``data_efficiency_packed_te_gpu`` for the GPU check).
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
    """Examples of given lengths (random tokens; a response after the first quarter).
    ``alphabet``: each example draws its tokens from its own ``alphabet`` random tokens, so
    attention to the example's earlier tokens predicts the next one (and attention to
    another example's tokens misleads it)."""

    def __init__(self, lengths: np.ndarray, vocab: int, alphabet: int | None = None):
        self.lengths = lengths
        self.vocab = vocab
        self.alphabet = alphabet

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        import torch

        n = int(self.lengths[i])
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(n)
        mask[n // 4 : n - 1] = 1
        if self.alphabet:
            letters = torch.randperm(self.vocab - 1, generator=g)[: self.alphabet] + 1
            ids = letters[torch.randint(0, self.alphabet, (n,), generator=g)]
        else:
            ids = torch.randint(1, self.vocab, (n,), generator=g)
        return {"input_ids": ids, "loss_mask": mask}


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


# -- packed sequences through Transformer Engine (a GPU) ----------------------------------


def run_packed_te(args) -> dict | None:
    """Packed vs dynamically padded micro-batches through Transformer Engine's attention, on
    a GPU: the same global batches from the same weights must give the same losses (bf16
    tolerance), and the negative control (each packed row as one sequence: attention
    crosses the examples) must not. None where CUDA or Transformer Engine is missing."""
    import dataclasses

    import torch

    from probsft_megatron import hardware, runtime
    from probsft_megatron.config import ModelConfig, ParallelConfig
    from probsft_megatron.data import GlobalBatchLoader
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import transformer_config

    if not (hardware.cuda_available() and hardware.te_available()):
        print(
            "[packed-te] skipped: needs a GPU with Transformer Engine (CUDA available: "
            f"{hardware.cuda_available()}, Transformer Engine: {hardware.te_available()})",
            file=sys.stderr,
        )
        return None
    max_length = max(args.max_lengths)
    model = ModelConfig(
        arch="qwen2",
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=512,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=1024,
        max_position_embeddings=max_length,
    )
    runtime.init_distributed(ParallelConfig(), seed=0, model=model)
    tconfig = transformer_config(model, ParallelConfig(), params_dtype=torch.bfloat16)
    # per-example alphabets: what a token may be is in the example's own context, so letting
    # attention cross into the neighbouring examples changes the loss (the control)
    data = Lengths(length_mix(args.examples, max_length), model.vocab_size, alphabet=8)
    init = Path(tempfile.mkdtemp(prefix="probsft-packed-te-"))
    chunks, _ = runtime.build_training_model(model, tconfig, lr=1e-4, attention="te")
    runtime.save_model_weights(chunks[0].module, str(init))
    del chunks

    def crossing(batch):
        t = batch.tokens.shape[1]
        return dataclasses.replace(
            batch, cu_seqlens=torch.tensor([0, t], dtype=torch.int32), max_seqlen=t
        )

    losses = {}
    try:
        for mode in ("padded", "packed", "packed, attention crossing (control)"):
            loader = GlobalBatchLoader(
                data,
                global_batch_size=args.global_batch,
                micro_batch_size=args.micro_batch,
                dp_rank=0,
                dp_size=1,
                seq_length=max_length,
                seed=1,
                packing=mode != "padded",
            )
            chunks, optimizer = runtime.build_training_model(
                model, tconfig, lr=3e-3, attention="te", load_dir=str(init)
            )
            head = runtime.loss_head(ObjectiveLoss(LossConfig("original")), "cuda")
            losses[mode] = []
            for k, step in enumerate(loader):
                if k == args.steps:
                    break
                if "crossing" in mode:
                    step = [crossing(b) for b in step]
                stats = runtime.train_step(chunks, optimizer, head, step)
                losses[mode].append(float(stats.loss))
            del chunks, optimizer
    finally:
        shutil.rmtree(init, ignore_errors=True)
        runtime.shutdown()
    ref = np.array(losses["padded"])
    rows = []
    for mode, values in losses.items():
        diff = float(np.max(np.abs(np.array(values) - ref) / np.abs(ref)))
        rows.append({"mode": mode, "losses": values, "max_rel_diff_vs_padded": diff})
    # bf16 weights and activations, kernels that sum in other orders; on the CPU stand-in
    # (SDPA, same weights) packed was 3e-5 from padded and the control 1.2e-2
    tol = 5e-3
    packed, control = rows[1]["max_rel_diff_vs_padded"], rows[2]["max_rel_diff_vs_padded"]
    return {
        "device": torch.cuda.get_device_name(),
        "model": "2 layers, hidden 256, 4 heads (2 KV groups), vocab 1024, bf16, "
        "Transformer Engine attention (THD with cu_seqlens when packed)",
        "steps": args.steps,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "max_length": max_length,
        "tolerance_rel": tol,
        "packed_matches": packed <= tol,
        "control_differs": control > max(tol, 4 * packed),
        "rows": rows,
    }


def packed_te_markdown(r: dict) -> str:
    lines = [
        "# Packed sequences through Transformer Engine's attention: losses vs dynamic padding",
        "",
        f"{r['device']}; {r['model']}; {r['steps']} steps of global batch {r['global_batch']} "
        f"(micro-batch {r['micro_batch']}), max_length {r['max_length']}, the same weights "
        f"at the start of each mode. Packed matches padded within {r['tolerance_rel']:g} "
        f"(relative): {r['packed_matches']}; the control (attention crossing the packed "
        f"examples) differs: {r['control_differs']}.",
        "",
        "| mode | losses per step | max relative difference vs padded |",
        "|---|---|---|",
    ]
    for row in r["rows"]:
        values = ", ".join(f"{v:.4f}" for v in row["losses"])
        lines.append(f"| {row['mode']} | {values} | {row['max_rel_diff_vs_padded']:.2e} |")
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
    "workers_peak_rss_mib": kids.ru_maxrss / 1024,
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


def run_store(args, on_row=None) -> dict:
    """Part (b); ``on_row(result)`` is called after every row (the results so far)."""
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
                cache = scratch / (f"cache_{n}" if args.one_build else f"cache_{n}_{world}")
                for case in args.cases:
                    if args.one_build and case == "miss" and world != args.ranks[0]:
                        continue  # the store of the first rank count is there: a hit
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
                    if on_row is not None:
                        on_row(store_result(rows))
                if not args.one_build:
                    shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(scratch / f"cache_{n}", ignore_errors=True)
            data.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return store_result(rows)


def store_result(rows: list[dict]) -> dict:
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
        "mark (VmHWM), its largest tokenizing worker's in brackets (forks: they share the "
        "parent's pages, so the two do not add up). Cache off: data.cache=false, "
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
        rss = " / ".join(
            f"{p['peak_rss_mib']:.0f}"
            + (f" [{p['workers_peak_rss_mib']:.0f}]" if p.get("workers_peak_rss_mib") else "")
            for p in row["per_rank"]
        )
        lines.append(
            f"| {row['records']:,} | {row['jsonl_mib']:.0f} | {row['ranks']} | {row['cache']} | "
            f"{times} | {cpu} | {imports} | {rss} | {row['load_average_1min']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part",
        choices=("layout", "store", "all", "packed-te"),
        default="all",
        help="all: layout and store; packed-te (a GPU with Transformer Engine; skips "
        "elsewhere): packed vs padded losses through TE's attention",
    )
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
    ap.add_argument(
        "--one-build",
        action="store_true",
        help="build each size's store once (a miss with the first --ranks value only); the "
        "other rank counts map it (hits): for sizes whose build takes long",
    )
    ap.add_argument("--scratch", default=None, help="folder for the generated data and stores")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.part == "packed-te":
        r = run_packed_te(args)
        if r is None:
            return 0
        write_results(args.out, "data_efficiency_packed_te_gpu", r, packed_te_markdown(r))
        print(packed_te_markdown(r))
        return 0 if r["packed_matches"] and r["control_differs"] else 1
    if args.part in ("layout", "all"):
        r = run_layouts(args)
        write_results(args.out, "data_efficiency_layout_cpu", r, layout_markdown(r))
    if args.part in ("store", "all"):

        def save(r: dict) -> None:  # after every row: a long run keeps what it measured
            write_results(args.out, "data_efficiency_store_cpu", r, store_markdown(r))

        save(run_store(args, on_row=save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
