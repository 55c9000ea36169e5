"""Peak memory and time of the fused vs unfused output layer + objective loss, in one run.

Measures the loss head alone -- from the final hidden states and the output weight to the
finished backward -- at Qwen2.5-1.5B's head (vocabulary 151,936, hidden 1536, TP=1) for
several token counts, set up as in training: the weight carries a float32 ``main_grad``
buffer (megatron DDP's gradient buffer, allocated with the inputs, like the weight itself):

* ``unfused``: megatron's path, ``ColumnParallelLinear`` (the GPT output layer) ->
  ``vocab_parallel_cross_entropy`` -> :class:`ObjectiveLoss`; the weight gradient lands in
  ``.grad`` and a post-accumulate hook adds it to ``main_grad`` and frees it, as DDP's
  backward hook does (megatron's ``gradient_accumulation_fusion`` needs apex/TE on a GPU);
* ``fused@C``: :func:`probsft_megatron.fused_loss.fused_objective_loss` with chunks of C tokens
  (one pass: the threshold is known before the chunk loop); it adds the weight gradient to
  ``main_grad`` chunk by chunk;
* ``fused-2pass@C`` (optional): a percentile objective without the global pre-pass, so the
  fused op first computes all CE, then recomputes the logits for the gradients.

Time: per token count one subprocess warms every variant up at its matmul shape, then runs
them in ``--rounds`` interleaved rounds (A B C A B C ...) so machine drift hits all alike;
the fastest run of each is reported (on a shared machine the least disturbed estimate).
Memory: every (variant, token count) runs in a fresh subprocess: inputs are allocated, one
warm-up step at the variant's matmul shape (``min(chunk, tokens)`` tokens; the BLAS library
allocates a per-shape workspace on the first call), then one measured forward + backward.
Peak memory on CUDA is ``torch.cuda.max_memory_allocated()`` above the allocation after the inputs;
on the CPU, where torch keeps no allocator statistics, the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` right before the measured run; without
that, ``ru_maxrss`` of the fresh process) minus the resident size at the reset. ``peak`` is
everything the head allocates above its inputs and the gradient buffer, ``d_hidden``
included. ``strict`` compares against the unfused peak minus the ``V x h`` weight gradient it
allocates transiently (an unfused head that, like the fused one, wrote straight into
``main_grad``): the ratio the fused head reaches even against that better baseline.

CPU runs use float32; CUDA runs bfloat16 (the training dtype), so a GPU machine just works:
    python benchmarks/fused_loss.py [--tokens 1024,2048,4096,8192] [--chunks 512,256]
    python benchmarks/fused_loss.py --tokens 8192,16384      # the GPU sizes
Writes ``benchmarks/results/fused_loss_<cpu|gpu>.{json,md}`` and prints the ratio table.
Targets: peak loss-head memory <= 1/8 of unfused, time <= 1.1x unfused (on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import device_name, device_tag, write_results

VOCAB, HIDDEN = 151_936, 1536


# -- one measurement, in its own process -----------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class _CpuPeak:
    """Resident-set high-water mark above the resident size at :meth:`reset`."""

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.method = "VmHWM after /proc/self/clear_refs"
        except OSError:
            self.method = "ru_maxrss of a fresh process"
        self.base = _rss_kib("VmRSS")

    def peak_bytes(self) -> int:
        if self.method.startswith("VmHWM"):
            high = _rss_kib("VmHWM")
        else:
            high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(high - self.base, 0) * 1024


class _CudaPeak:
    method = "torch.cuda.max_memory_allocated"

    def reset(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak_bytes(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def _ddp_hook(param) -> None:
    """What megatron DDP's backward hook does (overlap off): add ``.grad`` to the buffer."""
    param.main_grad.add_(param.grad)
    param.grad = None


