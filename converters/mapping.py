"""Where each Hugging Face tensor lives inside the (TP=1, PP=1) Megatron GPT model.

Layout (local layer spec; verified against transformers to ~1e-6 in fp32):

* ``model.embed_tokens`` -> ``embedding.word_embeddings``; ``lm_head`` -> ``output_layer``
  (absent when embeddings are tied); ``model.norm`` -> ``decoder.final_layernorm``.
* ``q_proj``/``k_proj``/``v_proj`` (weights and, for Qwen2, biases) -> ``linear_qkv``, grouped
  per key/value head ``g`` as ``[q heads of g; k_g; v_g]`` (megatron splits whole groups
  across tensor-parallel ranks). ``o_proj`` -> ``linear_proj``.
* ``gate_proj``/``up_proj`` -> ``linear_fc1`` as ``[gate; up]`` (megatron computes
  ``silu(first half) * second half``); ``down_proj`` -> ``linear_fc2``.
* ``input_layernorm``/``post_attention_layernorm`` -> ``input_layernorm``/``pre_mlp_layernorm``.

Each :class:`TensorMap` gives a view of the Megatron parameter that holds one HF tensor, with
the same number of elements in HF's row-major order, so conversion in either direction is
``view.copy_(hf.reshape(view.shape))`` or ``view.reshape(hf_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from probsft_megatron.config import ModelConfig

IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
"""HF tensors that are derived buffers, not weights (older checkpoints saved them)."""


@dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the part of a Megatron parameter that holds it."""

    hf_name: str
    megatron_name: str
    hf_shape: tuple[int, ...]
    view: Callable[[torch.Tensor], torch.Tensor]


def qkv_views(param: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(q, k, v) views of a ``linear_qkv`` weight ``[(nq + 2 nkv) d, h]`` or its bias.

    The views have shapes ``[nkv, nq/nkv, d, ...]``, ``[nkv, d, ...]``, ``[nkv, d, ...]``,
    which flatten to HF's q/k/v row order.
    """
    groups = model.num_query_groups
    per_group = model.num_attention_heads // groups
    grouped = param.view(groups, per_group + 2, model.head_dim, *param.shape[1:])
    return grouped[:, :per_group], grouped[:, per_group], grouped[:, per_group + 1]


def fc1_views(param: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of a ``linear_fc1`` weight ``[2 f, h]``."""
    return param[: model.ffn_hidden_size], param[model.ffn_hidden_size :]


def _whole(param: torch.Tensor) -> torch.Tensor:
    return param


def _qkv_part(param: torch.Tensor, model: ModelConfig, part: int) -> torch.Tensor:
    return qkv_views(param, model)[part]


def _fc1_part(param: torch.Tensor, model: ModelConfig, part: int) -> torch.Tensor:
    return fc1_views(param, model)[part]


def tensor_maps(model: ModelConfig) -> list[TensorMap]:
    """Every weight of ``model`` in HF checkpoint order (embedding, layers, norm, lm_head)."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    maps = [
        TensorMap(
            "model.embed_tokens.weight",
            "embedding.word_embeddings.weight",
            (model.vocab_size, h),
            _whole,
        )
    ]
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = mg + "self_attention.linear_qkv."
        maps.append(
            TensorMap(hf + "input_layernorm.weight", mg + "input_layernorm.weight", (h,), _whole)
        )
        for part, (name, rows) in enumerate((("q_proj", q), ("k_proj", kv), ("v_proj", kv))):
            view = partial(_qkv_part, model=model, part=part)
            maps.append(TensorMap(f"{hf}self_attn.{name}.weight", qkv + "weight", (rows, h), view))
            if model.qkv_bias:
                maps.append(TensorMap(f"{hf}self_attn.{name}.bias", qkv + "bias", (rows,), view))
        maps.append(
            TensorMap(
                hf + "self_attn.o_proj.weight",
                mg + "self_attention.linear_proj.weight",
                (h, q),
                _whole,
            )
        )
        maps.append(
            TensorMap(
                hf + "post_attention_layernorm.weight",
                mg + "pre_mlp_layernorm.weight",
                (h,),
                _whole,
            )
        )
        for part, name in enumerate(("gate_proj", "up_proj")):
            maps.append(
                TensorMap(
                    f"{hf}mlp.{name}.weight",
                    mg + "mlp.linear_fc1.weight",
                    (f, h),
                    partial(_fc1_part, model=model, part=part),
                )
            )
        maps.append(
            TensorMap(hf + "mlp.down_proj.weight", mg + "mlp.linear_fc2.weight", (h, f), _whole)
        )
    maps.append(TensorMap("model.norm.weight", "decoder.final_layernorm.weight", (h,), _whole))
    if not model.tie_word_embeddings:
        maps.append(
            TensorMap("lm_head.weight", "output_layer.weight", (model.vocab_size, h), _whole)
        )
    return maps
