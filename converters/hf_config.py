"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for ``Qwen2ForCausalLM`` and
``LlamaForCausalLM``; what the Megatron model cannot represent exactly is one-line refused.
Both transformers 4 (``rope_theta``/``rope_scaling``) and 5 (``rope_parameters``) are read."""

from __future__ import annotations

from typing import Any

from probsft_megatron.config import ModelConfig
from probsft_megatron.errors import CheckpointError

# HF architecture class -> ModelConfig.arch (also the HF model_type)
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
_SUPPORTED_TEXT = (
    "Qwen2ForCausalLM (Qwen2, Qwen2.5) and LlamaForCausalLM (Llama-3.x, deepseek-math, SmolLM2)"
)
# megatron-core's llama3 rope scaling hard-codes everything but the factor.
LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_DEFAULT_MAX_POSITIONS = {"qwen2": 32768, "llama": 2048}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_UNSUPPORTED_FLAGS = {  # architecture -> config flags its mapping cannot represent when set
    "llama": {
        "attention_bias": "the Llama mapping has no linear biases",
        "mlp_bias": "the Llama mapping has no linear biases",
    },
    "qwen2": {"use_sliding_window": "Megatron's attention here is full causal attention"},
}


def _refuse(where: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {field}={value!r} {why}")


def _unsupported(where: str, field: str, value: Any, why: str) -> CheckpointError:
    return _refuse(where, field, value, f"is not supported; {why}")


def rope_settings(cfg: dict, where: str = "config.json") -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` from either config spelling (``scaling`` None: unscaled)."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    theta = cfg.get("rope_theta", 10000.0)
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        why = "Megatron's rotary embedding implements only 'llama3' scaling (or none)"
        raise _unsupported(where, "rope_scaling.rope_type", rope_type, why)
    for key, fixed in LLAMA3_FIXED.items():
        if float(scaling.get(key, float("nan"))) != fixed:
            why = f"megatron-core hard-codes {key}={fixed:g} for llama3 rope scaling"
            raise _unsupported(where, f"rope_scaling.{key}", scaling.get(key), why)
    return float(theta), scaling


def model_config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` of an HF config dict, or a one-line :class:`CheckpointError`."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        why = f"this converter handles {_SUPPORTED_TEXT}"
        raise _unsupported(where, "architectures", archs, why)
    arch = ARCHITECTURES[archs[0]]
    if cfg.get("model_type", arch) != arch:
        why = f"does not match architectures={archs}; expected {arch!r}"
        raise _refuse(where, "model_type", cfg.get("model_type"), why)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method")
        why = "is set; dequantize the checkpoint (save it in bf16/fp32) before converting"
        raise _refuse(where, "quantization_config", method, why)
    if cfg.get("hidden_act", "silu") != "silu":
        why = "the Megatron model uses SwiGLU (silu)"
        raise _unsupported(where, "hidden_act", cfg["hidden_act"], why)
    for field, why in _UNSUPPORTED_FLAGS[arch].items():
        if cfg.get(field):
            raise _unsupported(where, field, cfg[field], why)
    kinds = set(cfg.get("layer_types") or ["full_attention"])
    if arch == "qwen2" and kinds != {"full_attention"}:
        why = "every layer must use full attention"
        raise _unsupported(where, "layer_types", sorted(kinds), why)
    theta, scaling = rope_settings(cfg, where)
    if theta != int(theta):
        raise _unsupported(where, "rope_theta", theta, "Megatron takes an integer rotary base")
    if missing := [k for k in (*_REQUIRED, "vocab_size") if k not in cfg]:
        raise CheckpointError(f"{where}: required field(s) {missing} missing")
    heads = cfg["num_attention_heads"]
    max_positions = cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[arch])
    try:
        return ModelConfig(
            arch=arch,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=max_positions,
            rope_theta=theta,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            rope_scaling_factor=float(scaling["factor"]) if scaling else None,
            init_std=cfg.get("initializer_range", 0.02),
        )
    except ValueError as exc:  # ModelConfig's own consistency checks
        raise CheckpointError(f"{where}: {exc}") from None


def export_config(
    model: ModelConfig,
    dtype: str,
    template: dict | None = None,
    where: str = "template config.json",
) -> dict:
    """An export's config.json: ``template`` (matching ``model``) in ``dtype``, else generated."""
    if template is not None:
        described = model_config_from_hf(template, where).to_dict()
        for key, value in model.to_dict().items():
            if key != "init_std" and described[key] != value:
                raise CheckpointError(
                    f"{where} describes {key}={described[key]!r} but the checkpoint has "
                    f"{key}={value!r}; pass the matching --hf-template"
                )
        return {**template, ("dtype" if "dtype" in template else "torch_dtype"): dtype}
    if model.qkv_bias != (model.arch == "qwen2"):
        raise CheckpointError(
            f"model qkv_bias={model.qkv_bias} cannot be expressed by the HF "
            f"{model.arch} architecture"
        )
    arch_class = next(k for k, v in ARCHITECTURES.items() if v == model.arch)
    scaling = None
    if (factor := model.rope_scaling_factor) is not None:
        scaling = {"rope_type": "llama3", "factor": factor, **LLAMA3_FIXED}
    out = {
        "architectures": [arch_class],
        "model_type": model.arch,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": model.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": model.init_std,
        "torch_dtype": dtype,
    }
    return {**out, **dict.fromkeys(_UNSUPPORTED_FLAGS[model.arch], False)}
