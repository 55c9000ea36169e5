"""What ``probsft plan`` shows: the plan as JSON-ready data, as text tables, and the recipes
and LoRA tables of docs/training.md and docs/lora.md."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from probsft_megatron.config import list_recipes, load_config
from probsft_megatron.plan.activations import loss_head
from probsft_megatron.plan.estimate import PARTS, estimate, estimate_stage
from probsft_megatron.plan.layout import GiB, Layout, Workload
from probsft_megatron.plan.search import NO_FIT_HINT, Candidate, Plan, plan, workload_of
from probsft_megatron.plan.static import lora_parameters

if TYPE_CHECKING:
    from probsft_megatron.config import TrainJobConfig

NODE_RECIPE_MIN_PARAMS = 1.0e9
"""Recipes whose model has at least this many parameters ship a layout for one 8-GPU node."""
NODE_GPUS = 8
NODE_MEMORIES_GB = (80.0, 141.0)


def _gib(n: int | float) -> float:
    return round(n / GiB, 2)


def _candidate_json(c: Candidate | None) -> dict | None:
    if c is None:
        return None
    out = {
        "layout": dataclasses.asdict(c.layout),
        "label": c.layout.label(),
        "overrides": c.layout.overrides(),
        "fits": c.fits,
        "reason": c.reason,
    }
    if c.estimate is not None:
        out["per_gpu_gib"] = {k: round(v, 2) for k, v in c.estimate.parts().items()}
        out["worst_stage"] = c.estimate.worst.pp_rank
        out["stages"] = [
            dict(pp_rank=s.pp_rank, total_gib=_gib(s.total), in_flight_micro_batches=s.in_flight)
            for s in c.estimate.stages
        ]
    return out


def alternatives(model, layout: Layout, workload: Workload) -> dict:
    """The worst stage's optimizer state with and without the distributed optimizer,
    activations with and without SP per recompute setting, and both loss heads (GiB)."""
    worst = estimate(model, layout, workload).worst
    other = dataclasses.replace(layout, distributed_optimizer=not layout.distributed_optimizer)
    pair = (worst.static, estimate_stage(model, other, workload, worst.pp_rank).static)
    with_dist, without = pair if layout.distributed_optimizer else pair[::-1]
    fields = ("recompute", "recompute_method", "recompute_num_layers")
    recomputes = {
        "none": ("none", None, None),
        "selective": ("selective", None, None),
        "full_uniform_1": ("full", "uniform", 1),
    }
    acts = {}
    for sp in [False, True] if layout.tp > 1 else [False]:
        row = {}
        for name, values in recomputes.items():
            other = dataclasses.replace(layout, sequence_parallel=sp, **dict(zip(fields, values)))
            row[name] = _gib(estimate_stage(model, other, workload, worst.pp_rank).activations)
        acts["sp" if sp else "no_sp"] = row
    head = loss_head(model, layout, workload)
    both = {"distributed": with_dist, "not_distributed": without}
    return {
        "stage": worst.pp_rank,
        "optimizer_state_gib": {k: _gib(static.optimizer) for k, static in both.items()},
        "weights_gib": {k: _gib(static.weights) for k, static in both.items()},
        "activations_gib": acts,
        "loss_head_gib": {
            "unfused": _gib(head.unfused_peak),
            f"fused_chunk_{workload.chunk_size}": _gib(head.fused_peak),
        },
    }


def plan_report(cfg: TrainJobConfig, result: Plan, name: str | None) -> dict:
    """The plan of ``cfg`` as data (what ``probsft plan --json`` prints)."""
    model, work = cfg.model, workload_of(cfg)
    out = {
        "config": name,
        "gpus": result.gpus,
        "gpus_per_node": result.gpus_per_node,
        "gpu_memory_gib": result.gpu_memory_gb,
        "model": {
            "arch": model.arch,
            "layers": model.num_layers,
            "hidden": model.hidden_size,
            "parameters": model.num_parameters(),
        },
        "workload": dataclasses.asdict(work),
        "requested": _candidate_json(result.requested),
        "recommended": _candidate_json(result.recommended),
        "rejected": [{"label": c.layout.label(), "reason": c.reason} for c in result.rejected],
    }
    if result.requested.estimate is not None:
        out["alternatives"] = alternatives(model, result.requested.layout, work)
    return out


def _parts_table(columns: dict[str, dict | None]) -> str:
    names = [k for k, v in columns.items() if v and v.get("per_gpu_gib")]
    width = max(len(label) for _, label, _ in PARTS)
    col = max([12] + [len(n) for n in names])
    lines = ["GiB per GPU".ljust(width) + "".join(n.rjust(col + 2) for n in names)]
    for key, label, _ in PARTS:
        lines.append(
            label.ljust(width)
            + "".join(f"{columns[n]['per_gpu_gib'][key]:.1f}".rjust(col + 2) for n in names)
        )
    return "\n".join(lines)


def render_plan(rep: dict) -> str:
    """:func:`plan_report`'s data as the text ``probsft plan`` prints."""
    m, w = rep["model"], rep["workload"]
    req, rec = rep["requested"], rep["recommended"]
    switch = rec is not None and rec["label"] != req["label"]
    lines = [
        f"{rep['config'] or 'config'}: {m['arch']} {m['layers']} layers, "
        f"{m['parameters'] / 1e9:.2f}B parameters; micro batch {w['micro_batch_size']} x "
        f"{w['seq_length']} tokens, {w['params_dtype']}, {w['loss_implementation']} loss head; "
        f"{rep['gpus']} GPU(s) of {rep['gpu_memory_gib']:g} GiB, {rep['gpus_per_node']} per node",
        "",
    ]
    verdict = (
        f"fits ({req['per_gpu_gib']['total']:.1f} GiB)"
        if req["fits"]
        else f"does not fit ({req['reason']})"
    )
    lines.append(f"requested    {req['label']}: {verdict}")
    if rec is None:
        lines.append(f"recommended  none: no layout fits on these GPUs ({NO_FIT_HINT})")
    else:
        lines.append(f"recommended  {rec['label']}: {rec['per_gpu_gib']['total']:.1f} GiB")
    lines.append("")
    cols = {"requested": req, **({"recommended": rec} if switch else {})}
    if any(c.get("per_gpu_gib") for c in cols.values()):
        lines += [_parts_table(cols), ""]
    alt = rep.get("alternatives")
    if alt:
        lines.append(f"the requested layout, stage {alt['stage']} (GiB per GPU):")
        o, wt = alt["optimizer_state_gib"], alt["weights_gib"]
        lines.append(
            f"  optimizer state: {o['distributed']:.2f} with the distributed optimizer, "
            f"{o['not_distributed']:.2f} without (weights {wt['distributed']:.2f} / "
            f"{wt['not_distributed']:.2f})"
        )
        lines.append("  activations:      recompute none / selective / full (uniform, 1 layer)")
        for key, row in alt["activations_gib"].items():
            label = "with SP" if key == "sp" else "without SP"
            lines.append(f"    {label:<14}  " + " / ".join(f"{v:.2f}" for v in row.values()))
        heads = alt["loss_head_gib"].items()
        lines.append(
            "  loss head (last stage): "
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in heads)
        )
        lines.append("")
    if rep["rejected"] and rec is not None:
        lines.append("cheaper layouts that do not fit:")
        lines += [f"  {r['label']}: {r['reason']}" for r in rep["rejected"]]
        lines.append("")
    if switch:
        lines.append("to use the recommended layout: " + " ".join(rec["overrides"]))
    return "\n".join(lines).rstrip()


