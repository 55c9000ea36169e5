"""Global batches: deterministic, data-parallel-sharded, resumable, plain or packed.

:class:`GlobalBatchLoader` turns tokenized examples into this rank's :class:`Batch`
micro-batches of each optimizer step. Every micro-batch names the examples its rows hold, so
a consumer (the probe) attributes results to examples without re-deriving the order.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from probsft_megatron.errors import ConfigError, DataError


@dataclass
class Batch:
    """One micro-batch on one rank: all tensors ``[b, s]``.

    ``labels[i, t]`` is the token that follows ``tokens[i, t]``; ``loss_mask`` is 1 on
    response tokens. ``attention_mask`` is an optional boolean ``[b, 1, s, s]`` (True =
    masked) used for packed sequences; ``None`` means plain causal attention.
    ``examples[i]``: the dataset indices of the examples row ``i`` holds, in order (one
    without packing, several with it, none for a padding row; empty when the batch was built
    by hand). ``real_tokens``: positions holding example tokens (not padding); None when
    unknown.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    examples: tuple[tuple[int, ...], ...] = ()
    real_tokens: int | None = None

    def to(self, device) -> Batch:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.tokens),
            move(self.labels),
            move(self.loss_mask),
            move(self.position_ids),
            move(self.attention_mask),
            self.examples,
            self.real_tokens,
        )


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items (in order) into rows of ``capacity`` tokens, first-fit.

    Item ``j`` goes into the first row (in creation order) with room for it, or opens a
    new row. Returns the item positions of each row, rows in creation order. A max
    segment tree over the rows' free space makes it ``O(n log n)``.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # unopened rows are empty rows: first-fit opens in order
    rows: list[list[int]] = []
    for item, need in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; stable across Python and numpy versions."""
    order = list(range(n))
    random.Random(f"probsft-data:{seed}:{epoch}").shuffle(order)
    return order


class GlobalBatchLoader:
    """Deterministic, DP-sharded, resumable iteration over global batches.

    Contract (no communication; every rank computes the same schedule independently):

    * Epoch ``e`` visits the examples in :func:`epoch_permutation` ``(seed, e)`` order.
      Without packing a *unit* is one example; with packing a unit is one packed row of
      ``seq_length`` tokens, built by :func:`first_fit_rows` over that order.
    * Global batch ``k`` of an epoch is units ``[k*G, (k+1)*G)`` (``G = global_batch_size``,
      examples without packing, packed rows with packing). DP rank ``r`` of ``d`` takes the
      contiguous share ``[r*G/d, (r+1)*G/d)`` and splits it in order into
      ``G / (micro_batch_size * d)`` micro-batches of ``micro_batch_size`` rows.
    * Each yielded item is this rank's ``list[Batch]`` for one optimizer step; every tensor
      is ``[micro_batch_size, seq_length]`` (``attention_mask`` ``[mbs, 1, s, s]`` bool,
      True = masked, only with packing; ``None`` = plain causal). Padding: token and label
      ``pad_id``, ``loss_mask`` 0. ``Batch.examples`` names each row's examples and
      ``Batch.real_tokens`` counts the non-padding positions.
    * ``drop_last=True`` drops an epoch's incomplete last global batch; ``drop_last=False``
      keeps it and fills the missing rows with empty rows (all padding, ``loss_mask`` 0).
    * ``state_dict()`` records the number of global batches handed out; a fresh loader
      given it by ``load_state_dict`` yields exactly what this one yields next, for any
      ``dp_size`` / ``micro_batch_size`` (the global batches do not depend on them).

    ``dataset``: ``len(dataset)`` and ``dataset[i] -> {"input_ids", "loss_mask"}`` with the
    module's loss-mask convention; a ``lengths`` attribute (tokens per example) is used
    when present instead of reading every example.
    """

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
    ):
        for name, value, low in (
            ("global_batch_size", global_batch_size, 1),
            ("micro_batch_size", micro_batch_size, 1),
            ("data-parallel size", dp_size, 1),
            ("seq_length", seq_length, 2),
            ("epochs", epochs, 1),
        ):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is outside [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be divisible by micro_batch_size="
                f"{micro_batch_size} x data-parallel size {dp_size} "
                f"(= {micro_batch_size * dp_size}); "
                "change global_batch_size or micro_batch_size"
            )
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seq_length, self.seed, self.epochs = seq_length, seed, epochs
        self.packing, self.pad_id, self.drop_last = packing, pad_id, drop_last

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
        self._cached: tuple[int, list] | None = None  # (epoch, units) of the last epoch used
        units_per_epoch = [
            len(self._units(e)) if packing else len(self._lengths) for e in range(epochs)
        ]
        self._steps_per_epoch = [self._count_steps(n) for n in units_per_epoch]
        if self._steps_per_epoch[0] == 0:
            what = "packed rows" if packing else "examples"
            raise ConfigError(
                f"one epoch has {units_per_epoch[0]} {what}, fewer than "
                f"global_batch_size={global_batch_size}; lower global_batch_size "
                "or keep the incomplete batch (drop_last=False)"
            )
        self._step = 0

    # -- schedule

    def _units(self, epoch: int) -> list:
        """Epoch ``epoch``'s units: example indices, or packed rows (lists of indices)."""
        if self._cached is None or self._cached[0] != epoch:
            order = epoch_permutation(len(self._lengths), self.seed, epoch)
            if self.packing:
                rows = first_fit_rows(self._lengths[order].tolist(), self.seq_length)
                units: list = [[order[j] for j in row] for row in rows]
            else:
                units = order
            self._cached = (epoch, units)
        return self._cached[1]

    def _count_steps(self, n_units: int) -> int:
        if self.drop_last:
            return n_units // self.global_batch_size
        return math.ceil(n_units / self.global_batch_size)

    def __len__(self) -> int:
        """Optimizer steps (global batches) over all epochs."""
        return sum(self._steps_per_epoch)

    def _locate(self, step: int) -> tuple[int, int]:
        """``(epoch, global batch within the epoch)`` of global step ``step``."""
        for epoch, steps in enumerate(self._steps_per_epoch):
            if step < steps:
                return epoch, step
            step -= steps
        return self.epochs, step

    # -- resumption

    def _fingerprint(self) -> dict[str, Any]:
        fp = {
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": len(self._lengths),
            "lengths_crc32": zlib.crc32(self._lengths.tobytes()),  # same data, same tokenizer
            "packing": self.packing,
            "drop_last": self.drop_last,
        }
        if self.packing:
            fp["seq_length"] = self.seq_length
        return fp

    def state_dict(self) -> dict[str, Any]:
        """Data position: ``step`` (global batches handed out), ``epoch``,
        ``step_in_epoch``, plus the settings the schedule depends on (checked on load)."""
        epoch, in_epoch = self._locate(self._step)
        return {
            "step": self._step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            **self._fingerprint(),
        }

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

    # -- batches

    def __iter__(self) -> Iterator[list[Batch]]:
        """This rank's micro-batches of each remaining global batch, in order."""
        g = self.global_batch_size
        share = g // self.dp_size
        while self._step < len(self):
            epoch, k = self._locate(self._step)
            units = self._units(epoch)[k * g : (k + 1) * g]
            mine = units[self.dp_rank * share : (self.dp_rank + 1) * share]
            self._step += 1
            m = self.micro_batch_size
            yield [self._micro_batch(mine[i * m : (i + 1) * m]) for i in range(share // m)]

    def _micro_batch(self, units: list) -> Batch:
        """Rows for ``units`` (example indices, or packed rows of them); missing rows are
        padding (``drop_last=False``)."""
        m, s = self.micro_batch_size, self.seq_length
        tokens = torch.full((m, s), self.pad_id, dtype=torch.long)
        labels = torch.full((m, s), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((m, s), dtype=torch.float32)
        position_ids = torch.arange(s, dtype=torch.long).repeat(m, 1)
        segments = torch.full((m, s), -1, dtype=torch.long)  # -1: padding, its own block
        for row, unit in enumerate(units):
            offset = 0
            for seg, index in enumerate(unit if self.packing else [unit]):
                item = self.dataset[index]
                ids, mask = item["input_ids"], item["loss_mask"]
                n = len(ids)
                end = offset + n
                tokens[row, offset:end] = ids
                labels[row, offset : end - 1] = ids[1:]  # the last label stays pad_id
                loss_mask[row, offset : end - 1] = mask[: n - 1]
                position_ids[row, offset:end] = torch.arange(n)
                segments[row, offset:end] = seg
                offset = end
        attention_mask = None
        if self.packing:
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            same = segments[:, :, None] == segments[:, None, :]
            attention_mask = ~(same & causal)[:, None]
        examples = [tuple(int(i) for i in (unit if self.packing else [unit])) for unit in units]
        examples += [()] * (m - len(units))
        return Batch(
            tokens=tokens,
            labels=labels,
            loss_mask=loss_mask,
            position_ids=position_ids,
            attention_mask=attention_mask,
            examples=tuple(examples),
            real_tokens=int((segments >= 0).sum()),
        )
