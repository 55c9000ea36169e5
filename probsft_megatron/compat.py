"""Every megatron-core call whose signature or location differs between versions.

Developed against megatron-core 0.16.1 (the newest for Python 3.11, used on CPU and in CI);
GPU clusters run 0.19+ in NGC containers. Code elsewhere calls these wrappers instead of
reaching into megatron directly, so a version bump is a change to this file only.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from probsft_megatron import platform


def megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def initialize_model_parallel(tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def seed_model_parallel(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker.

    Without CUDA the tracker is the "inference" one, which needs no CUDA RNG state.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    fn = tensor_parallel.model_parallel_cuda_manual_seed
    kwargs: dict[str, Any] = {}
    if not platform.cuda_available():
        for name in ("inference_rng_tracker", "force_reset_rng"):
            if _accepts(fn, name):
                kwargs[name] = True
    fn(seed, **kwargs)


def get_forward_backward_func() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func as _get

    return _get()


def wrap_ddp(model: torch.nn.Module, config, *, use_distributed_optimizer: bool,
             grad_reduce_in_fp32: bool = True, bucket_size: int | None = None):
    """megatron DDP around one model chunk (contiguous grad buffers, DP grad reduction)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, *, lr: float, min_lr: float = 0.0, weight_decay: float,
                    adam_beta1: float, adam_beta2: float, adam_eps: float, clip_grad: float,
                    use_distributed_optimizer: bool, bf16: bool):
    """megatron's Adam(W) optimizer (plain or distributed) with built-in grad clipping."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, model_chunks)


def finalize_model_grads_func() -> Callable:
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(logits, target)


def model_config_of(model: Any):
    from megatron.core.utils import get_model_config

    return get_model_config(model)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict, *, is_loading: bool):
    """The optimizer's sharded state in a layout that reshards over TP, PP and DP on load.

    ``fully_reshardable`` is the distributed optimizer's canonical (per-parameter) format in
    0.16 and later; the plain optimizer ignores the metadata.
    """
    return optimizer.sharded_state_dict(
        model_sharded_state_dict, is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": "fully_reshardable"})


def dist_save(sharded_state_dict, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, ckpt_dir)


def dist_load(sharded_state_dict, ckpt_dir: str):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, ckpt_dir)
