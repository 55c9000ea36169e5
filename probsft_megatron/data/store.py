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

Building (:func:`build_store`, :func:`tokenize_into`) streams the records (a JSON-lines or
parquet file is read a line or a batch at a time) in shards to ``num_proc`` forked processes,
a bounded number of shards in flight, and appends each tokenized shard, in record order, to
the ``.npy`` files in ``<root>/.<key>.<random>.tmp/`` (numpy reserves room in a ``.npy``
header for the length to grow; the header is rewritten once at the end). Memory holds a few
shards and the index (offsets, prompt lengths: 16 bytes per example), whatever the size of
the dataset. The folder is then renamed to ``<root>/<key>/``: a reader sees a whole store or
none. Opening (:func:`open_store`) checks ``meta.json``, the files' sizes,
dtypes and shapes and the offsets' CRC; a partial or damaged store is rebuilt.

Several processes (:func:`open_dataset`): a *builder* (training passes local rank 0 of each
node) takes a file lock next to the store, builds it if no valid store exists, and maps it;
every other process waits for the published store and maps it read-only. On a shared
filesystem one node's builder builds and the others find it done once they hold the lock;
without one, each node builds its own copy in its own cache folder.
"""

from __future__ import annotations

import collections
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
from probsft_megatron.data.examples import SFTDataset, _prompt_lengths
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

_WORK: dict[str, Any] = {}  # what forked workers read: the config and the tokenizer


def _encode_shard(records: list[dict]):
    """A shard's examples: tokens (int32), loss masks (uint8 when 0/1, else float32), tokens
    per kept example, prompt lengths, and the shard's stats."""
    ds = SFTDataset.__new__(SFTDataset)
    ds._setup(_WORK["cfg"], _WORK["tokenizer"])
    tokens, masks, lengths = ds.encode_records(records)
    ds.stats["n_response_tokens"] = int((masks > 0).sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prompt_lengths = _prompt_lengths(masks, offsets)
    binary = bool(np.all((masks == 0) | (masks == 1)))
    return (
        tokens.astype(np.int32),
        masks.astype(np.uint8) if binary else masks,
        lengths,
        prompt_lengths,
        ds.stats,
    )


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _NpyAppender:
    """A 1-D ``.npy`` file written a piece at a time: the header first (numpy reserves room in
    it for the length to grow), the data appended, the header rewritten with the final
    length on :meth:`close` (then flushed to disk)."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self._header()
        self.data_start = self.file.tell()

    def _header(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n,),
        }
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, array: np.ndarray) -> None:
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


class _MaskAppender(_NpyAppender):
    """Loss masks: uint8 while every value is 0/1, float32 (rewritten once) from the first
    loss weight on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, np.uint8)

    def append(self, array: np.ndarray) -> None:
        if self.dtype == np.uint8 and array.dtype != np.uint8:
            self._widen()
        super().append(array)

    def _widen(self) -> None:
        super().close()  # the 0/1 masks so far, a whole .npy file
        narrow = self.path.with_name(self.path.name + ".u8")
        os.replace(self.path, narrow)
        old = np.load(narrow, mmap_mode="r") if self.n else np.zeros(0, np.uint8)
        n, self.dtype, self.n = self.n, np.dtype(np.float32), 0
        self.file = open(self.path, "wb")
        self._header()
        for lo in range(0, n, 1 << 24):
            super().append(old[lo : lo + (1 << 24)])
        del old
        narrow.unlink()


def _shards(records, size: int):
    shard: list[dict] = []
    for record in records:
        shard.append(record)
        if len(shard) == size:
            yield shard
            shard = []
    if shard:
        yield shard


def tokenize_into(
    folder: Path, cfg: DataConfig, tokenizer, num_proc: int | None = None
) -> dict[str, Any]:
    """Tokenize ``cfg``'s records into the store files of ``folder`` and return the dataset's
    ``stats``. Records are streamed (:func:`iter_records`) in shards of ``_SHARD`` to
    ``num_proc`` forked processes (default: the CPUs this process may use), at most two
    shards per process in flight, and each finished shard is appended to the files in record
    order: memory holds a few shards and the index (offsets, prompt lengths), whatever the
    size of the dataset."""
    num_proc = max(1, num_proc or available_cpus())
    fork = num_proc > 1 and "fork" in multiprocessing.get_all_start_methods()
    tokens = _NpyAppender(folder / "tokens.npy", np.int32)
    masks = _MaskAppender(folder / "masks.npy")
    lengths: list[np.ndarray] = []
    prompt_lengths: list[np.ndarray] = []
    stats: dict[str, int] = {}
    n_records = 0
    t0 = last_note = time.perf_counter()

    def take(part) -> None:
        nonlocal last_note
        tokens.append(part[0])
        masks.append(part[1])
        lengths.append(part[2])
        prompt_lengths.append(part[3])
        for key, value in part[4].items():
            stats[key] = stats.get(key, 0) + value
        now = time.perf_counter()
        if now - last_note > 30:
            logger.info(
                "tokenized %d records (%.0f records/s, %d processes)",
                n_records,
                n_records / max(now - t0, 1e-9),
                num_proc if fork else 1,
            )
            last_note = now

    _WORK.update(cfg=cfg, tokenizer=tokenizer)
    pool = None
    try:
        shards = _shards(iter_records(cfg), _SHARD)
        if not fork:
            for shard in shards:
                n_records += len(shard)
                take(_encode_shard(shard))
        else:
            # forked workers must not start the tokenizer's own thread pool
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = multiprocessing.get_context("fork").Pool(num_proc)
            pending: collections.deque = collections.deque()
            for shard in shards:
                n_records += len(shard)
                pending.append(pool.apply_async(_encode_shard, (shard,)))
                del shard
                while len(pending) >= 2 * num_proc:
                    take(pending.popleft().get())
            while pending:
                take(pending.popleft().get())
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
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    np.save(folder / "offsets.npy", offsets, allow_pickle=False)
    np.save(
        folder / "prompt_lengths.npy",
        np.concatenate(prompt_lengths).astype(np.int64) if prompt_lengths else lengths_all,
        allow_pickle=False,
    )
    ds = SFTDataset.__new__(SFTDataset)
    ds._setup(cfg, tokenizer)
    ds.stats.update({k: v for k, v in stats.items() if k in ds.stats})
    if not len(lengths_all):
        raise DataError(
            f"no usable examples among {n_records} records "
            f"(dropped: {ds.stats['n_dropped']}); raise data.max_length"
        )
    ds.stats.update(n_examples=len(lengths_all), n_tokens=int(offsets[-1]))
    ds._warn(n_records)
    logger.info(
        "tokenized %d records (%.0f records/s, %d processes)",
        n_records,
        n_records / max(time.perf_counter() - t0, 1e-9),
        num_proc if fork else 1,
    )
    return ds.stats


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
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    logger.info("tokenizing the records into the store %s", final)
    try:
        stats = tokenize_into(tmp, cfg, tokenizer, num_proc)
        arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r") for name in FILES}
        meta = {
            "version": STORE_VERSION,
            "key": key,
            "inputs": inputs,
            "stats": stats,
            "arrays": _arrays_meta(arrays),
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
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "store %s: %d examples, %d tokens, built in %.1f s",
        final,
        stats["n_examples"],
        stats["n_tokens"],
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
