"""The validation loss on ``data.val_files`` every ``train.eval_interval`` steps and at the end:
sums over ``train.eval_batches`` global batches (cut like the training data, last one kept)."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

from probsft_megatron import runtime


def global_batches(job, dataset, layout, pad_id: int, **kwargs):
    """The job's ``GlobalBatchLoader`` over ``dataset`` for this rank's ``layout``."""
    from probsft_megatron.data import GlobalBatchLoader
    from probsft_megatron.data.batches import pad_multiple

    t = job.train
    return GlobalBatchLoader(
        dataset,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_rank=layout.dp_rank,
        dp_size=layout.dp,
        seq_length=job.data.max_length,
        seed=t.seed,
        packing=job.data.packing,
        pad_id=pad_id,
        padding=job.data.padding,
        pad_multiple=pad_multiple(layout.tp),
        same_length_per_step=layout.pp > 1,  # stages exchange fixed-shape tensors
        **kwargs,
    )


class Validation:
    """Built once per run (every rank); call it on every rank at the steps :meth:`due` says."""

    def __init__(self, job, tokenizer, layout) -> None:
        from probsft_megatron.data import SFTDataset

        data = dataclasses.replace(
            job.data, source="file", train_files=list(job.data.val_files), num_samples=None
        )
        dataset = SFTDataset(data, tokenizer)
        self.loader = global_batches(job, dataset, layout, tokenizer.pad_token_id, drop_last=False)
        self.batches = min(len(self.loader), job.train.eval_batches or len(self.loader))
        self.interval = job.train.eval_interval

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or bool(self.interval) and step % self.interval == 0

    def __call__(self, model_chunks: list, head) -> dict[str, Any]:
        """The ``val_*`` metrics on the last stage, ``{}`` elsewhere (a collective)."""
        t0 = time.perf_counter()
        for chunk in model_chunks:
            chunk.eval()
        total: Counter[str] = Counter()
        self.loader.load_state_dict({"step": 0})  # the same batches every time
        batches = iter(self.loader)
        try:
            for _ in range(self.batches):
                total.update(runtime.eval_step(model_chunks, head, next(batches)))
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
