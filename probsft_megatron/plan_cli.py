"""`probsft plan`: will a recipe fit on the GPUs, and with which layout?

    probsft plan --config RECIPE [--gpus N] [--gpu-memory GB] [--gpus-per-node 8] [key=value ...]
    probsft plan --config RECIPE --json            # the same as JSON
    probsft plan --recipes-table                   # the shipped recipes on 8 x 80 and 8 x 141 GB

Prints, per GPU, the requested layout's weights, gradient buffer, optimizer state (with and
without the distributed optimizer), activations (with and without sequence parallelism, per
recompute setting), loss head (unfused vs fused), transients and margin; the cheapest layout
that fits, and why each cheaper one does not. Exit status 0 when the requested layout fits,
1 when it does not (see :mod:`probsft_megatron.plan` for what is counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from probsft_megatron import plan as P

NODE_RECIPE_MIN_PARAMS = 1.0e9
"""Recipes whose model has at least this many parameters ship a layout for one 8-GPU node."""
NODE_GPUS = 8
NODE_MEMORIES_GB = (80.0, 141.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML: a path or a name under configs/recipes")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs of the job (default: one node, --gpus-per-node)")
    p.add_argument("--gpu-memory", type=float, default=P.DEFAULT_GPU_MEMORY_GB, metavar="GB",
                   help="memory of each GPU in GiB, e.g. 80 (H100/A100 80GB) or 141 (H200) "
                        f"(default {P.DEFAULT_GPU_MEMORY_GB:g})")
    p.add_argument("--gpus-per-node", type=int, default=P.DEFAULT_GPUS_PER_NODE,
                   help="tensor parallelism stays within a node (default 8)")
    p.add_argument("--margin-gb", type=float, default=P.DEFAULT_MARGIN_GIB, metavar="GB",
                   help="fixed margin for CUDA context, NCCL and workspaces (default "
                        f"{P.DEFAULT_MARGIN_GIB:g}; {P.FRAGMENTATION:.0%} of the rest is added)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--recipes-table", action="store_true",
                   help="a Markdown table of every shipped recipe of >= 1B parameters on one node "
                        "of 8 x 80 GB and 8 x 141 GB (docs/training.md)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2")


# -- what the report holds ---------------------------------------------------------------------
def _gib(n: int | float) -> float:
    return round(n / P.GiB, 2)


def _candidate_json(c: P.Candidate | None) -> dict | None:
    if c is None:
        return None
    out = {"layout": dataclasses.asdict(c.layout), "label": c.layout.label(),
           "overrides": c.layout.overrides(), "fits": c.fits, "reason": c.reason}
    if c.estimate is not None:
        out["per_gpu_gib"] = {k: round(v, 2) for k, v in c.estimate.parts().items()}
        out["worst_stage"] = c.estimate.worst.pp_rank
        out["stages"] = [{"pp_rank": s.pp_rank, "total_gib": _gib(s.total),
                          "in_flight_micro_batches": s.in_flight} for s in c.estimate.stages]
    return out


def alternatives(model, layout: P.Layout, workload: P.Workload) -> dict:
    """The worst stage's optimizer state with and without the distributed optimizer,
    activations with and without SP per recompute setting, and both loss heads (GiB)."""
    est = P.estimate(model, layout, workload)
    worst = est.worst
    with_dist = worst.static if layout.distributed_optimizer else worst.static_other_optimizer
    without = worst.static_other_optimizer if layout.distributed_optimizer else worst.static
    recomputes = {"none": {}, "selective": {"recompute": "selective"},
                  "full_uniform_1": {"recompute": "full", "recompute_method": "uniform",
                                     "recompute_num_layers": 1}}
    acts = {}
    for sp in ([False, True] if layout.tp > 1 else [False]):
        row = {}
        for name, kw in recomputes.items():
            other = dataclasses.replace(layout, sequence_parallel=sp, recompute="none",
                                        recompute_method=None, recompute_num_layers=None)
            other = dataclasses.replace(other, **kw)
            row[name] = _gib(P.estimate_stage(model, other, workload, worst.pp_rank).activations)
        acts["sp" if sp else "no_sp"] = row
    head = P.loss_head(model, layout, workload)
    return {
        "stage": worst.pp_rank,
        "optimizer_state_gib": {"distributed": _gib(with_dist.optimizer),
                                "not_distributed": _gib(without.optimizer)},
        "weights_gib": {"distributed": _gib(with_dist.weights),
                        "not_distributed": _gib(without.weights)},
        "activations_gib": acts,
        "loss_head_gib": {"unfused": _gib(head.unfused_peak),
                          f"fused_chunk_{workload.chunk_size}": _gib(head.fused_peak)},
    }


def report(cfg, plan: P.Plan, name: str | None) -> dict:
    model, work = cfg.model, P.workload_of(cfg)
    out = {
        "config": name, "gpus": plan.gpus, "gpus_per_node": plan.gpus_per_node,
        "gpu_memory_gib": plan.gpu_memory_gb,
        "model": {"arch": model.arch, "layers": model.num_layers, "hidden": model.hidden_size,
                  "parameters": model.num_parameters()},
        "workload": dataclasses.asdict(work),
        "requested": _candidate_json(plan.requested),
        "recommended": _candidate_json(plan.recommended),
        "rejected": [{"label": c.layout.label(), "reason": c.reason} for c in plan.rejected],
    }
    if plan.requested.estimate is not None:
        out["alternatives"] = alternatives(model, plan.requested.layout, work)
    return out


# -- text -----------------------------------------------------------------------------------------
PART_NAMES = {
    "weights": "weights", "gradient_buffer": "gradient buffer",
    "optimizer_state": "optimizer state", "activations": "activations (in flight)",
    "loss_head": "loss head", "backward_transient": "backward transient",
    "embedding_backward": "embedding backward",
    "optimizer_step_transient": "optimizer-step transient", "margin": "margin",
    "total": "peak per GPU",
}


def _parts_table(columns: dict[str, dict | None]) -> str:
    names = [k for k, v in columns.items() if v and v.get("per_gpu_gib")]
    width = max(len(n) for n in PART_NAMES.values())
    col = max([12] + [len(n) for n in names])
    lines = ["GiB per GPU".ljust(width) + "".join(n.rjust(col + 2) for n in names)]
    for key, label in PART_NAMES.items():
        lines.append(label.ljust(width) + "".join(
            f"{columns[n]['per_gpu_gib'][key]:.1f}".rjust(col + 2) for n in names))
    return "\n".join(lines)


def render(rep: dict) -> str:
    m, w = rep["model"], rep["workload"]
    req, rec = rep["requested"], rep["recommended"]
    lines = [f"{rep['config'] or 'config'}: {m['arch']} {m['layers']} layers, "
             f"{m['parameters'] / 1e9:.2f}B parameters; micro batch {w['micro_batch_size']} x "
             f"{w['seq_length']} tokens, {w['params_dtype']}, {w['loss_implementation']} loss head; "
             f"{rep['gpus']} GPU(s) of {rep['gpu_memory_gib']:g} GiB, {rep['gpus_per_node']} per node",
             ""]
    verdict = (f"fits ({req['per_gpu_gib']['total']:.1f} GiB)" if req["fits"]
               else f"does not fit ({req['reason']})")
    lines.append(f"requested    {req['label']}: {verdict}")
    if rec is None:
        lines.append("recommended  none: no layout fits on these GPUs (add GPUs, lower "
                     "train.micro_batch_size or data.max_length, or use loss.implementation=fused)")
    else:
        lines.append(f"recommended  {rec['label']}: {rec['per_gpu_gib']['total']:.1f} GiB")
    lines.append("")
    cols = {"requested": req}
    if rec is not None and rec["label"] != req["label"]:
        cols["recommended"] = rec
    if any(c.get("per_gpu_gib") for c in cols.values()):
        lines += [_parts_table(cols), ""]
    alt = rep.get("alternatives")
    if alt:
        lines.append(f"the requested layout, stage {alt['stage']} (GiB per GPU):")
        o = alt["optimizer_state_gib"]
        wt = alt["weights_gib"]
        lines.append(f"  optimizer state: {o['distributed']:.2f} with the distributed optimizer, "
                     f"{o['not_distributed']:.2f} without (weights {wt['distributed']:.2f} / "
                     f"{wt['not_distributed']:.2f})")
        lines.append("  activations:      recompute none / selective / full (uniform, 1 layer)")
        for key, row in alt["activations_gib"].items():
            label = "with SP" if key == "sp" else "without SP"
            lines.append(f"    {label:<14}  " + " / ".join(f"{v:.2f}" for v in row.values()))
        heads = list(alt["loss_head_gib"].items())
        lines.append("  loss head (last stage): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}"
                                                        for k, v in heads))
        lines.append("")
    if rep["rejected"] and rec is not None:
        lines.append("cheaper layouts that do not fit:")
        lines += [f"  {r['label']}: {r['reason']}" for r in rep["rejected"]]
        lines.append("")
    if rec is not None and rec["label"] != req["label"]:
        lines.append("to use the recommended layout: " + " ".join(rec["overrides"]))
    return "\n".join(lines).rstrip()


# -- the recipes table ---------------------------------------------------------------------------
def node_recipes() -> list[str]:
    """Shipped recipes whose model has >= 1B parameters (the ones that need a node)."""
    from probsft_megatron.config import list_recipes, load_config

    return [name for name in list_recipes()
            if load_config(name).model.num_parameters() >= NODE_RECIPE_MIN_PARAMS]


def recipes_table() -> str:
    """Markdown: each node recipe's own layout and estimate on 8 x 80 GB, and the planner's
    recommendation on 8 x 141 GB."""
    from probsft_megatron.config import load_config

    small, large = NODE_MEMORIES_GB
    rows = ["| recipe | parameters | micro batch x tokens | layout (8 x 80 GB) | GiB per GPU | "
            "layout on 8 x 141 GB | GiB per GPU |", "|---|---|---|---|---:|---|---:|"]
    for name in node_recipes():
        cfg = load_config(name)
        p80 = P.plan(cfg, NODE_GPUS, small)
        p141 = P.plan(cfg, NODE_GPUS, large)
        req = p80.requested
        own = f"{req.estimate.total / P.GiB:.1f}" if req.estimate else "-"
        if not req.fits:
            own += " (does not fit)"
        rec = p141.recommended
        large_cells = (f"{rec.layout.label()} | {rec.estimate.total / P.GiB:.1f}" if rec
                       else "none fits | -")
        rows.append(f"| {name} | {cfg.model.num_parameters() / 1e9:.2f}B | "
                    f"{cfg.train.micro_batch_size} x {cfg.data.max_length} | "
                    f"{req.layout.label()} | {own} | {large_cells} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from probsft_megatron.config import load_config
    from probsft_megatron.errors import ConfigError

    if args.recipes_table:
        print(recipes_table())
        return 0
    if not args.config:
        raise ConfigError("probsft plan needs --config RECIPE (a path or a shipped recipe name) "
                          "or --recipes-table")
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1 (got {args.gpus_per_node})")
    if args.margin_gb < 0:
        raise ConfigError(f"--margin-gb must be >= 0 (got {args.margin_gb})")
    cfg = load_config(args.config, args.overrides)
    if cfg.init.checkpoint is not None:
        try:
            from probsft_megatron.train import read_model_dir_config

            cfg.model = read_model_dir_config(cfg.init.checkpoint)
        except Exception:  # noqa: BLE001 - a missing checkpoint does not stop planning
            print(f"[probsft] note: planning with the recipe's model (cannot read "
                  f"{cfg.init.checkpoint})", file=sys.stderr)
    result = P.plan(cfg, args.gpus, args.gpu_memory, args.gpus_per_node,
                    margin_gib=args.margin_gb)
    rep = report(cfg, result, args.config)
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 0 if result.fits else 1
