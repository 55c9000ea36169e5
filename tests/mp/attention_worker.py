"""SDPA vs megatron's local attention: same weights, same inputs, compare logits and grads.

Run under torchrun (gloo, CPU) at any TP, for each case of ``--cases`` in turn (one
launch): ``causal`` compares plain causal attention; ``packed`` holds three documents per
row: the local attention gets them as a block-diagonal causal mask (the reference), SDPA as
one packed ``thd`` row of both rows with ``cu_seqlens`` and no mask; ``broken`` is ``packed``
with one sequence spanning the whole packed row for SDPA (negative control: attention
crosses documents). Writes ``{case: {"logits", "logits_scale", "grads"}}`` as JSON from
rank 0: max |diff| of logits and of every gradient (relative to that gradient's largest
entry: the test loss sums many terms, so gradients are large).
"""

import argparse
import sys

import torch

from probsft_megatron.fileio import atomic_write_json

CASES = {"causal": (False, False), "packed": (True, False), "broken": (True, True)}
"""case -> (packed, break_mask)"""


def compare(model_cfg, tconfig, tp: int, packed: bool, break_mask: bool) -> dict:
    """max |diff| of logits and relative gradients between local attention and SDPA."""
    from probsft_megatron import compat
    from probsft_megatron.model import build_gpt_model

    models = {}
    for impl in ("local", "sdpa"):
        compat.seed_model_parallel(7)
        models[impl] = build_gpt_model(model_cfg, tconfig, attention=impl)
    for (n1, p1), (n2, p2) in zip(
        models["local"].named_parameters(), models["sdpa"].named_parameters()
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1

    g = torch.Generator().manual_seed(0)
    b, s = 2, 48
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), generator=g)
    position_ids = torch.arange(s)[None].expand(b, -1).contiguous()
    mask = None
    if packed:  # three documents per row: positions restart, no cross-document attention
        bounds = [0, 13, 30, s]
        mask = torch.ones(b, 1, s, s, dtype=torch.bool)
        pos = torch.zeros(s, dtype=torch.long)
        for lo, hi in zip(bounds, bounds[1:]):
            mask[:, :, lo:hi, lo:hi] = ~torch.tril(torch.ones(hi - lo, hi - lo, dtype=torch.bool))
            pos[lo:hi] = torch.arange(hi - lo)
        position_ids = pos[None].expand(b, -1).contiguous()
    weights = torch.randn(b, s, model_cfg.vocab_size // tp, generator=g)
    outs = {}
    for impl, model in models.items():
        if impl == "sdpa" and packed:  # both rows as one thd row, boundaries only
            cu = [0, 13, 30, s, s + 13, s + 30, 2 * s]
            if break_mask:
                cu = [0, 2 * s]
            params = compat.packed_seq_params(
                torch.tensor(cu, dtype=torch.int32),
                max_seqlen=max(hi - lo for lo, hi in zip(cu, cu[1:])),
            )
            flat = model(
                tokens.reshape(1, -1), position_ids.reshape(1, -1), None, packed_seq_params=params
            )
            logits = flat.reshape(b, s, -1)
        else:
            logits = model(tokens, position_ids, mask)
        (logits * weights).sum().backward()
        outs[impl] = logits.detach()
    res = {
        "logits": float((outs["local"] - outs["sdpa"]).abs().max()),
        "logits_scale": float(outs["local"].abs().max()),
    }
    grad_diff = 0.0
    for (_, p1), (_, p2) in zip(
        models["local"].named_parameters(), models["sdpa"].named_parameters()
    ):
        scale = float(p1.grad.abs().max()) or 1.0
        grad_diff = max(grad_diff, float((p1.grad - p2.grad).abs().max()) / scale)
    res["grads"] = grad_diff  # relative to each gradient's largest entry
    diffs = torch.tensor([res["logits"], res["grads"]])
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    res["logits"], res["grads"] = diffs.tolist()
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cases", default="causal,packed", help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from probsft_megatron import runtime
    from probsft_megatron.model import ModelConfig, ParallelConfig, transformer_config

    model_cfg = ModelConfig(
        arch="qwen2",
        num_layers=2,
        hidden_size=128,
        ffn_hidden_size=256,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
    )
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp)
    runtime.init_distributed(parallel, seed=7, model=model_cfg)
    tconfig = transformer_config(model_cfg, parallel)
    out = {
        case: compare(model_cfg, tconfig, args.tp, *CASES[case]) for case in args.cases.split(",")
    }
    if torch.distributed.get_rank() == 0:
        atomic_write_json(args.out, out, indent=None)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
