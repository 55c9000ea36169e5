"""Measures what the memory planner estimates, on really built models (torchrun, gloo, CPU).

Two measurements, each written per rank into one JSON file by global rank 0:

* ``static``: for every case (model x layout x distributed optimizer x dtype) the model is
  built, wrapped in megatron DDP and given megatron's optimizer exactly as
  :func:`probsft_megatron.runtime.build_training_model` does; one optimizer step on the
  (zero) gradient buffer creates Adam's state. Then the bytes are summed from the tensors:
  *weights* over the distinct storages of the model's parameters (with the distributed
  optimizer that is DDP's contiguous parameter buffer), *grad_buffer* over DDP's
  ``grad_data`` buffers, and the optimizer's own storages (distinct from those two):
  *main_params* (its float32 parameter copies), *adam_moments* (``exp_avg``, ``exp_avg_sq``)
  and *adam_steps* (``step``).
* ``saved``: the tensors autograd keeps from one forward of the whole model (with labels,
  megatron's unfused loss head) for backward, counted through
  ``torch.autograd.graph.saved_tensors_hooks`` over distinct storages that are not
  parameters, for two sequence lengths, SDPA and megatron's local attention, and the recompute
  settings megatron can run on this machine.

Layouts run one after another in the same process group; megatron's model-parallel groups are
rebuilt for each.

Recompute on a machine without CUDA: megatron's checkpointing saves and restores the CUDA RNG
state, which does not exist here. When :mod:`probsft_megatron.cpu_backend` provides no CPU
fallback for that, this worker stands in an empty state for the ``saved`` measurement (the
models have no dropout, so no random number is drawn inside a recomputed region).
"""

import argparse
import gc

import torch
import torch.distributed as dist
from tiny_model import TINY_QWEN2

from probsft_megatron import compat, runtime
from probsft_megatron.fileio import atomic_write_json
from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

