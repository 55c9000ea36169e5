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


def te_available() -> bool:
    """Whether Transformer Engine imports (never installed on CPU machines: its CPU wheel
    raises RuntimeError on import, which is caught here too)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or the CPU wheel's RuntimeError
        return False
    return True


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
        # off: the fused loss head adds the output weight's gradient to main_grad itself and
        # leaves no .grad, which DDP's overlapped reduction would wait for
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


def _materialize_optimizer_state(optimizer) -> None:
    """Give a never-stepped distributed optimizer a state to load into.

    Without apex/TE, megatron's DistributedOptimizer.state_dict() (called while building the
    sharded state dict for loading) needs Adam's per-parameter state including ``step``.
    One step on zero gradients with the learning rate at 0 creates it and changes no weight;
    the loaded checkpoint then overwrites it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(sub, DistributedOptimizer) or inner is None or len(inner.state):
            continue
        saved_lr = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, lr in zip(inner.param_groups, saved_lr):
            group["lr"] = lr


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict, *, is_loading: bool):
    """The optimizer's sharded state for a torch_dist checkpoint.

    The distributed optimizer uses ``dp_reshardable`` (its buffers as saved, resumable at the
    same TP/PP with any DP size): in 0.16 without apex/TE it is the format that round-trips,
    because ``fully_reshardable`` drops torch Adam's per-parameter ``step`` on save and
    ``fully_sharded_model_space`` builds flattened ShardedTensors that the torch_dist
    strategy rejects. Before 0.16 the state is gathered on DP rank 0 instead
    (``dp_zero_gather_scatter``, also resumable with any DP size; see
    :func:`distrib_optim_sharding_type`). Model weights always reshard freely. The plain
    optimizer ignores the metadata.
    """
    sharding = distrib_optim_sharding_type()
    if is_loading:
        _materialize_optimizer_state(optimizer)
        if sharding == "dp_zero_gather_scatter":
            _keep_unsaved_state_on_dp_zero_load(optimizer)
    return optimizer.sharded_state_dict(
        model_sharded_state_dict, is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": sharding})


def distrib_optim_sharding_type() -> str:
    """The distributed optimizer's checkpoint format: ``dp_reshardable`` from megatron-core
    0.16 on, else ``dp_zero_gather_scatter``. Without apex/TE, torch Adam keeps a scalar
    ``step`` per parameter, which 0.15's ``dp_reshardable`` and 0.14's
    ``fully_sharded_bucket_space`` reject (shape assertion; 0.16 skips it), and 0.14 has no
    ``dp_reshardable`` at all (its ``fully_sharded_model_space`` fails on numpy 2)."""
    from packaging.version import Version

    if Version(megatron_version()) >= Version("0.16.0"):
        return "dp_reshardable"
    return "dp_zero_gather_scatter"


def _keep_unsaved_state_on_dp_zero_load(optimizer) -> None:
    """0.14, ``dp_zero_gather_scatter`` load without apex/TE: the checkpoint holds ``param``,
    ``exp_avg`` and ``exp_avg_sq`` per parameter, while megatron copies *every* key of torch
    Adam's state into place, including ``step`` (restored from the param groups just before),
    and fails with KeyError. Keys the checkpoint does not have keep their current value."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or \
                "_set_main_param_and_optimizer_states" in vars(sub):
            continue
        original = sub._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _sub=sub, _original=original):
            group_index, group_order = _sub.model_param_group_index_map[model_param]
            main_param = _sub.optimizer.param_groups[group_index]["params"][group_order]
            current = _sub.optimizer.state[main_param]
            _original(model_param, {**{k: v for k, v in current.items() if k not in tensors},
                                    **tensors})

        sub._set_main_param_and_optimizer_states = set_states


def dist_save(sharded_state_dict, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, ckpt_dir)


def dist_load(sharded_state_dict, ckpt_dir: str):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, ckpt_dir)


def core_attention_module(cls: type) -> type:
    """``cls`` (a core-attention module written for 0.15+, taking ``pg_collection``) in the
    form megatron's layer spec instantiates on the installed version.

    megatron-core 0.14 passes the process groups to core attention as ``model_comm_pgs``
    (0.15 renamed it ``pg_collection``); there a subclass takes the old keyword and hands it
    on under the new name. On 0.15+ ``cls`` itself is returned.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if not _accepts(DotProductAttention.__init__, "model_comm_pgs"):
        return cls

    def __init__(self, *args, model_comm_pgs=None, **kwargs):
        cls.__init__(self, *args, pg_collection=model_comm_pgs, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__})
