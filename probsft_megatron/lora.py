"""LoRA adapters on megatron-core's tensor-parallel linears: ``y = W x + (alpha / r) B A x``.

The target linears are built as subclasses of megatron's column-/row-parallel linears through
the layer spec (base weight and checkpoint keys unchanged), sharded like their base layer; the
tensor-parallel contract is in docs/lora.md. ``B`` starts at zero, as in PEFT."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from probsft_megatron import compat
from probsft_megatron.config import LORA_TARGETS, PeftConfig
from probsft_megatron.errors import CheckpointError, ConfigError

ADAPTER_SUFFIXES = ("lora_A", "lora_B")
COLUMN_TARGETS = ("linear_qkv", "linear_fc1")


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_SUFFIXES


def _tp_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _LoRAMixin:
    """What both LoRA linears share: the adapter tensors and their scaling."""

    def _add_adapters(self, peft: PeftConfig, target: str, column: bool) -> None:
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        r = int(peft.rank)
        if column:  # B is split along out (dim 0) like W
            a_shape, b_shape = (r, self.input_size), (self.output_size_per_partition, r)
        else:  # A is split along in (dim 1) like W
            a_shape, b_shape = (r, self.input_size_per_partition), (self.output_size, r)
        dtype, device = self.config.params_dtype, self.weight.device
        self.lora_rank = r
        self.lora_scaling = float(peft.alpha) / float(peft.rank)
        self.lora_dropout = float(peft.dropout)
        # the gated fc1 holds cat(gate_shard, up_shard) per rank; B's checkpoint follows
        self.lora_glu = column and target == "linear_fc1" and bool(self.config.gated_linear_unit)
        self.lora_A = torch.nn.Parameter(torch.zeros(*a_shape, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(*b_shape, dtype=dtype, device=device))
        sharded, dim = (self.lora_B, 0) if column else (self.lora_A, 1)
        set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=dim, stride=1)
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_dropout > 0.0:
            return torch.nn.functional.dropout(x, p=self.lora_dropout, training=self.training)
        return x

    def _with_adapter(self, sd: dict, name: str, dim: int, prefix: str, offsets) -> dict:
        """``sd`` plus the TP-split adapter ``name`` (split along ``dim``, gated fc1 in halves)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        part = make_sharded_tensors_for_checkpoint(
            {name: getattr(self, name)}, prefix, {name: dim}, offsets
        )
        if self.lora_glu:
            part = {k: apply_swiglu_sharded_factory(v, offsets) for k, v in part.items()}
        return sd | part


@functools.cache
def _lora_classes() -> tuple[type, type]:
    """The column- and the row-parallel LoRA linear (built once, megatron imported lazily)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
        """``A`` ``[r, in]`` replicated over TP, ``B`` ``[out/TP, r]``; returns this rank's
        output shard of ``W x + s B A x``."""

        def __init__(self, *args, peft: PeftConfig, lora_target: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._add_adapters(peft, lora_target, column=True)
            if self.sequence_parallel:
                self.lora_A.sequence_parallel = True

        def _forward_impl(self, input, weight, *args, **kwargs):
            out = super()._forward_impl(input, weight, *args, **kwargs)
            if weight is not self.weight:  # not this layer's own weight (never in the spec)
                return out
            ax = torch.matmul(self._dropped(input), self.lora_A.t())
            group = kwargs.get("tp_group")
            group = self.tp_group if group is None else group
            if kwargs.get("sequence_parallel"):
                ax = compat.gather_from_sequence_parallel_region(ax, group)
            elif kwargs.get("allreduce_dgrad"):
                ax = compat.copy_to_tensor_parallel_region(ax, group)
            return out + self.lora_scaling * torch.matmul(ax, self.lora_B.t())

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            return self._with_adapter(sd, "lora_B", 0, prefix, sharded_offsets)

    class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
        """``A`` ``[r, in/TP]``, ``B`` ``[out, r]`` replicated; the adapter's partial output
        joins the base layer's before megatron's TP reduction."""

        def __init__(self, *args, peft: PeftConfig, lora_target: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._add_adapters(peft, lora_target, column=False)

        def _forward_impl(self, input, weight, *args, **kwargs):
            out = super()._forward_impl(input, weight, *args, **kwargs)
            b = self.lora_B
            if _tp_rank_size(self.tp_group)[1] > 1:
                b = compat.copy_to_tensor_parallel_region(b, self.tp_group)
            ax = torch.matmul(self._dropped(input), self.lora_A.t())
            return out + self.lora_scaling * torch.matmul(ax, b.t())

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            return self._with_adapter(sd, "lora_A", 1, prefix, sharded_offsets)

    return LoRAColumnParallelLinear, LoRARowParallelLinear


def lora_layer_spec(spec, peft: PeftConfig):
    """A local-spec layer ``spec`` with the target linears built as LoRA linears (in place)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    attn = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp.submodules
    holders = {"linear_qkv": attn, "linear_proj": attn, "linear_fc1": mlp, "linear_fc2": mlp}
    for target in peft.target_modules:
        holder = holders[target]
        current = getattr(holder, target)
        column = target in COLUMN_TARGETS
        if current is not (ColumnParallelLinear if column else RowParallelLinear):
            raise ConfigError(
                f"peft.method=lora adapts megatron's local linears, but {target} is "
                f"{getattr(current, '__name__', current)} here (Transformer Engine layers); "
                "use train.attention=sdpa or local"
            )
        module = _lora_classes()[0 if column else 1]
        lora = ModuleSpec(module=module, params={"peft": peft, "lora_target": target})
        setattr(holder, target, lora)
    return spec