class _Head:
    """The loss head (by default Qwen2.5-1.5B's size) on this machine's device and training
    dtype."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import ColumnParallelLinear

        from probsft_megatron import runtime
        from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if self.cuda else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.vocab, self.hidden = vocab, hidden
        runtime.init_distributed(ParallelConfig())
        self.group = parallel_state.get_tensor_model_parallel_group()
        heads = 12 if hidden % 12 == 0 else 2  # only the output layer is built
        head = ModelConfig(
            hidden_size=hidden,
            ffn_hidden_size=4 * hidden,
            num_attention_heads=heads,
            num_query_groups=2,
            vocab_size=vocab,
            num_layers=1,
        )
        # megatron's GPT output layer; the weight is passed in, as with tied embeddings
        self.layer = ColumnParallelLinear(
            hidden,
            vocab,
            config=transformer_config(head, ParallelConfig(), params_dtype=self.dtype),
            init_method=torch.nn.init.zeros_,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=True,
        )

    def inputs(self, tokens: int, unfused: bool):
        """hidden (``[s, b, h]`` for the output layer, ``[b, s, h]`` for the fused head), weight
        ``[V, h]``, labels and an all-ones loss mask ``[b, s]``; ``b = tokens / 1024``."""
        seq, batch = min(tokens, 1024), max(tokens // 1024, 1)
        g = torch.Generator(device=self.device).manual_seed(0)
        vocab, hidden_size = self.vocab, self.hidden
        weight = torch.empty(vocab, hidden_size, device=self.device, dtype=self.dtype)
        weight.normal_(0, 0.02, generator=g)
        hidden = torch.empty(batch, seq, hidden_size, device=self.device, dtype=self.dtype)
        hidden.normal_(generator=g)
        labels = torch.randint(0, vocab, (batch, seq), device=self.device, generator=g)
        mask = torch.ones(batch, seq, device=self.device)
        if unfused:
            hidden = hidden.transpose(0, 1).contiguous()
        weight.requires_grad_(True)
        weight.main_grad = torch.zeros(vocab, hidden_size, device=self.device, dtype=torch.float32)
        if unfused:
            weight.register_post_accumulate_grad_hook(_ddp_hook)
        return hidden.requires_grad_(True), weight, labels, mask

    def step(self, spec: dict, hidden, weight, labels, mask) -> float:
        """One forward + backward of the head: ``d_hidden`` in ``hidden.grad``, the weight
        gradient added to ``weight.main_grad``."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from probsft_megatron.fused_loss import fused_objective_loss
        from probsft_megatron.loss import LossConfig, ObjectiveLoss

        hidden.grad = weight.grad = None
        loss = ObjectiveLoss(LossConfig(objective=spec["objective"], chunk_size=spec["chunk"]))
        if spec["variant"] == "unfused":
            logits, _ = self.layer(hidden, weight=weight)
            ce = vocab_parallel_cross_entropy(logits, labels.T.contiguous()).T
            out = loss(ce, mask)
            del logits, ce
        else:
            out = fused_objective_loss(hidden, weight, labels, mask, loss, tp_group=self.group)
        out[0].backward()
        if self.cuda:
            torch.cuda.synchronize()
        return float(out[0].detach())

    def warm_up(self, spec: dict, tokens: int) -> None:
        """One step at the measured matmul shape (a chunk, or all tokens if fewer): the BLAS
        library allocates its per-shape workspace on the first call."""
        self.step(spec, *self.inputs(min(spec["chunk"], tokens), spec["variant"] == "unfused"))


def _memory(spec: dict, tokens: int) -> dict:
    """Peak memory of one forward + backward (run in a fresh process)."""
    head = _Head(spec["vocab"], spec["hidden"])
    head.warm_up(spec, tokens)
    args = head.inputs(tokens, spec["variant"] == "unfused")
    peak = _CudaPeak() if head.cuda else _CpuPeak()
    peak.reset()
    head.step(spec, *args)
    peak_bytes = peak.peak_bytes()
    hidden, weight = args[:2]
    assert weight.grad is None and float(weight.main_grad.abs().sum()) > 0
    return {
        "peak_bytes": peak_bytes,
        "d_hidden_bytes": hidden.grad.numel() * hidden.grad.element_size(),
        "d_weight_bytes": weight.numel() * weight.element_size(),
        "memory_method": peak.method,
        "dtype": str(head.dtype).removeprefix("torch."),
    }


def _timing(specs: list[dict], tokens: int, rounds: int) -> list[list[float]]:
    """Seconds per forward + backward of each spec, in interleaved rounds (one process)."""
    head = _Head(specs[0]["vocab"], specs[0]["hidden"])
    args = {unfused: head.inputs(tokens, unfused) for unfused in (True, False)}
    for spec in specs:
        head.warm_up(spec, tokens)
    times = [[] for _ in specs]
    for _ in range(rounds):
        for spec, out in zip(specs, times):
            t0 = time.perf_counter()
            head.step(spec, *args[spec["variant"] == "unfused"])
            out.append(time.perf_counter() - t0)
    return times


