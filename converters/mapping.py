"""Where each Hugging Face tensor lives in the (TP=1, PP=1) Megatron GPT model (local spec):
q/k/v in ``linear_qkv`` grouped per key/value head as ``[q heads of g; k_g; v_g]`` (megatron
splits whole groups across TP ranks), gate/up in ``linear_fc1`` as ``[gate; up]``. A
:class:`TensorMap`'s view holds the HF tensor's elements in HF's row-major order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from probsft_megatron.config import ModelConfig

IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)  # derived buffers older checkpoints saved


@dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the part of a Megatron parameter that holds it."""

    hf_name: str
    megatron_name: str
    hf_shape: tuple[int, ...]
    view: Callable[[torch.Tensor], torch.Tensor]


def qkv_views(param: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(q, k, v) views ``[nkv, nq/nkv, d, ...]``, ``[nkv, d, ...]``, ``[nkv, d, ...]`` of a
    ``linear_qkv`` weight ``[(nq + 2 nkv) d, h]`` or bias, flattening to HF's row order."""
    groups = model.num_query_groups
    per_group = model.num_attention_heads // groups
    grouped = param.view(groups, per_group + 2, model.head_dim, *param.shape[1:])
    return grouped[:, :per_group], grouped[:, per_group], grouped[:, per_group + 1]


def fc1_views(param: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) halves of a ``linear_fc1`` weight ``[2 f, h]``."""
    return param[: model.ffn_hidden_size], param[model.ffn_hidden_size :]


def _whole(param: torch.Tensor) -> torch.Tensor:
    return param


def _part(views: Callable, model: ModelConfig, part: int, param: torch.Tensor) -> torch.Tensor:
    return views(param, model)[part]


def tensor_maps(model: ModelConfig) -> list[TensorMap]:
    """Every weight of ``model`` in HF checkpoint order (embedding, layers, norm, lm_head)."""
    h, f, d, v = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.vocab_size
    q, kv = model.num_attention_heads * d, model.num_query_groups * d
    maps = [
        TensorMap("model.embed_tokens.weight", "embedding.word_embeddings.weight", (v, h), _whole)
    ]
    for i in range(model.num_layers):
        qkv = "self_attention.linear_qkv."
        layer = [("input_layernorm.weight", "input_layernorm.weight", (h,), _whole)]
        for part, (name, rows) in enumerate((("q_proj", q), ("k_proj", kv), ("v_proj", kv))):
            view = partial(_part, qkv_views, model, part)
            layer.append((f"self_attn.{name}.weight", qkv + "weight", (rows, h), view))
            if model.qkv_bias:
                layer.append((f"self_attn.{name}.bias", qkv + "bias", (rows,), view))
        layer.append(
            ("self_attn.o_proj.weight", "self_attention.linear_proj.weight", (h, q), _whole)
        )
        layer.append(("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", (h,), _whole))
        for part, name in enumerate(("gate_proj", "up_proj")):
            view = partial(_part, fc1_views, model, part)
            layer.append((f"mlp.{name}.weight", "mlp.linear_fc1.weight", (f, h), view))
        layer.append(("mlp.down_proj.weight", "mlp.linear_fc2.weight", (h, f), _whole))
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        maps += [TensorMap(hf + a, mg + b, shape, view) for a, b, shape, view in layer]
    maps.append(TensorMap("model.norm.weight", "decoder.final_layernorm.weight", (h,), _whole))
    if not model.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", "output_layer.weight", (v, h), _whole))
    return maps
