"""Megatron-Core GPT models (Qwen2 / Llama families): ``TransformerConfig``, the layer spec of
the chosen attention, and one pipeline stage with megatron's logits head or the fused head."""

from __future__ import annotations

from typing import Any

import torch

from probsft_megatron.config import ModelConfig, ParallelConfig, resolve_attention


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm under sequence parallelism (megatron's torch-norm wrapper refuses it):
    the weight is marked so ``finalize_model_grads`` all-reduces its gradient over TP."""

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
    """megatron ``TransformerConfig`` for ``model`` under ``parallel``: dropout 0 (SFT; also
    TP-exact on CPU), per-token loss sums (gradients divided once by the global count)."""
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
        **parallel.megatron_recompute(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(config, attention: str = "sdpa", peft=None):
    """The GPT block spec of ``attention`` (``te``: megatron's TE spec; ``sdpa``/``local``:
    the local spec with SDPAttention or megatron's own, SP-capable norms), LoRA with ``peft``;
    all keep the same checkpoint keys."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if attention == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = SequenceParallelRMSNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if attention == "sdpa":
        from probsft_megatron import compat
        from probsft_megatron.attention import SDPAttention

        core_attention = compat.core_attention_module(SDPAttention)  # 0.14's constructor
        spec.submodules.self_attention.submodules.core_attention = core_attention
    if peft is not None and peft.enabled:
        from probsft_megatron.lora import lora_layer_spec

        spec = lora_layer_spec(spec, peft)  # refuses Transformer Engine linears in one line
    if attention == "te":
        return spec
    return TransformerBlockSubmodules(
        layer_specs=[spec] * (config.num_layers // config.pipeline_model_parallel_size),
        layer_norm=SequenceParallelRMSNorm,
    )


def build_gpt_model(
    model: ModelConfig,
    config,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    attention: str = "sdpa",
    fused_head: bool = False,
    peft=None,
):
    """One pipeline stage of a ``GPTModel``: vocab-parallel logits (with ``labels`` the
    per-token CE), or with ``fused_head`` hidden states for the fused loss."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model_class = GPTModel
    if fused_head:
        from probsft_megatron.fused_head import FusedHeadGPTModel

        model_class = FusedHeadGPTModel
    return model_class(
        config=config,
        transformer_layer_spec=layer_spec(config, resolve_attention(attention), peft),
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