# -- the driver ----------------------------------------------------------------------------
def _subprocess(mode: str, payload) -> object:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, f"--{mode}", json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {payload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _table(rows: list[dict]) -> str:
    base = {r["tokens"]: r for r in rows if r["variant"] == "unfused"}
    lines = [
        "| tokens | variant | time (s) | time ratio | peak (GiB) | peak ratio | strict ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["variant"] != "unfused", r["variant"])):
        b = base[r["tokens"]]
        strict = b["peak_bytes"] - b["d_weight_bytes"]
        lines.append(
            f"| {r['tokens']} | {r['label']} | {r['time_s']:.2f} | "
            f"{r['time_s'] / b['time_s']:.2f} | {_gib(r['peak_bytes'])} | "
            f"{r['peak_bytes'] / b['peak_bytes']:.3f} | "
            + ("-" if r is b else f"{r['peak_bytes'] / strict:.3f}")
            + " |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,2048,4096,8192")
    ap.add_argument("--chunks", default="512,256", help="fused chunk sizes (tokens)")
    ap.add_argument("--objective", default="p")
    ap.add_argument(
        "--two-pass-tokens",
        default="2048",
        help="token counts at which to also run the two-pass percentile case "
        "(OnlyTopP-K50 without pre-pass, first chunk size); '' for none",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved timing rounds per token count (the fastest is reported)",
    )
    ap.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary (Qwen2.5's by default)")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (Qwen2.5-1.5B's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--memory", help=argparse.SUPPRESS)
    ap.add_argument("--timing", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory:
        print(json.dumps(_memory(*json.loads(args.memory))))
        return 0
    if args.timing:
        print(json.dumps(_timing(*json.loads(args.timing))))
        return 0

    chunks = [int(c) for c in args.chunks.split(",")]
    two_pass = [int(t) for t in args.two_pass_tokens.split(",") if t]
    shape = {"vocab": args.vocab, "hidden": args.hidden}
    rows = []
    token_counts = [int(t) for t in args.tokens.split(",")]
    for n in token_counts:
        specs = [
            {
                "variant": "unfused",
                "chunk": chunks[0],
                "objective": args.objective,
                "label": "unfused",
                **shape,
            }
        ]
        specs += [
            {
                "variant": "fused",
                "chunk": c,
                "objective": args.objective,
                "label": f"fused@{c}",
                **shape,
            }
            for c in chunks
        ]
        if n in two_pass:
            specs.append(
                {
                    "variant": "fused",
                    "chunk": chunks[0],
                    "objective": "OnlyTopP-K50",
                    "label": f"fused-2pass@{chunks[0]}",
                    **shape,
                }
            )
        t0 = time.perf_counter()
        times = _subprocess("timing", [specs, n, args.rounds])
        for spec, spec_times in zip(specs, times):
            row = dict(spec, tokens=n, time_s=min(spec_times), times_s=spec_times)
            row.update(_subprocess("memory", [spec, n]))
            rows.append(row)
            print(
                f"{row['label']:>18} {n:>6} tokens: {row['time_s']:7.2f} s, peak "
                f"{_gib(row['peak_bytes'])} GiB",
                flush=True,
            )
        print(f"{n} tokens took {time.perf_counter() - t0:.0f} s", flush=True)
        # written after every token count: a run cut short keeps what it finished
        _write(args, rows, final=n == token_counts[-1])
    return 0


def _write(args, rows: list[dict], final: bool) -> None:
    meta = {
        "device": device_name(),
        "torch": torch.__version__,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "tensor_parallel": 1,
        "dtype": rows[0]["dtype"],
        "memory_method": rows[0]["memory_method"],
        "objective": args.objective,
        "threads": torch.get_num_threads(),
        "timing_rounds": args.rounds,
        "load_average_1min_at_end": os.getloadavg()[0],
        "complete": final,
    }
    table = _table(rows)
    if final:
        print(table)
    md = [
        f"# Fused vs unfused loss head ({device_tag()})",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['threads']} threads; "
        f"{meta['dtype']}; vocabulary {args.vocab}, hidden {args.hidden}, TP=1; objective "
        f"{args.objective}. Time: fastest of {args.rounds} interleaved rounds. Memory: "
        f"{meta['memory_method']}, fresh process per row, above the inputs and the float32 "
        "main_grad buffer (weight gradients go there, as under megatron DDP). Ratios are "
        "fused / unfused at the same token count; strict: against the unfused peak minus "
        "its transient V x h weight gradient.",
        "",
        table,
    ]
    write_results(
        args.out, f"fused_loss_{device_tag()}", {"meta": meta, "rows": rows}, "\n".join(md)
    )


if __name__ == "__main__":
    sys.exit(main())
