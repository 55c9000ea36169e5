"""SFT data for ``probsft train``: records, tokenized examples, global batches.

Three stages, each usable on its own (and each its own module):

* :func:`load_records` (:mod:`.records`) reads prompt/response strings from local
  ``.jsonl`` / ``.json`` / ``.parquet`` files (or generates the figlet-font task offline).
* :class:`SFTDataset` (:mod:`.examples`) tokenizes them (chat template or plain
  concatenation), truncates to ``max_length`` and marks the tokens the loss is taken on.
* :class:`GlobalBatchLoader` (:mod:`.batches`) turns the examples into deterministic,
  data-parallel-sharded, resumable global batches of :class:`Batch` micro-batches: one
  example per row padded to the micro-batch's longest (or to ``max_length``), or packed (a
  micro-batch's examples in one row with their boundaries, ``cu_seqlens``).

Loss-mask convention (everywhere in this package): ``loss_mask[t] == 1`` iff the *next*
token ``input_ids[t + 1]`` is a response token (the end-of-sequence token that ends the
response included), so with ``labels[t] = input_ids[t + 1]`` the loss is exactly the
response tokens' negative log-likelihood. The last position of an example is never
trained (its label would belong to the next example or to padding).

The ``data.*`` keys are :class:`~probsft_megatron.config.DataConfig` (re-exported here).
Full behaviour, field presets and decisions: ``docs/data.md``.
"""

from probsft_megatron.config import FORMATS, SOURCES, TRUNCATIONS, DataConfig
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
    "FORMATS",
    "SOURCES",
    "TRUNCATIONS",
    "Batch",
    "DataConfig",
    "GlobalBatchLoader",
    "SFTDataset",
    "collate",
    "epoch_permutation",
    "pad_multiple",
    "load_records",
]
