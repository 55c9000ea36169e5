"""Will it fit? Per-GPU memory of a training job, and the cheapest layout that fits: the
parameters counted on the real model built on the meta device, the rest arithmetic (what is
counted, how it is checked and how the layout is chosen: docs/training.md)."""

from __future__ import annotations

from probsft_megatron.plan.activations import layer_activations, loss_head, recompute_terms
from probsft_megatron.plan.estimate import DEFAULT_MARGIN_GIB, FRAGMENTATION, estimate
from probsft_megatron.plan.layout import Layout, Workload
from probsft_megatron.plan.present import (
    lora_table,
    node_recipes,
    plan_report,
    recipes_table,
    render_plan,
)
from probsft_megatron.plan.search import (
    DEFAULT_GPU_MEMORY_GB,
    DEFAULT_GPUS_PER_NODE,
    OVERRIDE_FLAG,
    candidate_layouts,
    check_fits,
    evaluate,
    layout_of,
    plan,
    workload_of,
)
from probsft_megatron.plan.static import Param, grad_buffer, stage_parameters, static_memory

__all__ = [
    "DEFAULT_GPUS_PER_NODE",
    "DEFAULT_GPU_MEMORY_GB",
    "DEFAULT_MARGIN_GIB",
    "FRAGMENTATION",
    "OVERRIDE_FLAG",
    "Layout",
    "Param",
    "Workload",
    "candidate_layouts",
    "check_fits",
    "estimate",
    "evaluate",
    "grad_buffer",
    "layer_activations",
    "layout_of",
    "loss_head",
    "lora_table",
    "node_recipes",
    "plan",
    "plan_report",
    "recipes_table",
    "recompute_terms",
    "render_plan",
    "stage_parameters",
    "static_memory",
    "workload_of",
]