MODELS = {
    "tiny-qwen2": TINY_QWEN2,
    # sizes that are not multiples of 64, tied embeddings: the padding rules matter
    "tiny-odd-tied": ModelConfig(
        arch="llama",
        num_layers=2,
        hidden_size=40,
        ffn_hidden_size=72,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=250,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": ModelConfig(
        arch="llama",
        num_layers=30,
        hidden_size=576,
        ffn_hidden_size=1536,
        num_attention_heads=9,
        num_query_groups=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # a small shape for the activation count (head dim 32, GQA, qkv bias)
    "act-qwen2": ModelConfig(
        arch="qwen2",
        num_layers=2,
        hidden_size=256,
        ffn_hidden_size=768,
        num_attention_heads=8,
        num_query_groups=2,
        vocab_size=1024,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_layout(tp: int, pp: int) -> None:
    compat.destroy_model_parallel()
    compat.initialize_model_parallel(tp, pp)
    compat.seed_model_parallel(1234)


def ranks() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }


def _storage(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def measure_static(model_name: str, tp: int, pp: int, dist_opt: bool, dtype: str) -> dict:
    """Build model + DDP + optimizer at this layout; bytes summed from their tensors."""
    model = MODELS[model_name]
    world = dist.get_world_size()
    set_layout(tp, pp)
    dp = world // (tp * pp)
    tconfig = transformer_config(model, ParallelConfig(tp, pp, False), params_dtype=DTYPES[dtype])
    chunks, optimizer = runtime.build_training_model(
        model, tconfig, lr=1e-4, use_distributed_optimizer=dist_opt and dp > 1
    )
    ddp = chunks[0]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    optimizer.step()  # Adam's state exists after the first step
    weights = {}
    for p in ddp.module.parameters():
        ptr, n = _storage(p)
        weights[ptr] = n
    grads = {}
    for buf in list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", [])):
        ptr, n = _storage(buf.grad_data)
        grads[ptr] = n
    taken = set(weights) | set(grads)
    parts = {"main_params": {}, "adam_moments": {}, "adam_steps": {}}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                ptr, n = _storage(p)
                if ptr not in taken:
                    parts["main_params"][ptr] = n
                for key, value in inner.state[p].items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    ptr, n = _storage(value)
                    if ptr in taken:
                        continue
                    kind = "adam_steps" if key == "step" else "adam_moments"
                    parts[kind][ptr] = n
    rec = {
        "model": model_name,
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "distributed_optimizer": dist_opt,
        "dtype": dtype,
        "weights": sum(weights.values()),
        "grad_buffer": sum(grads.values()),
        "grad_buffer_unpadded": sum(b.numel_unpadded for b in ddp.buffers)
        * ddp.buffers[0].grad_data.element_size(),
        **{k: sum(v.values()) for k, v in parts.items()},
        **ranks(),
    }
    del chunks, optimizer, ddp
    gc.collect()
    return rec


def cuda_rng_stand_in() -> bool:
    """Let megatron's checkpointing run without CUDA (see the module docstring); True when the
    stand-in was needed."""
    import megatron.core.tensor_parallel.random as mrandom

    try:
        mrandom._get_all_rng_states()
        return False
    except (AssertionError, RuntimeError):
        mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
        mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
        return True


def measure_saved(
    model_name: str, tp: int, sp: bool, seq: int, attention: str, recompute: dict
) -> dict:
    """Bytes autograd keeps for backward from one forward (whole model, unfused head)."""
    from probsft_megatron.model import build_gpt_model

    model = MODELS[model_name]
    set_layout(tp, 1)
    tconfig = transformer_config(model, ParallelConfig(tp, 1, sp), **recompute)
    gpt = build_gpt_model(model, tconfig, attention=attention)
    gpt.train()
    params = {_storage(p)[0] for p in gpt.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr, n = _storage(t)
        if ptr not in params:
            seen[ptr] = n
        return t

    b = 2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (b, seq), generator=g)
    position = torch.arange(seq)[None].expand(b, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gpt(tokens, position, None, labels=tokens)
    out.sum().backward()  # the recomputation in the backward must work too
    rec = {
        "model": model_name,
        "tp": tp,
        "sp": sp,
        "seq": seq,
        "micro_batch": b,
        "attention": attention,
        "recompute": recompute,
        "saved": sum(seen.values()),
        **ranks(),
    }
    del gpt, out
    gc.collect()
    return rec


def gather(records: list) -> list:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, records)
    return [r for per_rank in every for r in per_rank]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--static",
        default="",
        help="comma list of model:layout:distopt:dtype, "
        "layout tp1|tp2|pp2|dp (dp: TP=PP=1, all ranks data-parallel)",
    )
    ap.add_argument(
        "--saved",
        default="",
        help="comma list of model:tp:sp:attention:recompute "
        "(recompute none|selective|uniform1|uniform2|block1)",
    )
    ap.add_argument("--seqs", default="64,128")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runtime.init_distributed(ParallelConfig(), seed=1234)
    layouts = {
        "tp1": (1, 1),
        "tp2": (2, 1),
        "pp2": (1, 2),
        "pp2dp": (1, 2),
        "tp2dp": (2, 1),
        "dp": (1, 1),
    }
    result = {"static": [], "saved": [], "unsupported": []}
    for spec in filter(None, args.static.split(",")):
        model_name, layout, dist_opt, dtype = spec.split(":")
        tp, pp = layouts[layout]
        result["static"] += gather(
            [measure_static(model_name, tp, pp, dist_opt == "distopt", dtype)]
        )
    recomputes = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "uniform1": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
        "uniform2": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 2,
        },
        "block1": {
            "recompute_granularity": "full",
            "recompute_method": "block",
            "recompute_num_layers": 1,
        },
    }
    if args.saved:
        result["cuda_rng_stand_in"] = cuda_rng_stand_in()
    for spec in filter(None, args.saved.split(",")):
        model_name, tp, sp, attention, recompute = spec.split(":")
        for seq in map(int, args.seqs.split(",")):
            try:
                rec = measure_saved(
                    model_name, int(tp), sp == "sp", seq, attention, recomputes[recompute]
                )
            except AssertionError as exc:  # e.g. a CUDA-only mask built in the recompute
                if "CUDA" not in str(exc):
                    raise
                result["unsupported"].append({"spec": spec, "error": str(exc)})
                break
            result["saved"] += gather([rec])
    if dist.get_rank() == 0:
        atomic_write_json(args.out, result)
    runtime.shutdown()


if __name__ == "__main__":
    main()
