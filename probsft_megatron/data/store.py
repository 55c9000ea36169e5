"""The tokenized store: a dataset tokenized once (streamed, in parallel), then memory-mapped.

A store is ``<root>/<key>/``: ``tokens``, ``masks``, ``offsets`` and ``prompt_lengths`` as
``.npy`` files and ``meta.json`` (written last), published by renaming a finished temporary
folder; ``key`` is :func:`fingerprint`. Layout, locking and measurements: docs/data.md."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from probsft_megatron.config import DataConfig
from probsft_megatron.data.chat import load_template
from probsft_megatron.data.examples import SFTDataset
from probsft_megatron.data.records import iter_records
from probsft_megatron.errors import DataError
from probsft_megatron.fileio import atomic_write_json

logger = logging.getLogger(__name__)

STORE_VERSION = 1
TOKEN_INDEPENDENT = frozenset({"seed", "packing", "padding", "cache", "cache_dir"})
"""``data.*`` keys that change no token and no mask (the shuffle, the batch layout, where the
store lives); every other key is part of the fingerprint."""
FILES = ("tokens", "masks", "offsets", "prompt_lengths")
WAIT_TIMEOUT_S = 6 * 3600.0
_SHARD = 2000  # records per task of the parallel tokenization


def store_root(cfg: DataConfig) -> Path:
    """Where stores live: ``data.cache_dir``, else ``<cache>/data`` ($PROBSFT_CACHE)."""
    from probsft_megatron.embedded import default_cache_dir

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir() / "data"


def fingerprint(cfg: DataConfig, tokenizer) -> tuple[str, dict[str, Any]]:
    """``(key, inputs)``: the store's name and everything it was derived from."""
    from probsft_megatron import figfont
    from probsft_megatron.data import chat, examples, records

    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TOKEN_INDEPENDENT}
    files = []
    for name in cfg.train_files if cfg.source == "file" else []:
        path = Path(name).expanduser().resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"data file {name}: {exc.strerror}; check data.train_files") from None
        files.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    # a shipped template's or a .jinja file's text: editing it changes the tokens (auto/none:
    # the tokenizer's template, part of its identity)
    template = None if cfg.chat_template in ("auto", "none") else load_template(cfg.chat_template)
    sources = (inspect.getsource(module) for module in (examples, records, figfont, chat))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a slow tokenizer: its vocabulary
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()))
    inputs = {
        "version": STORE_VERSION,
        "data": settings,
        "files": files,
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "serialized_sha256": hashlib.sha256(serialized.encode()).hexdigest(),
            "size": len(tokenizer),
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "bos": getattr(tokenizer, "bos_token_id", None),
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        # the source of the modules that turn records into tokens and masks
        "code_sha256": hashlib.sha256("".join(sources).encode()).hexdigest(),
        "chat_template_text": template,
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], inputs


def _describe(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape), "bytes": int(array.nbytes)}


