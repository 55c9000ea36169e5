"""The layout (split over GPUs, recompute) and workload (tokens, precision, loss head,
kernels) the planner plans for, and whether a model can be split a given way."""

from __future__ import annotations

from dataclasses import dataclass

from probsft_megatron.config import RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS
from probsft_megatron.errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
KERNELS = ("cuda", "cpu")
ADAM_IMPLS = ("foreach", "single", "fused")


@dataclass(frozen=True)
class Layout:
    """How one job is split over ``tp * pp * dp`` GPUs, and what it recomputes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    recompute_method: str | None = None  # full: uniform | block
    recompute_num_layers: int | None = None  # full: layers per unit (uniform) / per stage (block)

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ConfigError(
                f"TP, PP and DP must be >= 1 (got TP={self.tp} PP={self.pp} DP={self.dp})"
            )
        if self.recompute not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(
                f"parallel.recompute_granularity={self.recompute!r} is invalid; "
                f"use one of {', '.join(RECOMPUTE_GRANULARITIES)}"
            )
        if self.recompute == "full":
            if self.recompute_method not in RECOMPUTE_METHODS:
                raise ConfigError(
                    "parallel.recompute_granularity=full needs "
                    "parallel.recompute_method=uniform or block"
                )
            if not self.recompute_num_layers or self.recompute_num_layers < 1:
                raise ConfigError(
                    "parallel.recompute_granularity=full needs parallel.recompute_num_layers >= 1"
                )

    @property
    def uses_distributed_optimizer(self) -> bool:
        """It only shards with more than one DP rank (``probsft train`` turns it off at DP=1)."""
        return self.distributed_optimizer and self.dp > 1

    def label(self) -> str:
        full = f"recompute=full/{self.recompute_method}/{self.recompute_num_layers}"
        parts = [
            f"TP={self.tp} PP={self.pp} DP={self.dp}",
            "SP" if self.sequence_parallel else "",
            "dist-opt" if self.uses_distributed_optimizer else "",
            {"none": "", "selective": "recompute=selective", "full": full}[self.recompute],
        ]
        return " ".join(filter(None, parts))

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that select this layout."""
        out = [
            f"parallel.tensor_model_parallel_size={self.tp}",
            f"parallel.pipeline_model_parallel_size={self.pp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"optim.use_distributed_optimizer={str(self.distributed_optimizer).lower()}",
        ]
        if self.recompute != "none":
            out.append(f"parallel.recompute_granularity={self.recompute}")
        if self.recompute == "full":
            out += [
                f"parallel.recompute_method={self.recompute_method}",
                f"parallel.recompute_num_layers={self.recompute_num_layers}",
            ]
        return out


@dataclass(frozen=True)
class Workload:
    """What one step runs: tokens per micro-batch, precision, loss head, kernels."""

    micro_batch_size: int = 1
    seq_length: int = 2048
    global_batch_size: int | None = None  # None: as many micro-batches as pipeline stages
    params_dtype: str = "bf16"  # bf16 | fp32
    grad_reduce_in_fp32: bool = True
    loss_implementation: str = "unfused"  # unfused | fused
    chunk_size: int = 512
    attention: str = "sdpa"  # sdpa | te | local (auto counts as sdpa)
    packing: bool = False
    kernels: str = "cuda"  # cuda | cpu: which kernels' saved tensors to count
    adam: str = "foreach"  # foreach | single (torch's multi-/single-tensor Adam) | fused (TE/apex)
    lora_rank: int = 0  # > 0: LoRA (peft.method=lora), the base frozen, adapters of this rank
    lora_targets: tuple[str, ...] = ()  # megatron linears with adapters (peft.target_modules)

    def __post_init__(self) -> None:
        for what, value, allowed in (
            ("parameter dtype", self.params_dtype, DTYPE_BYTES),
            ("kernels", self.kernels, KERNELS),
            ("Adam implementation", self.adam, ADAM_IMPLS),
        ):
            if value not in allowed:
                use = " or ".join(allowed) if len(allowed) == 2 else f"one of {', '.join(allowed)}"
                raise ConfigError(f"unknown {what} {value!r}; use {use}")

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.params_dtype]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_reduce_in_fp32 else self.param_bytes

    def num_microbatches(self, dp: int, pp: int) -> int:
        if self.global_batch_size is None:
            return pp
        return max(1, self.global_batch_size // (self.micro_batch_size * dp))


def dims(model) -> dict[str, int]:
    """The sizes the counts use: hidden ``h``, FFN ``f``, vocabulary ``v``, query and key/value
    widths ``q``/``kv``, ``hd`` per head, ``heads``, query ``groups``, ``layers``."""
    hd = model.head_dim or model.hidden_size // model.num_attention_heads
    return {
        "h": model.hidden_size,
        "f": model.ffn_hidden_size,
        "v": model.vocab_size,
        "q": model.num_attention_heads * hd,
        "kv": model.num_query_groups * hd,
        "hd": hd,
        "heads": model.num_attention_heads,
        "groups": model.num_query_groups,
        "layers": model.num_layers,
    }


def layout_problem(model, tp: int, pp: int) -> str | None:
    """Why ``model`` cannot be split ``tp`` x ``pp`` (None when it can)."""
    for key in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
        if getattr(model, key) % tp:
            return f"TP={tp} does not divide model.{key}={getattr(model, key)}"
    if model.num_layers % pp:
        return f"PP={pp} does not divide model.num_layers={model.num_layers}"
    return None
