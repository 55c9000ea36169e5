"""The memory planner's estimate against the measured peak of a real training step.

For each (loss head, sequence length) a fresh process builds the model exactly as
``probsft train`` does (megatron GPTModel, DDP, megatron's Adam; TP=1, one process), runs one
warm-up step (Adam's state is created by the first step), then measures a second full step
(``runtime.train_step``: forward, backward, gradient clipping, optimizer step):

* **static**: weights, gradient buffer and optimizer state summed from the tensors, against
  :func:`probsft_megatron.plan.static_memory` (these must be equal);
* **dynamic peak**: the most bytes the step holds at once above what existed before it.
  On CUDA that is ``torch.cuda.max_memory_allocated()`` minus the allocation at the start.
  On the CPU torch keeps no allocator statistics, so a ``TorchDispatchMode`` records every
  new storage an operator returns (not one it shares with an input: views, in-place and
  ``out=`` results) and a ``weakref`` finalizer notices when it is freed (the same
  quantity, counted per storage); the resident-set high-water mark (``VmHWM`` after
  ``/proc/self/clear_refs``) is printed next to it as a cross-check that includes allocator
  caching. The estimate is :attr:`StageEstimate.dynamic` (activations + the larger of the
  loss head and the backward transient, or the optimizer-step transient), without the margin.

The error is ``estimate / measured - 1``.

    python benchmarks/plan_accuracy.py                       # CPU: SmolLM2-135M shape, fp32
    python benchmarks/plan_accuracy.py --shape qwen2.5-1.5b --seqs 2048,4096   # GPU: bf16

Writes ``benchmarks/results/plan_accuracy_<cpu|gpu>_<shape>[_bf16].{json,md}`` (``_bf16``:
a bfloat16 run on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from common import device_name, device_tag, write_results

SHAPES = {
    "smollm2-135m": {
        "arch": "llama",
        "num_layers": 30,
        "hidden_size": 576,
        "ffn_hidden_size": 1536,
        "num_attention_heads": 9,
        "num_query_groups": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
    },
    "qwen2.5-1.5b": {
        "arch": "qwen2",
        "num_layers": 28,
        "hidden_size": 1536,
        "ffn_hidden_size": 8960,
        "num_attention_heads": 12,
        "num_query_groups": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
    },
    "small": {
        "arch": "qwen2",
        "num_layers": 4,
        "hidden_size": 512,
        "ffn_hidden_size": 1408,
        "num_attention_heads": 8,
        "num_query_groups": 2,
        "vocab_size": 8192,
    },
}


class StorageTracker:
    """Bytes of the storages operators create while active: live now, and the most at once."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out, (args, kwargs))
                return out

        self.mode = _Mode()
        self.live = self.peak = 0
        self._ids: set[int] = set()

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self._ids.discard(key)

    def _record(self, out, inputs) -> None:
        """Count the outputs' storages that are new: not shared with an input (views,
        in-place and ``out=`` results alias their input's existing storage)."""
        from torch.utils._pytree import tree_flatten

        given = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten(inputs)[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st.data_ptr() in given:
                continue
            key, n = id(st), st.nbytes()
            if n == 0 or key in self._ids:
                continue
            self._ids.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, key, n)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _static_bytes(ddp, optimizer) -> dict:
    """Weights, gradient buffer, optimizer state summed over distinct storages."""

    def key(t):
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()

    weights = dict(key(p) for p in ddp.module.parameters())
    grads = dict(key(b.grad_data) for b in ddp.buffers)
    opt = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                opt.update([key(p)])
                opt.update(key(v) for v in inner.state[p].values() if isinstance(v, torch.Tensor))
    opt = {k: v for k, v in opt.items() if k not in weights and k not in grads}
    return {
        "weights": sum(weights.values()),
        "grad_buffer": sum(grads.values()),
        "optimizer": sum(opt.values()),
    }