def node_recipes() -> list[str]:
    """Shipped recipes whose model has >= 1B parameters (the ones that need a node)."""
    return [
        name
        for name in list_recipes()
        if load_config(name).model.num_parameters() >= NODE_RECIPE_MIN_PARAMS
    ]


def recipes_table() -> str:
    """Markdown: each node recipe's own layout and estimate on 8 x 80 GB, and the planner's
    recommendation on 8 x 141 GB."""
    small, large = NODE_MEMORIES_GB
    rows = [
        "| recipe | parameters | micro batch x tokens | layout (8 x 80 GB) | GiB per GPU | "
        "layout on 8 x 141 GB | GiB per GPU |",
        "|---|---|---|---|---:|---|---:|",
    ]
    for name in node_recipes():
        cfg = load_config(name)
        req = plan(cfg, NODE_GPUS, small).requested
        own = f"{req.estimate.total / GiB:.1f}" if req.estimate else "-"
        if not req.fits:
            own += " (does not fit)"
        rec = plan(cfg, NODE_GPUS, large).recommended
        large_cells = (
            f"{rec.layout.label()} | {rec.estimate.total / GiB:.1f}" if rec else "none fits | -"
        )
        rows.append(
            f"| {name} | {cfg.model.num_parameters() / 1e9:.2f}B | "
            f"{cfg.train.micro_batch_size} x {cfg.data.max_length} | "
            f"{req.layout.label()} | {own} | {large_cells} |"
        )
    return "\n".join(rows)


def _one_gpu_cell(result: Plan) -> str:
    """Whether the cheapest layout on one GPU fits: its GiB, or the least any layout needs."""
    if result.recommended is not None:
        return f"yes, {result.recommended.estimate.total / GiB:.1f}"
    needs = [c.estimate.total for c in result.rejected if c.estimate is not None]
    return f"no ({min(needs) / GiB:.1f} needed)" if needs else "no"


def lora_table(rank: int = 16, gpu_memory_gb: float = NODE_MEMORIES_GB[0]) -> str:
    """Markdown: full fine-tuning vs LoRA (``rank``, all four linears) per node recipe: GiB per
    GPU at its own layout on one node, and whether one GPU of ``gpu_memory_gb`` holds it."""
    rows = [
        f"| recipe | parameters | full, own layout (8 x {gpu_memory_gb:g} GB) | LoRA r={rank} | "
        f"full on 1 x {gpu_memory_gb:g} GB | LoRA r={rank} on 1 x {gpu_memory_gb:g} GB | "
        "trainable (LoRA) |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    lora_keys = ["peft.method=lora", f"peft.rank={rank}"]
    single = Layout().overrides()[:3]  # TP=1, PP=1, no sequence parallelism
    for name in node_recipes():
        cfg = load_config(name)
        lora = load_config(name, lora_keys)
        reqs = [plan(c, NODE_GPUS, gpu_memory_gb).requested for c in (cfg, lora)]
        cells = [f"{r.estimate.total / GiB:.1f}" if r.estimate else "-" for r in reqs]
        one = [
            _one_gpu_cell(plan(load_config(name, [*single, *extra]), 1, gpu_memory_gb))
            for extra in ([], lora_keys)
        ]
        adapters = sum(p.numel for p in lora_parameters(cfg.model, Layout(), workload_of(lora)))
        rows.append(
            f"| {name} | {cfg.model.num_parameters() / 1e9:.2f}B | {cells[0]} | {cells[1]} | "
            f"{one[0]} | {one[1]} | {adapters / 1e6:.1f}M |"
        )
    return "\n".join(rows)
