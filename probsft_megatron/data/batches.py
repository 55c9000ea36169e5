"""Global batches: deterministic, data-parallel-sharded, resumable. A micro-batch is one example
per row padded to ``seq_length`` or to its longest example, or packed into one row with
``cu_seqlens`` (contract: docs/data.md)."""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from probsft_megatron.errors import ConfigError, DataError


@dataclasses.dataclass
class Batch:
    """One micro-batch on one rank, tensors ``[b, s]``: ``labels[i, t]`` follows
    ``tokens[i, t]``; ``attention_mask`` None = causal. Packed (``b == 1``): ``cu_seqlens``
    (int32) bounds the row's sequences (a padding tail is the last), where attention and
    ``position_ids`` restart. ``examples[i]``: the dataset indices row ``i`` holds."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    examples: tuple[tuple[int, ...], ...] = ()
    real_tokens: int | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    @property
    def positions(self) -> int:
        """Positions the model computes (real tokens and padding)."""
        return self.tokens.numel()

    def to(self, device) -> Batch:
        tensors = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        moved = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        return dataclasses.replace(self, **moved)


def round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def pad_multiple(tp: int = 1) -> int:
    """What a micro-batch's sequence length is rounded up to: a multiple of 8 (GPU matrix
    kernels) and of the tensor-parallel size (sequence parallelism splits the sequence)."""
    return math.lcm(8, tp)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; stable across Python and numpy versions."""
    order = list(range(n))
    random.Random(f"probsft-data:{seed}:{epoch}").shuffle(order)
    return order


class GlobalBatchLoader:
    """Deterministic, DP-sharded, resumable global batches: each item is this rank's
    ``list[Batch]`` of one optimizer step (docs/data.md). ``dataset``: ``len()`` and ``dataset[i]
    -> {"input_ids", "loss_mask"}``; ``dataset.lengths``, when present, saves reading them all."""

    def __init__(
        self,
        dataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seq_length: int,
        seed: int,
        epochs: int = 1,
        packing: bool = False,
        pad_id: int = 0,
        drop_last: bool = True,
        padding: str = "longest",
        pad_multiple: int = 8,
        same_length_per_step: bool = False,
    ):
        # the sizes and data.padding come validated from the config (>= 1, a known padding)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is outside [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be divisible by micro_batch_size="
                f"{micro_batch_size} x data-parallel size {dp_size} "
                f"(= {micro_batch_size * dp_size}); change global_batch_size or micro_batch_size"
            )
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_length, self.seed, self.epochs = seq_length, seed, epochs
        self.packing, self.pad_id, self.drop_last = packing, pad_id, drop_last
        self.padding, self.pad_multiple = padding, pad_multiple
        self.same_length_per_step = same_length_per_step

        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        self._lengths = np.asarray(lengths, dtype=np.int64)
        if len(self._lengths) == 0:
            raise DataError("the training dataset is empty")
        longest = int(self._lengths.max())
        if longest > seq_length:
            raise ConfigError(
                f"the longest example has {longest} tokens but seq_length="
                f"{seq_length}; set seq_length >= data.max_length"
            )
        n = len(self._lengths)
        self._steps_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)
        if self._steps_per_epoch == 0:
            raise ConfigError(
                f"one epoch has {n} examples, fewer than global_batch_size={global_batch_size}; "
                "lower global_batch_size or keep the incomplete batch (drop_last=False)"
            )
        self._step = 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def __len__(self) -> int:
        """Optimizer steps (global batches) over all epochs."""
        return self._steps_per_epoch * self.epochs

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self._lengths),
            "lengths_crc32": zlib.crc32(self._lengths.tobytes()),  # same data, same tokenizer
            "drop_last": self.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """Data position: ``step`` (global batches handed out), ``epoch``,
        ``step_in_epoch``, plus the settings the schedule depends on (checked on load)."""
        epoch, k = divmod(self._step, self._steps_per_epoch)
        return {"step": self._step, "epoch": epoch, "step_in_epoch": k, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["step"]`` global batches; settings recorded in ``state``
        must match this loader's (ConfigError naming the first that differs)."""
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise ConfigError(
                    f"cannot resume the data position: it was saved with {key}="
                    f"{state[key]} but this run has {key}={value}; use the same value"
                )
        if "step" not in state:
            raise ConfigError(
                "the saved data position has no 'step'; it is not a GlobalBatchLoader state"
            )
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ConfigError(
                f"cannot resume the data position at step {step}: this run has {len(self)} steps"
            )
        self._step = step

    def __iter__(self) -> Iterator[list[Batch]]:
        """This rank's micro-batches of each remaining global batch, in order."""
        g, m = self.global_batch_size, self.micro_batch_size
        share = g // self.dp_size
        while self._step < len(self):
            epoch, k = divmod(self._step, self._steps_per_epoch)
            if self._cached[0] != epoch:  # the order of the epoch in progress
                self._cached = (epoch, epoch_permutation(len(self._lengths), self.seed, epoch))
            units = self._cached[1][k * g : (k + 1) * g]
            mine = units[self.dp_rank * share : (self.dp_rank + 1) * share]
            self._step += 1
            groups = [mine[i * m : (i + 1) * m] for i in range(share // m)]
            lengths = [self._length_of(group) for group in groups]
            if self.same_length_per_step:
                lengths = [max(lengths)] * len(groups)
            yield [self._collate(group, length) for group, length in zip(groups, lengths)]

    def _length_of(self, group: list[int]) -> int:
        """The sequence length of ``group``'s micro-batch on its own."""
        if self.padding == "max_length" and not self.packing:
            return round_up(self.seq_length, self.pad_multiple)
        lengths = self._lengths[group] if group else np.zeros(1, dtype=np.int64)
        need = int(lengths.sum()) if self.packing else int(lengths.max())
        return round_up(need, self.pad_multiple)

    def _collate(self, group: list[int], s: int) -> Batch:
        """The micro-batch of examples ``group``, rows ``s`` long: one example per row or, packed,
        one row. Padding has token and label ``pad_id`` and ``loss_mask`` 0, as has an example's
        last position."""
        b, packed = (1 if self.packing else self.micro_batch_size), self.packing
        tokens = torch.full((b, s), self.pad_id, dtype=torch.long)
        labels = tokens.clone()
        loss_mask = torch.zeros((b, s), dtype=torch.float32)
        position_ids = torch.arange(s, dtype=torch.long).repeat(b, 1)
        lengths, offset = [], 0
        for slot, index in enumerate(group):
            example = self.dataset[index]
            ids, mask = example["input_ids"], example["loss_mask"]
            row, start = (0, offset) if packed else (slot, 0)
            offset = end = start + len(ids)
            lengths.append(len(ids))
            tokens[row, start:end] = ids
            labels[row, start : end - 1] = ids[1:]  # the last label stays pad_id
            loss_mask[row, start : end - 1] = mask[:-1]
            if packed:
                position_ids[row, start:end] = torch.arange(len(ids))  # rotary positions restart
        real = sum(lengths)
        cu_seqlens = max_seqlen = None
        if packed:
            bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            if s > real:  # the padding tail: its own sequence, positions from 0
                position_ids[0, real:] = torch.arange(s - real)
                bounds = np.append(bounds, s)
            cu_seqlens = torch.from_numpy(bounds.astype(np.int32))
            max_seqlen = int(np.diff(bounds).max())
            examples = (tuple(int(i) for i in group),)
        else:
            examples = tuple((int(i),) for i in group) + ((),) * (b - len(group))
        return Batch(
            tokens, labels, loss_mask, position_ids, None, examples, real, cu_seqlens, max_seqlen
        )