def child(args) -> dict:
    from probsft_megatron import plan as P
    from probsft_megatron import runtime
    from probsft_megatron.loss import LossConfig, ObjectiveLoss
    from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

    cuda = torch.cuda.is_available()
    dtype = "bf16" if cuda else args.dtype
    seq, mbs = args.seq, args.micro_batch
    model = ModelConfig(max_position_embeddings=max(seq, 2048), **SHAPES[args.shape])
    parallel = ParallelConfig()
    runtime.init_distributed(parallel, seed=0, model=model)
    tconfig = transformer_config(
        model, parallel, params_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
    )
    loss_cfg = LossConfig("original", implementation=args.head, chunk_size=args.chunk)
    chunks, optimizer = runtime.build_training_model(
        model,
        tconfig,
        lr=1e-5,
        weight_decay=0.01,
        attention="sdpa",
        loss_config=loss_cfg,
        clip_grad=1.0,
    )
    dev = runtime.cpu_backend.device()
    fwd = runtime.loss_head(ObjectiveLoss(loss_cfg), dev)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (mbs, seq + 1), generator=g)
    batch = runtime.Batch(
        tokens[:, :-1].contiguous(),
        tokens[:, 1:].contiguous(),
        torch.ones(mbs, seq),
        torch.arange(seq)[None].expand(mbs, -1).contiguous(),
    )
    batch = batch.to(dev)

    def step():
        return runtime.train_step(
            chunks, optimizer, fwd, [batch], seq_length=seq, micro_batch_size=mbs
        )

    step()  # Adam's state, BLAS workspaces
    gc.collect()
    static = _static_bytes(chunks[0], optimizer)
    rss = {}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stats = step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated above the allocation before the step"
        rss["reserved_peak"] = torch.cuda.max_memory_reserved()
        rss["allocated_peak"] = torch.cuda.max_memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        with StorageTracker() as tracker:
            stats = step()
        measured = tracker.peak
        rss["vmhwm_above_start"] = (_rss_kib("VmHWM") - base) * 1024
        method = "peak of live storages created during the step (TorchDispatchMode + weakref)"
    layout = P.Layout()
    workload = P.Workload(
        micro_batch_size=mbs,
        seq_length=seq,
        global_batch_size=mbs,
        params_dtype=dtype,
        loss_implementation=args.head,
        chunk_size=args.chunk,
        attention="sdpa",
        kernels="cuda" if cuda else "cpu",
        adam="foreach" if cuda else "single",
    )
    st = P.estimate(model, layout, workload).worst
    return {
        "head": args.head,
        "seq": seq,
        "micro_batch": mbs,
        "dtype": dtype,
        "loss": float(stats.get("loss_sum", float("nan"))) if isinstance(stats, dict) else None,
        "static_measured": static,
        "static_estimated": {
            "weights": st.static.weights,
            "grad_buffer": st.static.grad_buffer,
            "optimizer": st.static.optimizer,
        },
        "dynamic_measured": measured,
        "dynamic_estimated": st.dynamic,
        "estimated_parts": {
            "activations": st.activations,
            "loss_head": st.loss_head,
            "backward_transient": st.backward_transient,
            "embedding_backward": st.embedding_backward,
            "optimizer_step": st.optimizer_step,
        },
        "method": method,
        **rss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--seqs", default="512,2048", help="sequence lengths (micro-batch tokens)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--heads", default="unfused,fused", help="loss heads to measure")
    ap.add_argument("--chunk", type=int, default=512, help="fused head chunk size")
    ap.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="parameter dtype on the CPU (CUDA always runs bf16)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--head", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for head in args.heads.split(","):
        for seq in map(int, args.seqs.split(",")):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--shape",
                args.shape,
                "--seq",
                str(seq),
                "--head",
                head,
                "--micro-batch",
                str(args.micro_batch),
                "--chunk",
                str(args.chunk),
                "--dtype",
                args.dtype,
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not line:
                print(
                    f"[plan_accuracy] {head} seq {seq} failed:\n{proc.stderr[-3000:]}",
                    file=sys.stderr,
                )
                return 1
            r = json.loads(line[-1])
            r["static_exact"] = r["static_measured"] == r["static_estimated"]
            r["dynamic_error"] = r["dynamic_estimated"] / r["dynamic_measured"] - 1
            rows.append(r)
            print(
                f"[plan_accuracy] {head} seq {seq}: measured {r['dynamic_measured'] / 2**20:.1f}"
                f" MiB, estimated {r['dynamic_estimated'] / 2**20:.1f} MiB "
                f"({r['dynamic_error']:+.1%}); static exact: {r['static_exact']}",
                file=sys.stderr,
            )
            _write(args, rows)  # after every row: a run cut short keeps what it finished
    print(_write(args, rows))
    return 0


def _write(args, rows: list[dict]) -> str:
    """The result files of the rows so far; returns the markdown table."""
    dev = device_name()
    mib = 2**20
    md = [
        f"Planner vs measured training step, {args.shape} shape, TP=1, micro batch "
        f"{args.micro_batch} ({dev}, {rows[0]['dtype']}, torch {torch.__version__}). "
        f"Dynamic: {rows[0]['method']}.",
        "",
        "| head | seq | static measured (MiB) | static estimated (MiB) | dynamic measured (MiB) "
        "| dynamic estimated (MiB) | error "
        "| activations / head / backward / embedding / step (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sm, se = sum(r["static_measured"].values()), sum(r["static_estimated"].values())
        parts = " / ".join(f"{v / mib:.0f}" for v in r["estimated_parts"].values())
        md.append(
            f"| {r['head']} | {r['seq']} | {sm / mib:.1f} | {se / mib:.1f}"
            f"{'' if r['static_exact'] else ' (differs)'} | "
            f"{r['dynamic_measured'] / mib:.1f} | {r['dynamic_estimated'] / mib:.1f} | "
            f"{r['dynamic_error']:+.1%} | {parts} |"
        )
    suffix = "_bf16" if rows[0]["dtype"] == "bf16" and device_tag() == "cpu" else ""
    write_results(
        args.out,
        f"plan_accuracy_{device_tag()}_{args.shape}{suffix}",
        {"device": dev, "args": vars(args), "rows": rows},
        "\n".join(md),
    )
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
