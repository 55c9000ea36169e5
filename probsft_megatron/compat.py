"""The megatron-core seam: every megatron call that is not model building, and every difference
between the releases it supports (0.14-0.17; developed against 0.16.1, the newest for Python
3.11). Only this module, the model modules and ``cpu_backend`` import megatron."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from probsft_megatron import cpu_backend
from probsft_megatron.errors import CheckpointError


def megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def initialize_model_parallel(tp: int, pp: int, timeout_s: float | None = None) -> None:
    """megatron's groups; ``timeout_s``: their collectives' timeout (None: megatron's 30 min)."""
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
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def rank_position() -> RankPosition:
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


def seed_model_parallel(seed: int) -> None:
    """Seed torch and megatron's RNG tracker (without CUDA the "inference" one: no CUDA RNG)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    fn = tensor_parallel.model_parallel_cuda_manual_seed
    names = () if cpu_backend.cuda_available() else ("inference_rng_tracker", "force_reset_rng")
    fn(seed, **{name: True for name in names if _accepts(fn, name)})


def rng_tracker_states() -> dict:
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_tracker_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(states)


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over ``group`` backward."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the first dimension forward, reduce-scatter of the gradient backward."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region as gather

    return gather(x, group=group)


def get_forward_backward_func() -> Callable:
    from megatron.core.pipeline_parallel import get_forward_backward_func as _get

    return _get()


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron's ``PackedSeqParams`` of one packed ``thd`` row (same bounds for q and kv)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, n = cu_seqlens.to(torch.int32), int(max_seqlen)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n
    )


def wrap_ddp(
    model: torch.nn.Module,
    config,
    *,
    use_distributed_optimizer: bool,
    grad_reduce_in_fp32: bool = True,
    bucket_size: int | None = None,
):
    """megatron DDP around one model chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        # off: the fused head fills main_grad itself and leaves no .grad for overlap to await
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, optim, *, use_distributed_optimizer: bool, bf16: bool):
    """megatron's Adam(W) optimizer (plain or distributed, with clipping) from an OptimConfig."""
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
    """Give a never-stepped distributed optimizer a state to load into: without apex/TE its
    ``state_dict()`` needs Adam's state; one step at lr 0 on zero gradients creates it."""
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
    """Set every parameter's Adam ``step`` to ``step``, each in its own tensor; returns how many.

    Without apex/TE, 0.16's distributed optimizer loads one shared ``step`` tensor (value 1)
    that torch's Adam then advances once per parameter, so a resumed run drifted. Every
    training step is one optimizer update, so the checkpoint's step is the step count."""
    states = [
        state
        for sub in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in getattr(getattr(sub, "optimizer", None), "state", {}).values()
        if torch.is_tensor(state.get("step"))
    ]
    for state in states:
        old = state["step"]
        state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device)
    return len(states)


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict, *, is_loading: bool):
    """The optimizer's sharded state for a torch_dist checkpoint, in the format of
    :func:`distrib_optim_sharding_type` (the plain optimizer ignores it)."""
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
    """The distributed optimizer's checkpoint format, resumable with any DP size.

    ``dp_reshardable`` from 0.16 on (``fully_reshardable`` drops Adam's ``step`` there); before,
    ``dp_zero_gather_scatter``: without apex/TE the scalar ``step`` per parameter fails 0.15's
    ``dp_reshardable`` and 0.14's other formats (0.14 has no ``dp_reshardable``)."""
    from packaging.version import Version

    new = Version(megatron_version()) >= Version("0.16.0")
    return "dp_reshardable" if new else "dp_zero_gather_scatter"


def _keep_unsaved_state_on_dp_zero_load(optimizer) -> None:
    """0.14 without apex/TE copies every key of Adam's state from a ``dp_zero_gather_scatter``
    checkpoint, ``step`` included, which it lacks (KeyError): missing keys keep their value."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        name = "_set_main_param_and_optimizer_states"
        if not isinstance(sub, DistributedOptimizer) or name in vars(sub):  # or patched already
            continue
        original = sub._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _sub=sub, _original=original):
            group_index, group_order = _sub.model_param_group_index_map[model_param]
            main_param = _sub.optimizer.param_groups[group_index]["params"][group_order]
            current = _sub.optimizer.state[main_param]
            _original(model_param, {**current, **tensors})

        sub._set_main_param_and_optimizer_states = set_states


def dist_save(sharded_state_dict, ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, ckpt_dir)


def dist_load(sharded_state_dict, ckpt_dir: str):
    """Load a torch_dist checkpoint into this layout; a misfit is a one-line CheckpointError."""
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
    """``cls`` (a core attention taking 0.15's ``pg_collection``), or on 0.14 a subclass that
    takes that release's ``model_comm_pgs`` and hands it on under the new name."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if not _accepts(DotProductAttention.__init__, "model_comm_pgs"):
        return cls

    def __init__(self, *args, model_comm_pgs=None, **kwargs):
        cls.__init__(self, *args, pg_collection=model_comm_pgs, **kwargs)

    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), {"__init__": __init__, **names})
