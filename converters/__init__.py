"""Hugging Face <-> Megatron checkpoint conversion (Qwen2/Qwen2.5, Llama-3.x, deepseek-math,
SmolLM2); megatron-core is imported only when a conversion runs. The model-dir layout is
:mod:`probsft_megatron.model_dir`."""

from probsft_megatron.converters.api import default_model_dir, hf_to_megatron, megatron_to_hf
from probsft_megatron.model_dir import ModelDir, read_model_dir

__all__ = ["ModelDir", "default_model_dir", "hf_to_megatron", "megatron_to_hf", "read_model_dir"]
