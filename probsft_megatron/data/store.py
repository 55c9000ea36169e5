"""The tokenized store: a dataset tokenized once, then memory-mapped by every rank.

A store is a folder ``<root>/<key>/`` of numpy ``.npy`` files (``np.save``; read with
``np.load(mmap_mode="r")``, as megatron's indexed datasets map their ``.bin``/``.idx``):

* ``tokens.npy`` int32 ``[T]``: every example's tokens, concatenated;
* ``masks.npy`` uint8 (0/1) or float32 (loss weights) ``[T]``: the loss masks, aligned;
* ``offsets.npy`` int64 ``[N + 1]``: example ``i`` is ``[offsets[i], offsets[i + 1])``;
* ``prompt_lengths.npy`` int64 ``[N]``;
* ``meta.json`` (written last): the fingerprint's inputs, the dataset's ``stats``, every
  file's dtype, shape and size, and the CRC-32 of ``offsets``.

``key`` is the fingerprint (:func:`fingerprint`): a hash of every ``data.*`` setting that
changes tokens or masks (the whole :class:`~probsft_megatron.config.DataConfig` minus
:data:`TOKEN_INDEPENDENT`, so a key added later is covered), each data file's path, size and
modification time, the tokenizer (its full serialization, special tokens and chat template),
and the source of the modules that render and mask records.

Building (:func:`build_store`) tokenizes in ``num_proc`` forked processes, writes into
``<root>/.<key>.<random>.tmp/`` and renames that folder to ``<root>/<key>/``: a reader sees a
whole store or none. Opening (:func:`open_store`) checks ``meta.json``, the files' sizes,
dtypes and shapes and the offsets' CRC; a partial or damaged store is rebuilt.

Several processes (:func:`open_dataset`): a *builder* (training passes local rank 0 of each
node) takes a file lock next to the store, builds it if no valid store exists, and maps it;
every other process waits for the published store and maps it read-only. On a shared
filesystem one node's builder builds and the others find it done once they hold the lock;
without one, each node builds its own copy in its own cache folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
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
from probsft_megatron.data.examples import SFTDataset
from probsft_megatron.data.records import load_records
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


def _tokenizer_identity(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a slow tokenizer: its vocabulary
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "serialized_sha256": hashlib.sha256(serialized.encode()).hexdigest(),
        "size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def _code_identity() -> str:
    """The source of the modules that turn records into tokens and masks."""
    from probsft_megatron import figfont
    from probsft_megatron.data import examples, records

    modules = [examples, records, figfont]
    try:
        from probsft_megatron.data import chat

        modules.append(chat)
    except ImportError:
        pass
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def _template_text(cfg: DataConfig) -> str | None:
    """The Jinja text ``data.chat_template`` names (None for ``auto``/``none``, whose
    template is the tokenizer's and part of its identity)."""
    from probsft_megatron.data.chat import load_template

    return None if cfg.chat_template in ("auto", "none") else load_template(cfg.chat_template)


def fingerprint(cfg: DataConfig, tokenizer) -> tuple[str, dict[str, Any]]:
    """``(key, inputs)``: the store's name and everything it was derived from."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TOKEN_INDEPENDENT}
    files = []
    for name in cfg.train_files if cfg.source == "file" else []:
        path = Path(name).expanduser().resolve()
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"data file {name}: {exc.strerror}; check data.train_files") from None
        files.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    inputs = {
        "version": STORE_VERSION,
        "data": settings,
        "files": files,
        "tokenizer": _tokenizer_identity(tokenizer),
        "code_sha256": _code_identity(),
        # a shipped template's or a .jinja file's text: editing it changes the tokens
        "chat_template_text": _template_text(cfg),
    }
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], inputs


# -- reading ------------------------------------------------------------------------------------


def _arrays_meta(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        name: {"dtype": str(a.dtype), "shape": list(a.shape), "bytes": int(a.nbytes)}
        for name, a in arrays.items()
    }


def open_store(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """``(arrays, meta)`` of the store at ``path``, memory-mapped read-only; None when there
    is no complete, undamaged store there (missing or unreadable ``meta.json``, a file of the
    wrong size, dtype or shape, offsets that do not match their CRC or the tokens)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != STORE_VERSION:
            return None
        arrays = {}
        for name in FILES:
            want = meta["arrays"][name]
            file = path / f"{name}.npy"
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            if (
                str(array.dtype) != want["dtype"]
                or list(array.shape) != want["shape"]
                or int(array.nbytes) != want["bytes"]
            ):
                return None
            arrays[name] = array
        offsets = np.asarray(arrays["offsets"])
        if zlib.crc32(offsets.tobytes()) != meta["offsets_crc32"]:
            return None
        n = len(offsets) - 1
        if int(offsets[-1]) != len(arrays["tokens"]) or len(arrays["prompt_lengths"]) != n:
            return None
        if len(arrays["masks"]) != len(arrays["tokens"]):
            return None
        arrays["offsets"] = offsets  # small: held in memory
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- building -----------------------------------------------------------------------------------

_WORK: dict[str, Any] = {}  # what forked workers read: config, tokenizer, records


def _encode_shard(bounds: tuple[int, int]):
    cfg, tokenizer, records = _WORK["cfg"], _WORK["tokenizer"], _WORK["records"]
    ds = SFTDataset.__new__(SFTDataset)
    ds._setup(cfg, tokenizer)
    tokens, masks, lengths = ds.encode_records(records[bounds[0] : bounds[1]])
    return tokens.astype(np.int32), masks, lengths, ds.stats


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenize_parallel(
    cfg: DataConfig, tokenizer, records: list[dict], num_proc: int | None = None
) -> SFTDataset:
    """:class:`SFTDataset` of ``records``, tokenized in ``num_proc`` forked processes (default:
    the CPUs this process may use); the same examples and stats as ``SFTDataset(cfg,
    tokenizer, records)``."""
    num_proc = max(1, min(num_proc or available_cpus(), -(-len(records) // _SHARD)))
    shards = [(lo, min(lo + _SHARD, len(records))) for lo in range(0, len(records), _SHARD)]
    _WORK.update(cfg=cfg, tokenizer=tokenizer, records=records)
    t0 = time.perf_counter()
    parts = []
    try:
        if num_proc == 1 or "fork" not in multiprocessing.get_all_start_methods():
            results = map(_encode_shard, shards)
            pool = None
        else:
            # forked workers must not start the tokenizer's own thread pool
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = multiprocessing.get_context("fork").Pool(num_proc)
            results = pool.imap(_encode_shard, shards)
        done = 0
        last_note = t0
        for (lo, hi), part in zip(shards, results):
            parts.append(part)
            done += hi - lo
            now = time.perf_counter()
            if now - last_note > 30 or done == len(records):
                logger.info(
                    "tokenized %d/%d records (%.0f records/s, %d processes)",
                    done,
                    len(records),
                    done / max(now - t0, 1e-9),
                    num_proc,
                )
                last_note = now
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        _WORK.clear()
    ds = SFTDataset.__new__(SFTDataset)
    ds._setup(cfg, tokenizer)
    for part in parts:
        for key, value in part[3].items():
            if key not in ("n_examples", "n_tokens", "n_response_tokens"):
                ds.stats[key] = ds.stats.get(key, 0) + value
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    tokens, masks, lengths = (np.concatenate([p[i] for p in parts] or [empty[i]]) for i in range(3))
    del parts
    ds._attach(tokens, masks, lengths, len(records))
    return ds


def build_store(
    cfg: DataConfig,
    tokenizer,
    *,
    root: Path | None = None,
    num_proc: int | None = None,
    key_inputs: tuple[str, dict] | None = None,
) -> Path:
    """Tokenize ``cfg``'s records and publish the store; returns its folder. When another
    process published the same store first, its store is kept and this one discarded."""
    root = store_root(cfg) if root is None else root
    key, inputs = key_inputs or fingerprint(cfg, tokenizer)
    final = root / key
    t0 = time.perf_counter()
    records = load_records(cfg)
    logger.info("tokenizing %d records into the store %s", len(records), final)
    ds = tokenize_parallel(cfg, tokenizer, records, num_proc)
    del records
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    try:
        arrays = ds.arrays()
        for name in FILES:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arrays[name]), allow_pickle=False)
        meta = {
            "version": STORE_VERSION,
            "key": key,
            "inputs": inputs,
            "stats": ds.stats,
            "arrays": _arrays_meta(arrays),
            "offsets_crc32": zlib.crc32(np.asarray(arrays["offsets"]).tobytes()),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
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
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "store %s: %d examples, %d tokens, built in %.1f s",
        final,
        ds.stats["n_examples"],
        ds.stats["n_tokens"],
        time.perf_counter() - t0,
    )
    return final


def _discard(path: Path) -> None:
    """Move a damaged store out of the way (rename first, so no reader maps half of it)."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.damaged.{os.getpid()}.{time.time_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def open_dataset(
    cfg: DataConfig,
    tokenizer,
    *,
    builder: bool = True,
    num_proc: int | None = None,
    timeout_s: float = WAIT_TIMEOUT_S,
) -> SFTDataset:
    """The tokenized dataset of ``cfg``, mapped from its store (built first when needed).

    ``builder``: this process may build the store (one per node: training passes local rank
    0); it takes a file lock beside the store, so builders that share a filesystem build it
    once. Other processes wait up to ``timeout_s`` for a valid store to appear. With
    ``data.cache: false`` the records are tokenized in this process and nothing is written.
    """
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
                if path.exists():
                    logger.warning(
                        "the tokenized store %s is incomplete or damaged; rebuilding", path
                    )
                    _discard(path)
                build_store(cfg, tokenizer, root=root, num_proc=num_proc, key_inputs=(key, inputs))
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
