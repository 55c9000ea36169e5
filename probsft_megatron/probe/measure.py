"""The base model forward-only over the probe sample, distributed like training: the last
stage keeps each example's response-token CE, the DP ranks all-gather it, one last-stage rank
builds the report and broadcasts it to every rank; global rank 0 writes the files."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from probsft_megatron import compat, cpu_backend, runtime
from probsft_megatron.config import LossConfig, ParallelConfig, resolve_precision
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import ObjectiveLoss
from probsft_megatron.model_dir import read_model_config
from probsft_megatron.probe.examples import (
    DEFAULT_SAMPLES,
    ProbeExamples,
    cache_dir,
    load_examples,
    probe_key,
    read_cached,
)
from probsft_megatron.probe.report import build_probe_report, write_outputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""Model precisions. The cross entropy itself is float32 in every case (megatron's
vocab-parallel CE casts the logits), so float64 bounds the error of p by that CE (~5e-7)."""


def broadcast(obj: Any, src: int) -> Any:
    """``obj`` of rank ``src`` on every rank (a collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_probe(
    examples: ProbeExamples,
    *,
    model_dir: str | os.PathLike,
    parallel: ParallelConfig,
    dtype: str,
    key: str,
    micro_batch_size: int,
    model_chunks: list | None = None,
    implementation: str = "unfused",
    chunk_size: int = 4096,
) -> dict[str, Any]:
    """Measure ``model_dir`` (``model_chunks``: this rank's stage of it, already built) and
    report (collective: every rank, after megatron's groups exist, same ``examples``; see the
    module docstring); global rank 0 caches the report under ``key``. Every rank returns it."""
    from tqdm import tqdm

    from probsft_megatron.data import GlobalBatchLoader, pad_multiple
    from probsft_megatron.data.batches import round_up
    from probsft_megatron.model import build_gpt_model, transformer_config

    model = read_model_config(model_dir)
    if not model_chunks:  # this rank's stage of the model in model_dir, weights loaded (resharded)
        tconfig = transformer_config(model, parallel, params_dtype=DTYPES[dtype])
        gpt = build_gpt_model(model, tconfig).to(cpu_backend.device())
        runtime.load_model_weights(gpt, str(Path(model_dir) / "weights"))
        model_chunks = [gpt.eval()]
    start = time.perf_counter()
    dataset = examples.dataset
    n = len(dataset)
    lay = compat.rank_position()
    last = runtime.is_last_stage()
    mbs = max(1, min(micro_batch_size, -(-n // lay.dp)))
    per_call = max(1, min(4 * lay.pp, -(-n // (mbs * lay.dp))))
    seq_length = round_up(int(dataset.lengths.max()), 8 * lay.tp)
    loader = GlobalBatchLoader(
        dataset,
        global_batch_size=mbs * lay.dp * per_call,
        micro_batch_size=mbs,
        dp_rank=lay.dp_rank,
        dp_size=lay.dp,
        seq_length=seq_length,
        seed=examples.data_config.seed,
        pad_id=dataset.pad_id,
        drop_last=False,
        pad_multiple=pad_multiple(lay.tp),
        same_length_per_step=lay.pp > 1,
    )
    loss = ObjectiveLoss(LossConfig(implementation=implementation, chunk_size=chunk_size))
    step = runtime.loss_head(loss, cpu_backend.device())
    progress = tqdm(
        total=len(loader),
        desc="probe",
        unit="batch",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=dist.get_rank() != 0,
    )
    local: dict[int, np.ndarray] = {}
    tokens = 0
    for micro_batches in loader:
        rows = runtime.measure_token_ce(model_chunks, micro_batches, step)
        if last:
            owners = [row for batch in micro_batches for row in batch.examples]
            if len(rows) != len(owners):
                raise RuntimeError(
                    f"the probe measured {len(rows)} rows for {len(owners)} scheduled rows"
                )
            for owner, ce in zip(owners, rows):
                if owner:  # padding rows hold no example
                    local[owner[0]] = ce.to(torch.float64).cpu().numpy()
        tokens += sum(batch.real_tokens for batch in micro_batches)
        progress.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f} (rank 0)")
        progress.update(1)
    progress.close()
    del model_chunks
    merged: dict[int, np.ndarray] = {}
    if last:
        parts: list[Any] = [None] * lay.dp
        dist.all_gather_object(parts, local, group=compat.data_parallel_group())
        merged = {i: ce for part in parts for i, ce in part.items()}
    reporter = last and lay.dp_rank == 0 and lay.tp_rank == 0
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, reporter)
    report = None
    if reporter:
        report = build_probe_report(
            merged,
            examples,
            model_dir=model_dir,
            model=model,
            dtype=dtype,
            key=key,
            layout={"tp": lay.tp, "pp": lay.pp, "dp": lay.dp},
            elapsed_s=time.perf_counter() - start,
        )
    report = broadcast(report, flags.index(True))
    if dist.get_rank() == 0:
        write_outputs(report, cache_dir() / key)
    return report


def probe(
    model_dir: str | os.PathLike,
    data_cfg,
    *,
    tokenizer: str | None = None,
    samples: int | None = DEFAULT_SAMPLES,
    parallel: ParallelConfig | None = None,
    micro_batch_size: int = 4,
    dtype: str = "auto",
    out_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Probe the Megatron model dir ``model_dir`` on ``data_cfg`` and return the report
    (collective; starts and shuts down megatron's groups unless they exist with the same
    ``parallel``), cached by :func:`probe_key` unless ``use_cache=False``; global rank 0 also
    writes report.json and probe.png into ``out_dir``."""
    from probsft_megatron.tokenizers import load_tokenizer

    parallel = parallel or ParallelConfig()
    model = read_model_config(model_dir)
    dtype = resolve_precision("auto") if dtype == "auto" else dtype  # training's precision
    if dtype not in DTYPES:
        raise ConfigError(f"probe dtype {dtype!r} is invalid; use auto, {', '.join(DTYPES)}")
    if micro_batch_size < 1:
        raise ConfigError(f"micro batch size must be >= 1 (got {micro_batch_size})")
    hf = Path(model_dir) / "hf"
    if tokenizer is None and not hf.is_dir():
        raise ConfigError(
            f"{model_dir} has no hf/ folder with tokenizer files; pass a tokenizer "
            "(--tokenizer DIR or 'smollm2')"
        )
    was_active = cpu_backend.is_active()
    own = not compat.model_parallel_is_initialized()
    if own:
        runtime.init_distributed(parallel, model=model)
    else:
        lay = compat.rank_position()
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if (lay.tp, lay.pp) != (tp, pp):
            raise ConfigError(
                f"the probe was asked for TP={tp} PP={pp} but this job's groups "
                f"are TP={lay.tp} PP={lay.pp}"
            )
    try:
        examples = load_examples(data_cfg, load_tokenizer(tokenizer or str(hf)), samples)
        key = probe_key(model_dir, dtype, examples)
        report = broadcast(read_cached(key) if use_cache and dist.get_rank() == 0 else None, 0)
        if report is None:
            report = run_probe(
                examples,
                model_dir=model_dir,
                parallel=parallel,
                dtype=dtype,
                key=key,
                micro_batch_size=micro_batch_size,
            )
        if out_dir is not None and dist.get_rank() == 0:
            write_outputs(report, out_dir)
        dist.barrier()
    finally:
        if own:
            runtime.shutdown()
            if not was_active:
                cpu_backend.deactivate()
    return report
