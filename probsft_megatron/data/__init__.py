"""SFT data: :func:`load_records` reads records, :class:`SFTDataset` tokenizes them,
:class:`GlobalBatchLoader` makes deterministic, DP-sharded, resumable global batches.

Loss-mask convention: ``loss_mask[t]`` weights the label ``input_ids[t + 1]`` (1 iff it is a
response token, closing eos included); an example's last position is never trained."""

from probsft_megatron.config import DataConfig
from probsft_megatron.data.batches import GlobalBatchLoader, epoch_permutation, pad_multiple
from probsft_megatron.data.examples import SFTDataset
from probsft_megatron.data.records import load_records

__all__ = [
    "DataConfig",
    "GlobalBatchLoader",
    "SFTDataset",
    "epoch_permutation",
    "pad_multiple",
    "load_records",
]
