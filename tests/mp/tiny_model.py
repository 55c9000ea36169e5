"""The tests' tiny Qwen2-style model: RMSNorm, SwiGLU, GQA, qkv bias, RoPE, untied (imported
as ``mp.tiny_model`` by the tests and as ``tiny_model`` by the workers beside it)."""

from probsft_megatron.config import ModelConfig

TINY_QWEN2 = ModelConfig(
    arch="qwen2",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    rope_theta=1e6,
)