def adapter_modules(model) -> list[tuple[int, str, Any]]:
    """``(global layer number, target, module)`` of every LoRA linear of a model chunk."""
    return [
        (int(module.layer_number), target, sub)
        for module in model.modules()
        if getattr(module, "layer_number", None) is not None and hasattr(module, "self_attention")
        for holder in (module.self_attention, module.mlp)
        for target in LORA_TARGETS
        if hasattr(sub := getattr(holder, target, None), "lora_A")
    ]


def _shard(full: torch.Tensor, dim: int, rank: int, size: int, glu: bool) -> torch.Tensor:
    if size == 1:
        return full
    if glu:
        return torch.cat([_shard(h, dim, rank, size, False) for h in full.chunk(2, dim=dim)], dim)
    return full.chunk(size, dim=dim)[rank]


@torch.no_grad()
def init_adapters(model, seed: int = 0, b_std: float = 0.0) -> None:
    """(Re)initialize every adapter independently of the layout: the full ``A`` (PEFT's
    Kaiming-uniform) and ``B`` (zeros, or normal with ``b_std``) drawn from ``seed``, the layer
    and the target; each TP rank keeps its shard."""
    for number, target, module in adapter_modules(model):
        rank, size = _tp_rank_size(module.tp_group)
        g = torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + number * 16 + LORA_TARGETS.index(target)) % (2**63)
        )
        r, n_in, n_out = module.lora_rank, module.input_size, module.output_size
        a = (torch.rand(r, n_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(n_in)
        b = torch.zeros(n_out, r, dtype=torch.float64)
        if b_std > 0:
            b = torch.randn(n_out, r, generator=g, dtype=torch.float64) * b_std
        if target in COLUMN_TARGETS:
            b = _shard(b, 0, rank, size, module.lora_glu)
        else:
            a = _shard(a, 1, rank, size, False)
        module.lora_A.copy_(a.to(module.lora_A.dtype))
        module.lora_B.copy_(b.to(module.lora_B.dtype))


def prepare_model(model, peft: PeftConfig, seed: int = 0) -> None:
    """Initialize the adapters and freeze everything else (before DDP sees the model)."""
    if not adapter_modules(model):
        raise ConfigError(
            "peft.method=lora but the model has no LoRA linears; build it with "
            "model.build_gpt_model(..., peft=...)"
        )
    init_adapters(model, seed)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def adapter_sharded_state_dict(sharded_state_dict: dict) -> dict:
    return {k: v for k, v in sharded_state_dict.items() if is_adapter(k)}


def has_adapters(model) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def load_adapter_state(model, state: dict) -> None:
    """Load a LoRA checkpoint's adapter tensors (all of this chunk's, nothing else)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if is_adapter(k)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's adapters do not fit this model (missing {missing[:1]}, "
            f"unexpected {unexpected[:1]}); resume with the run's own peft settings"
        )


def load_base_weights(model, ckpt_dir: str) -> None:
    """Load a base model's torch_dist weights into a LoRA model (collective; adapters kept)."""
    sd = {k: v for k, v in model.sharded_state_dict().items() if not is_adapter(k)}
    result = model.load_state_dict(compat.dist_load(sd, ckpt_dir), strict=False)
    missing = [k for k in result.missing_keys if not is_adapter(k)]
    if missing:
        raise CheckpointError(
            f"{ckpt_dir} lacks base weights {missing[0]} (and {len(missing) - 1} more); "
            "point init.checkpoint to a converted model of this architecture"
        )


FINGERPRINT_FILE = "peft.json"  # the base model's fingerprint beside a LoRA checkpoint


def base_fingerprint(
    init_checkpoint: str | Path | None, model_config: dict, random_init: Any = None
) -> str:
    """SHA-256 of the model config and the base checkpoint's manifest file list (without a
    checkpoint: ``random_init``, what decides random weights)."""
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode())
    if init_checkpoint is None:
        h.update(f"random init {random_init!r}".encode())
    else:
        from probsft_megatron import manifest

        listed = manifest.read_manifest(init_checkpoint)
        files = (listed or {}).get("files") or str(Path(init_checkpoint).resolve())
        h.update(json.dumps(files, sort_keys=True).encode())
    return h.hexdigest()


def run_fingerprint(config) -> str | None:
    """The base fingerprint of a training job's config; None without LoRA."""
    if not config.peft.enabled:
        return None
    par = config.parallel
    layout = (config.train.seed, par.tensor_model_parallel_size, par.pipeline_model_parallel_size)
    return base_fingerprint(config.init.checkpoint, config.model.to_dict(), random_init=layout)


def peft_record(peft: PeftConfig, fingerprint: str) -> dict:
    """What a LoRA checkpoint records beside its adapters (``peft.json``)."""
    record = dataclasses.asdict(peft)  # method, rank, alpha, dropout, target_modules
    return {**record, "target_modules": list(peft.target_modules), "base_fingerprint": fingerprint}


def check_fingerprint(checkpoint: str | Path, fingerprint: str | None) -> None:
    """Refuse in one line to put a LoRA checkpoint's adapters onto another base model."""
    path = Path(checkpoint) / FINGERPRINT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint} holds no LoRA adapters (no {FINGERPRINT_FILE}: a full-weights run); "
            "resume it with peft.method=none or use another train.output_dir"
        )
    saved = json.loads(path.read_text()).get("base_fingerprint")
    if saved != fingerprint:
        raise CheckpointError(
            f"{checkpoint} holds LoRA adapters of another base model (fingerprint "
            f"{str(saved)[:12]} != {fingerprint[:12]} of init.checkpoint); resume with the "
            "init.checkpoint it was trained on, or use another train.output_dir"
        )
