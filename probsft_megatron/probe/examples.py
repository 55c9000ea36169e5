"""What the probe measures (:func:`load_examples`) and how a measurement is recognised
again (:func:`probe_key`: model fingerprint, dtype, exact tokens; :func:`read_cached`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from probsft_megatron.embedded import default_cache_dir
from probsft_megatron.errors import CheckpointError, ConfigError
from probsft_megatron.probe.report import FORMAT_VERSION, REPORT_FILE

DEFAULT_SAMPLES = 512
"""Examples probed when no count is given (also what ``loss.objective: auto`` probes)."""


@dataclasses.dataclass
class ProbeExamples:
    """The tokenized sample (an SFTDataset) and each example's record ``origin`` (None for all
    when the data config dropped records: the correspondence is lost)."""

    dataset: Any
    origins: list[str | None]
    records_available: int
    data_config: Any

    def fingerprint(self) -> str:
        """sha256 of every example's tokens and which of them are measured."""
        h = hashlib.sha256()
        for i in range(len(self.dataset)):
            item = self.dataset[i]
            h.update(item["input_ids"].numpy().astype(np.int64).tobytes())
            h.update((item["loss_mask"].numpy() > 0).astype(np.uint8).tobytes())
        return h.hexdigest()


def load_examples(data_cfg, tokenizer, samples: int | None = DEFAULT_SAMPLES) -> ProbeExamples:
    """Tokenize ``samples`` examples of ``data_cfg`` (None: all) as training does: a seeded
    random choice of records in file order (figfont: the first ``samples`` generated)."""
    from probsft_megatron.data import SFTDataset, load_records

    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1 (got {samples})")
    cfg = data_cfg
    if cfg.source == "figfont" and samples is not None:
        cfg = dataclasses.replace(cfg, num_samples=min(cfg.num_samples or samples, samples))
    records = load_records(cfg)
    available = len(records)
    if samples is not None and available > samples:
        keep = sorted(random.Random(f"probsft-probe:{cfg.seed}").sample(range(available), samples))
        records = [records[i] for i in keep]
    dataset = SFTDataset(cfg, tokenizer, records=records)
    origins: list[str | None] = (
        [r["origin"] for r in records] if len(dataset) == len(records) else [None] * len(dataset)
    )
    return ProbeExamples(dataset, origins, available, cfg)


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of a Megatron model dir's config and weight metadata (names, sizes, mtimes): no
    weight is read; a re-converted or retrained model changes it."""
    root = Path(model_dir)
    cfg_file = root / "model_config.json"
    weights = root / "weights"
    if not cfg_file.is_file() or not (weights / "metadata.json").is_file():
        raise CheckpointError(
            f"{root} is not a Megatron model dir (needs model_config.json and "
            "weights/metadata.json); convert it with `probsft convert "
            "hf-to-megatron`"
        )
    h = hashlib.sha256(cfg_file.read_bytes())
    for f in sorted(p for p in weights.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(weights)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if f.name in ("metadata.json", ".metadata"):
            h.update(f.read_bytes())
    return h.hexdigest()


def probe_key(model_dir: str | os.PathLike, dtype: str, examples: ProbeExamples) -> str:
    """Cache key of a probe: the model's fingerprint, the dtype and the exact tokens."""
    ident = {
        "format_version": FORMAT_VERSION,
        "model": model_fingerprint(model_dir),
        "dtype": dtype,
        "tokens": examples.fingerprint(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """``<probsft cache>/probe``: one folder per probe key with report.json and probe.png."""
    return default_cache_dir() / "probe"


def read_cached(key: str) -> dict | None:
    """The cached report of ``key``, or None."""
    path = cache_dir() / key / REPORT_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("key") == key else None
