"""The megatron-core seam: every megatron call that is not model building.

Process groups and ranks, RNG, the pipeline schedule, DDP and the optimizer, tensor-parallel
region functions, distributed checkpointing. Developed against megatron-core 0.16.1 (the
newest for Python 3.11, used on CPU and in CI); GPU clusters run newer releases in NGC
containers. Code elsewhere calls these wrappers instead of reaching into megatron, so a
version bump is a change to this file (and to the modules that subclass megatron's classes:
:mod:`~probsft_megatron.model`, :mod:`~probsft_megatron.attention`,
:mod:`~probsft_megatron.fused_head`). ``tests/test_architecture.py`` enforces that no other
module imports megatron.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from probsft_megatron import cpu_backend
from probsft_megatron.errors import CheckpointError
from probsft_megatron.hardware import te_available  # noqa: F401  (re-exported)


def megatron_version() -> str:
    """The installed megatron-core version (what the version-dependent choices test)."""
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# -- process groups ----------------------------------------------------------------------------


def initialize_model_parallel(tp: int, pp: int, timeout_s: float | None = None) -> None:
    """megatron's groups; ``timeout_s``: their collectives' timeout (megatron's default, 30
    minutes, when None)."""
    from megatron.core import parallel_state

    timeout = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **timeout
    )


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def model_parallel_is_initialized() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


@dataclass(frozen=True)
class RankPosition:
    """This rank's place in megatron's groups: sizes and ranks of TP, PP and DP."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def rank_position() -> RankPosition:
    """Sizes and ranks of this process in the current model-parallel groups."""
    from megatron.core import parallel_state as ps

    return RankPosition(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def is_pipeline_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


# -- RNG ---------------------------------------------------------------------------------------


def seed_model_parallel(seed: int) -> None:
    """Seed torch and megatron's model-parallel RNG tracker.

    Without CUDA the tracker is the "inference" one, which needs no CUDA RNG state.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    fn = tensor_parallel.model_parallel_cuda_manual_seed
    kwargs: dict[str, Any] = {}
    if not cpu_backend.cuda_available():
        for name in ("inference_rng_tracker", "force_reset_rng"):
            if _accepts(fn, name):
                kwargs[name] = True
    fn(seed, **kwargs)


def model_parallel_rng():
    """Context manager: draw from megatron's model-parallel RNG stream (e.g. for dropout)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().fork()


def rng_tracker_states() -> dict:
    """The model-parallel RNG tracker's states (saved with a training checkpoint)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_tracker_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(states)


# -- tensor-parallel regions (what megatron's ColumnParallelLinear does to its input) ----------


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` backward."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the first dimension forward, reduce-scatter of the gradient backward."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region as gather

    return gather(x, group=group)


# -- the step: schedule, DDP, optimizer ---------------------------------------------------------


def get_forward_backward_func() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func as _get

    return _get()


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron's ``PackedSeqParams`` of one packed row (``thd``; the same boundaries for
    queries and keys): what attention and rotary embeddings read to restart per sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def wrap_ddp(
    model: torch.nn.Module,
    config,
    *,
    use_distributed_optimizer: bool,
    grad_reduce_in_fp32: bool = True,
    bucket_size: int | None = None,
):
    """megatron DDP around one model chunk (contiguous grad buffers, DP grad reduction);
    ``grad_reduce_in_fp32``: float32 gradient buffers and reduction for bf16 parameters."""
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


def build_optimizer(model_chunks: list, optim, *, use_distributed_optimizer: bool, bf16: bool):
    """megatron's Adam(W) optimizer (plain or distributed) with built-in grad clipping, from
    an :class:`~probsft_megatron.config.OptimConfig` (its learning rate is the start value;
    the training loop sets the scheduled rate every step)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, model_chunks)


def finalize_model_grads_func() -> Callable:
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads


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


def restore_adam_steps(optimizer, step: int) -> int:
    """After loading a training checkpoint of ``step``: set every parameter's Adam ``step``
    (torch Adam's per-parameter state, used by its bias correction) to ``step``, each in a
    tensor of its own. Returns how many parameters' states were set.

    Without apex/TE, megatron-core 0.16's distributed optimizer does not bring the saved
    ``step`` back: after the load every parameter's state holds one and the same tensor with
    the value of the state it was loaded into (1, see :func:`_materialize_optimizer_state`),
    and since torch's Adam increments each parameter's ``step`` in place, that shared tensor
    then advanced once per parameter on every update. A resumed run drifted from an
    uninterrupted one from its first update on. In this project's loop every training step is
    exactly one optimizer update (no fp16 loss scaling skips one; a non-finite step stops the
    run), so the training step of the checkpoint is the optimizer's step count.
    """
    count = 0
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            old = state.get("step")
            if torch.is_tensor(old):
                state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device)
                count += 1
    return count


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
        model_sharded_state_dict,
        is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": sharding},
    )


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
        if not isinstance(
            sub, DistributedOptimizer
        ) or "_set_main_param_and_optimizer_states" in vars(sub):
            continue
        original = sub._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _sub=sub, _original=original):
            group_index, group_order = _sub.model_param_group_index_map[model_param]
            main_param = _sub.optimizer.param_groups[group_index]["params"][group_order]
            current = _sub.optimizer.state[main_param]
            _original(
                model_param, {**{k: v for k, v in current.items() if k not in tensors}, **tensors}
            )

        sub._set_main_param_and_optimizer_states = set_states


# -- distributed checkpointing -----------------------------------------------------------------


def dist_save(sharded_state_dict, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, ckpt_dir)


def dist_load(sharded_state_dict, ckpt_dir: str):
    """Load a torch_dist checkpoint into ``sharded_state_dict``'s layout; a checkpoint that
    does not fit (names or shapes) is a one-line CheckpointError."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        return dist_checkpointing.load(sharded_state_dict, ckpt_dir)
    except CheckpointingException as exc:
        raise CheckpointError(
            f"{ckpt_dir} does not fit the model: {str(exc).splitlines()[0]}"
        ) from None


def sharded_tensors(model) -> tuple[dict, list]:
    """A model's sharded state dict with factories applied, and its ShardedTensors."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return sd, [x for x in nested_values(sd) if isinstance(x, ShardedTensor)]


def checkpoint_tensor_dtype(ckpt_dir: str, key: str) -> torch.dtype:
    """The dtype of tensor ``key`` stored in a torch_dist checkpoint (metadata only)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)[key].dtype


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

    return type(
        cls.__name__,
        (cls,),
        {
            "__init__": __init__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        },
    )
