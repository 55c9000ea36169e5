"""The validation loss on held-out data (``data.val_files``), every ``train.eval_interval``
steps and at the last step (the paper's trainer: ``val_files``, ``test_freq``).

The held-out records are tokenized like the training data and cut into global batches the
same way (same global and micro batch, the same DP split, the last incomplete batch kept and
filled with empty rows); ``train.eval_batches`` of them (all by default), in a fixed order,
are run forward only (:func:`probsft_megatron.runtime.eval_step`). Reported, summed over the
batches before dividing: ``val_loss`` (the training objective with its normalization and
threshold rule), ``val_nll`` (mean CE of the response tokens, the same for every objective),
``val_mean_p``, ``val_tokens`` (response tokens) and ``val_time_s``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from probsft_megatron import runtime


class Validation:
    """Built once per run (every rank); call it on every rank at the steps :meth:`due` says."""

    def __init__(self, job, tokenizer, layout) -> None:
        from probsft_megatron.data import GlobalBatchLoader, SFTDataset
        from probsft_megatron.data.batches import pad_multiple

        t = job.train
        data = dataclasses.replace(
            job.data, source="file", train_files=list(job.data.val_files), num_samples=None
        )
        dataset = SFTDataset(data, tokenizer)
        self.loader = GlobalBatchLoader(
            dataset,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_rank=layout.dp_rank,
            dp_size=layout.dp,
            seq_length=job.data.max_length,
            seed=t.seed,
            packing=job.data.packing,
            pad_id=tokenizer.pad_token_id,
            drop_last=False,
            padding=job.data.padding,
            pad_multiple=pad_multiple(layout.tp),
            same_length_per_step=layout.pp > 1,
        )
        self.batches = min(len(self.loader), t.eval_batches or len(self.loader))
        self.interval = t.eval_interval
        self.examples = len(dataset)

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or bool(self.interval) and step % self.interval == 0

    def __call__(self, model_chunks: list, head) -> dict[str, Any]:
        """The validation metrics (``val_*``) on the last pipeline stage, ``{}`` elsewhere; a
        collective over the whole job."""
        t0 = time.perf_counter()
        for chunk in model_chunks:
            chunk.eval()
        total: dict[str, float] = {}
        self.loader.load_state_dict({"step": 0})  # the same batches every time
        batches = iter(self.loader)
        try:
            for _ in range(self.batches):
                found = runtime.eval_step(model_chunks, head, next(batches))
                for key, value in found.items():
                    total[key] = total.get(key, 0.0) + value
        finally:
            for chunk in model_chunks:
                chunk.train()
        if not total:
            return {}
        tokens = max(total["response_tokens"], 1)
        return {
            "val_loss": total["loss_sum"] / max(total["count"], 1),
            "val_nll": total["nll_sum"] / tokens,
            "val_mean_p": total["p_sum"] / tokens,
            "val_tokens": int(total["response_tokens"]),
            "val_batches": self.batches,
            "val_time_s": time.perf_counter() - t0,
        }
