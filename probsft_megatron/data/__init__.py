"""SFT data for ``probsft train``: :func:`load_records` (:mod:`.records`) reads or generates
records, :class:`SFTDataset` (:mod:`.examples`) tokenizes them, :class:`GlobalBatchLoader`
(:mod:`.batches`) makes deterministic, DP-sharded, resumable global batches. docs/data.md.

Loss-mask convention (everywhere): ``loss_mask[t] == 1`` iff the *next* token
``input_ids[t + 1]`` is a response token (the response's closing eos included), so with
``labels[t] = input_ids[t + 1]`` the loss is the response tokens' NLL; the last position of
an example is never trained.
"""

from probsft_megatron.config import DataConfig
from probsft_megatron.data.batches import (
    Batch,
    GlobalBatchLoader,
    collate,
    epoch_permutation,
    pad_multiple,
)
from probsft_megatron.data.examples import SFTDataset
from probsft_megatron.data.records import load_records

__all__ = [
    "Batch",
    "DataConfig",
    "GlobalBatchLoader",
    "SFTDataset",
    "collate",
    "epoch_permutation",
    "pad_multiple",
    "load_records",
]
