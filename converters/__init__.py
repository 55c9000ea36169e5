"""Hugging Face <-> Megatron checkpoint conversion (Qwen2/Qwen2.5, Llama-3.x, deepseek-math,
SmolLM2) and the on-disk layout of a Megatron model directory.

Library entry points: :func:`hf_to_megatron`, :func:`megatron_to_hf`,
:func:`default_model_dir` (in :mod:`.api`), and the layout helpers in :mod:`.layout`.
megatron-core is imported only when a conversion runs.
"""

from probsft_megatron.converters.api import default_model_dir, hf_to_megatron, megatron_to_hf
from probsft_megatron.converters.layout import ModelDir, read_model_dir

__all__ = ["ModelDir", "default_model_dir", "hf_to_megatron", "megatron_to_hf", "read_model_dir"]
