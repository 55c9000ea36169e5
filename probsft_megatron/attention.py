"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

A drop-in for megatron's ``DotProductAttention`` (same contract, no parameters) that never
builds the ``[b, heads, s, s]`` scores itself; packed ``thd`` rows attend causally within each
sequence of ``cu_seqlens_q``, one SDPA call per sequence (docs/attention.md)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from probsft_megatron import compat


class SDPAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` built on PyTorch SDPA."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        tp = compat.rank_position().tp
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        gqa = self.heads != self.groups
        self.sdpa = partial(F.scaled_dot_product_attention, scale=self.scale, enable_gqa=gqa)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        dropout, rng = self._dropout()
        with rng:
            context = self.sdpa(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and sq > 1
            )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _dropout(self):
        """The dropout rate now, and megatron's model-parallel RNG stream when there is dropout."""
        dropout = self.dropout if self.training else 0.0
        if dropout == 0.0:
            return dropout, nullcontext()
        return dropout, tensor_parallel.get_cuda_rng_tracker().fork()

    def _packed(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed sequences as thd, not {params.qkv_format}")
        if query.dim() == 4:  # [t, 1, heads, hn]: a caller that kept the batch dimension
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        bounds = params.cu_seqlens_q.tolist()
        if bounds[-1] != query.shape[0]:
            raise ValueError(
                f"cu_seqlens ends at {bounds[-1]} but the packed row has {query.shape[0]} tokens"
            )
        dropout, rng = self._dropout()
        parts = []
        with rng:
            for start, end in zip(bounds[:-1], bounds[1:]):
                q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
                parts.append(self.sdpa(q, k, v, dropout_p=dropout, is_causal=end - start > 1)[0])
        context = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [heads, t, hn]
        return context.transpose(0, 1).reshape(query.shape[0], self.heads * self.head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters
