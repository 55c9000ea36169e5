"""The Megatron side of conversion: one process, TP=1/PP=1, torch_dist checkpoints; the model is
built uninitialized, so untouched pages cost no host memory until the weights arrive."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from probsft_megatron import compat, cpu_backend, manifest
from probsft_megatron.config import ModelConfig, ParallelConfig
from probsft_megatron.errors import CheckpointError
from probsft_megatron.model import build_gpt_model, transformer_config
from probsft_megatron.model_dir import ModelDir


@contextmanager
def single_process_group() -> Iterator[None]:
    """torch.distributed (gloo, world size 1) and megatron TP=1/PP=1 groups for this block,
    reusing existing ones; CheckpointError inside a multi-process job or another layout."""
    was_active = cpu_backend.is_active()
    cpu_backend.activate()
    own_dist = not dist.is_initialized()
    if own_dist:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    own_groups = False
    try:
        if dist.get_world_size() != 1:
            raise CheckpointError(
                f"checkpoint conversion runs in a single process, not inside a "
                f"{dist.get_world_size()}-process job; convert before launching the job"
            )
        if compat.model_parallel_is_initialized():
            layout = compat.rank_position()
            if (layout.tp, layout.pp) != (1, 1):
                raise CheckpointError(
                    f"checkpoint conversion needs TP=1/PP=1 groups, this "
                    f"process has TP={layout.tp}/PP={layout.pp}"
                )
        else:
            compat.initialize_model_parallel(1, 1)
            own_groups = True
        yield
    finally:
        if own_groups:
            compat.destroy_model_parallel()
        if own_dist:
            dist.destroy_process_group()
        if not was_active:
            cpu_backend.deactivate()


def build_model(model: ModelConfig, dtype: torch.dtype, peft=None):
    """The TP=1/PP=1 model (LoRA linears with ``peft``) in ``dtype``, uninitialized, on the CPU."""
    config = transformer_config(
        model,
        ParallelConfig(),
        params_dtype=dtype,
        perform_initialization=False,
        use_cpu_initialization=True,
        fp16=dtype == torch.float16,
    )
    return build_gpt_model(model, config, pre_process=True, post_process=True, peft=peft)


def parameters(gpt) -> dict[str, torch.Tensor]:
    """The model's parameters by state-dict name (tied output weights appear once)."""
    state = gpt.state_dict(keep_vars=True)
    return {name: p for name, p in state.items() if isinstance(p, torch.Tensor)}


def save_weights(gpt, weights_dir: str | os.PathLike) -> None:
    """Save the model as a torch_dist checkpoint; the model is unusable afterwards. The writer
    copies views into part of a parameter (``linear_fc1``'s halves), so to hold the model once
    they are materialized one parameter at a time and the parameter's storage released."""
    sd, tensors = compat.sharded_tensors(gpt)
    by_storage = {p.untyped_storage().data_ptr(): p for p in gpt.parameters()}
    partial_views = defaultdict(list)
    for sh in tensors:
        if sh.data.untyped_storage().nbytes() != sh.data.numel() * sh.data.element_size():
            partial_views[sh.data.untyped_storage().data_ptr()].append(sh)
    for ptr, views in partial_views.items():
        for sh in views:
            sh.data = sh.data.clone()
        param = by_storage[ptr]
        param.data = torch.empty(0, dtype=param.dtype)
    Path(weights_dir).mkdir(parents=True, exist_ok=True)
    compat.dist_save(sd, str(weights_dir))


def load_weights(gpt, md: ModelDir) -> None:
    """Load a model dir's weights into the model's parameters in place; an unreadable shard
    (damaged in a checkpoint without a manifest) is one line naming the folder and the fix."""
    from probsft_megatron.checkpoint import read_failure

    try:
        sd, _ = compat.sharded_tensors(gpt)
        compat.dist_load(sd, str(md.weights))
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch DCP (a BaseException), pickle and zip errors
        damage = f"its weights cannot be read ({read_failure(exc)})"
        raise CheckpointError(manifest.damaged_message(md.path, damage)) from None