def open_store(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``(arrays, meta)`` of the store at ``path``, memory-mapped read-only; None unless a
    complete, undamaged store is there (``meta.json``, each file's dtype, shape and size, the
    offsets' CRC and their agreement with the other files)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in FILES}
        arrays["offsets"] = offsets = np.asarray(arrays["offsets"])  # small: held in memory
        ok = (
            meta["version"] == STORE_VERSION
            and all(_describe(array) == meta["arrays"][name] for name, array in arrays.items())
            and zlib.crc32(offsets.tobytes()) == meta["offsets_crc32"]
            and int(offsets[-1]) == len(arrays["tokens"]) == len(arrays["masks"])
            and len(arrays["prompt_lengths"]) == len(offsets) - 1
        )
        return (arrays, meta) if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


_WORK: dict[str, Any] = {}  # what forked workers read: the config and the tokenizer


def _encode_shard(records: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """A shard's :meth:`SFTDataset.encode_records` arrays and stats."""
    ds = SFTDataset.encoder(_WORK["cfg"], _WORK["tokenizer"])
    return ds.encode_records(records), ds.stats


class _NpyAppender:
    """A 1-D ``.npy`` file written a piece at a time; :meth:`close` rewrites the header with
    the final length (numpy reserves room in it for the length to grow) and fsyncs. A piece
    of a wider dtype (the first loss weight among uint8 0/1 masks) rewrites the file once."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self._header()
        self.data_start = self.file.tell()

    def _header(self) -> None:
        header = np.lib.format.header_data_from_array_1_0(np.empty(0, self.dtype))
        np.lib.format.write_array_header_1_0(self.file, {**header, "shape": (self.n,)})

    def append(self, array: np.ndarray) -> None:
        if not np.can_cast(array.dtype, self.dtype):  # widen: rewrite the pieces so far
            self.close()
            narrow = self.path.with_name(self.path.name + ".u8")
            os.replace(self.path, narrow)
            old = np.load(narrow, mmap_mode="r") if self.n else []
            _NpyAppender.__init__(self, self.path, array.dtype)
            for lo in range(0, len(old), 1 << 24):
                self.append(old[lo : lo + (1 << 24)])
            del old
            narrow.unlink()
        self.file.write(memoryview(np.ascontiguousarray(array, dtype=self.dtype)).cast("B"))
        self.n += len(array)

    def close(self) -> None:
        self.file.seek(0)
        self._header()
        if self.file.tell() != self.data_start:  # cannot happen with numpy's reserved room
            raise RuntimeError(f"the header of {self.path} changed size")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def tokenize_into(
    folder: Path, cfg: DataConfig, tokenizer, num_proc: int | None = None
) -> dict[str, Any]:
    """Tokenize ``cfg``'s records into the store files of ``folder``; returns the ``stats``.
    Shards of ``_SHARD`` records go to ``num_proc`` forked processes (default: the usable CPUs),
    at most two per process in flight, appended in record order (memory holds a few shards)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    num_proc = max(1, num_proc or usable or 1)
    fork = num_proc > 1 and "fork" in multiprocessing.get_all_start_methods()
    tokens = _NpyAppender(folder / "tokens.npy", np.int32)
    masks = _NpyAppender(folder / "masks.npy", np.uint8)
    lengths: list[np.ndarray] = []
    prompt_lengths: list[np.ndarray] = []
    stats: collections.Counter = collections.Counter()
    n_records, processes = 0, 1 + (num_proc - 1) * fork
    t0 = last_note = time.perf_counter()

    def note() -> None:
        rate = n_records / max(time.perf_counter() - t0, 1e-9)
        logger.info(
            "tokenized %d records (%.0f records/s, %d processes)", n_records, rate, processes
        )

    def take(arrays: dict[str, np.ndarray], shard_stats: dict[str, int]) -> None:
        nonlocal last_note
        tokens.append(arrays["tokens"])
        masks.append(arrays["masks"])
        lengths.append(np.diff(arrays["offsets"]))
        prompt_lengths.append(arrays["prompt_lengths"])
        stats.update(shard_stats)
        if time.perf_counter() - last_note > 30:
            note()
            last_note = time.perf_counter()

    _WORK.update(cfg=cfg, tokenizer=tokenizer)
    pool, pending = None, collections.deque()
    try:
        if fork:
            # forked workers must not start the tokenizer's own thread pool
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = multiprocessing.get_context("fork").Pool(num_proc)
        records = iter_records(cfg)
        for shard in iter(lambda: list(itertools.islice(records, _SHARD)), []):
            n_records += len(shard)
            if pool is None:
                take(*_encode_shard(shard))
                continue
            pending.append(pool.apply_async(_encode_shard, (shard,)))
            del shard  # held by its task only
            while len(pending) >= 2 * num_proc:
                take(*pending.popleft().get())
        while pending:
            take(*pending.popleft().get())
        if pool is not None:
            # close + join, not terminate: forked workers inherit the trainer's SIGTERM
            # handler, and terminate() hung joining an idle worker that caught the signal
            pool.close()
            pool.join()
            pool = None
    finally:
        _WORK.clear()
        if pool is not None:
            pool.terminate()
        for appender in (tokens, masks):
            if not appender.file.closed:
                appender.close()
    lengths_all = np.concatenate([np.zeros(0, np.int64), *lengths])
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    np.save(folder / "offsets.npy", offsets, allow_pickle=False)
    prompts = np.concatenate([np.zeros(0, np.int64), *prompt_lengths])
    np.save(folder / "prompt_lengths.npy", prompts, allow_pickle=False)
    ds = SFTDataset.encoder(cfg, tokenizer)
    ds.stats.update({k: v for k, v in stats.items() if k in ds.stats})
    ds.finish(len(lengths_all), int(offsets[-1]), n_records)
    note()
    return ds.stats


def _build(cfg: DataConfig, tokenizer, final: Path, inputs: dict, num_proc: int | None) -> None:
    """Tokenize ``cfg``'s records and publish them as the store ``final``; when another
    process published it first, that store is kept and this one discarded."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    logger.info("tokenizing the records into the store %s", final)
    try:
        stats = tokenize_into(tmp, cfg, tokenizer, num_proc)
        arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r") for name in FILES}
        meta = {
            "version": STORE_VERSION,
            "key": final.name,
            "inputs": inputs,
            "stats": stats,
            "arrays": {name: _describe(array) for name, array in arrays.items()},
            "offsets_crc32": zlib.crc32(np.asarray(arrays["offsets"]).tobytes()),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        del arrays
        atomic_write_json(tmp / "meta.json", meta)
        for file in tmp.iterdir():  # on disk before the store is published
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if open_store(final) is None:
                raise
            logger.info("another process published %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        f"store {final}: {stats['n_examples']} examples, {stats['n_tokens']} tokens, "
        f"built in {time.perf_counter() - t0:.1f} s"
    )


def open_dataset(
    cfg: DataConfig,
    tokenizer,
    *,
    builder: bool = True,
    num_proc: int | None = None,
    timeout_s: float = WAIT_TIMEOUT_S,
) -> SFTDataset:
    """The tokenized dataset of ``cfg``, mapped from its store (built first when needed).
    ``builder`` (local rank 0): may build the store, under a file lock beside it; other
    processes wait up to ``timeout_s`` for it. ``data.cache: false``: tokenized in memory."""
    if not cfg.cache:
        return SFTDataset(cfg, tokenizer)
    root = store_root(cfg)
    key, inputs = fingerprint(cfg, tokenizer)
    path = root / key
    opened = open_store(path)
    if opened is None and builder:
        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f".{key}.lock")):
            opened = open_store(path)
            if opened is None:
                if path.exists():  # renamed first, so no reader maps half of it
                    logger.warning(
                        "the tokenized store %s is incomplete or damaged; rebuilding", path
                    )
                    trash = path.with_name(f".{key}.damaged.{os.getpid()}.{time.time_ns()}")
                    os.rename(path, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                _build(cfg, tokenizer, path, inputs, num_proc)
                opened = open_store(path)
    elif opened is None:
        t0 = last = time.monotonic()
        logger.info("waiting for the tokenized store %s (built by local rank 0)", path)
        while opened is None:
            now = time.monotonic()
            if now - t0 > timeout_s:
                raise DataError(
                    f"the tokenized store {path} did not appear within {timeout_s:.0f} s; "
                    "build it first with `probsft data prepare --config RECIPE` (on a cluster: "
                    "put data.cache_dir or $PROBSFT_CACHE on a filesystem every node sees)"
                )
            if now - last > 60:
                logger.info("still waiting for %s (%.0f s)", path, now - t0)
                last = now
            time.sleep(1.0)
            opened = open_store(path)
    if opened is None:
        raise DataError(f"the tokenized store {path} could not be read back after building it")
    arrays, meta = opened
    ds = SFTDataset.from_arrays(cfg, tokenizer, arrays, meta["stats"])
    ds.store_path = path
    return ds
