"""Model description and Megatron-Core GPT model building (Qwen2 / Llama families).

:class:`ModelConfig` describes a decoder in Hugging Face terms (what a ``config.json`` says);
:func:`transformer_config` turns it plus a :class:`ParallelConfig` into megatron's
``TransformerConfig`` (the single source of truth inside megatron), and
:func:`build_gpt_model` builds one pipeline stage of a ``GPTModel`` with the local
(non-Transformer-Engine) layer spec, which runs on CPU and GPU alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from probsft_megatron.errors import ConfigError

ARCHITECTURES = ("llama", "qwen2")


@dataclass
class ModelConfig:
    """A decoder-only transformer in Hugging Face terms.

    ``arch`` selects the family: ``qwen2`` (q/k/v bias) or ``llama`` (no biases; Llama-3 rope
    scaling when ``rope_scaling_factor`` is set). ``head_dim`` defaults to hidden/heads.
    """

    arch: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int | None = None
    vocab_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # None: the family's default (qwen2: True, llama: False)
    rope_scaling_factor: float | None = None  # Llama-3 "llama3" rope scaling factor
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"model.arch={self.arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}"
            )
        if self.qkv_bias is None:
            self.qkv_bias = self.arch == "qwen2"
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**d)

    def num_parameters(self) -> int:
        """Parameter count of the unsharded model (for FLOPs and reporting)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@dataclass
class ParallelConfig:
    """How the model is split: tensor (TP), pipeline (PP), sequence parallel (SP, needs TP>1)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def validate(self, world_size: int, model: ModelConfig | None = None) -> int:
        """Check the layout against the world size and model; returns the data-parallel size."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("parallel.tensor_model_parallel_size and "
                              "parallel.pipeline_model_parallel_size must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(
                f"TP*PP = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}; "
                "change parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size "
                "or the number of processes"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs "
                              "parallel.tensor_model_parallel_size > 1")
        if model is not None:
            for key, value in (("num_attention_heads", model.num_attention_heads),
                               ("num_query_groups", model.num_query_groups),
                               ("vocab_size", model.vocab_size),
                               ("ffn_hidden_size", model.ffn_hidden_size)):
                if value % tp:
                    raise ConfigError(
                        f"model.{key}={value} is not divisible by "
                        f"parallel.tensor_model_parallel_size={tp}; pick a TP that divides it"
                    )
            if model.num_layers % pp:
                raise ConfigError(
                    f"model.num_layers={model.num_layers} is not divisible by "
                    f"parallel.pipeline_model_parallel_size={pp}"
                )
        return world_size // (tp * pp)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm usable under sequence parallelism.

    megatron's wrapper around torch norms refuses ``sequence_parallel``; the only thing SP
    needs from a norm is that its weight is marked, so ``finalize_model_grads`` all-reduces
    its gradient over the tensor-parallel group (each rank saw a slice of the sequence).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    calculate_per_token_loss: bool = True,
    **overrides: Any,
):
    """megatron ``TransformerConfig`` for ``model`` under ``parallel``.

    Dropout is 0 (SFT of pretrained backbones; also what makes CPU runs TP-exact) and
    ``calculate_per_token_loss`` is on: losses are summed per micro-batch and gradients are
    divided once by the global token count (see :mod:`probsft_megatron.loss`).
    """
    from megatron.core.transformer import TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(model.qkv_bias),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        calculate_per_token_loss=calculate_per_token_loss,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def resolve_attention(impl: str) -> str:
    """``auto`` is ``te`` (Transformer Engine layer spec) where TE is installed and CUDA
    exists, else ``sdpa``; see :data:`probsft_megatron.attention.ATTENTION_IMPLS`."""
    from probsft_megatron.attention import ATTENTION_IMPLS

    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"train.attention={impl!r} is invalid; use one of "
                          f"{', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    from probsft_megatron import compat, platform

    return "te" if platform.cuda_available() and compat.te_available() else "sdpa"


def layer_spec(config, attention: str = "sdpa"):
    """The GPT block spec for an attention implementation:

    * ``te``: megatron's Transformer Engine spec (fused attention, TE norms fused into the
      linears; NGC GPU containers);
    * ``sdpa``: the local spec with :class:`~probsft_megatron.attention.SDPAttention`;
    * ``local``: the local spec with megatron's unfused ``DotProductAttention``.

    The local variants use SP-capable RMSNorm everywhere. All store weights under the same
    checkpoint keys (the local spec maps its norms onto TE's ``layer_norm_weight`` names).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if attention == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = SequenceParallelRMSNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if attention == "sdpa":
        from probsft_megatron.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return TransformerBlockSubmodules(
        layer_specs=[spec] * (config.num_layers // config.pipeline_model_parallel_size),
        layer_norm=SequenceParallelRMSNorm,
    )


def build_gpt_model(model: ModelConfig, config, *, pre_process: bool | None = None,
                    post_process: bool | None = None, attention: str = "sdpa"):
    """One pipeline stage of a megatron ``GPTModel`` (call after parallel state is set up).

    Returns logits split over the vocabulary on each TP rank (``parallel_output=True``);
    with ``labels`` the model returns the per-token cross entropy ``[b, s]``, identical on
    every TP rank.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, resolve_attention(attention)),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(model.rope_theta),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )
    return gpt


TINY_QWEN2 = ModelConfig(arch="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                         num_attention_heads=4, num_query_groups=2, vocab_size=256,
                         rope_theta=1e6)
"""The tiny Qwen2-style model of the tests: RMSNorm, SwiGLU, GQA, qkv bias, RoPE, untied."""
