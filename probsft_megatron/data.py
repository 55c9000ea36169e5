"""SFT data for ``probsft train``: records, tokenized examples, global batches.

Three stages, each usable on its own:

* :func:`load_records` reads prompt/response strings from local ``.jsonl`` / ``.json`` /
  ``.parquet`` files (or generates the figlet-font task offline).
* :class:`SFTDataset` tokenizes them (chat template or plain concatenation), truncates to
  ``max_length`` and marks the tokens the loss is taken on.
* :class:`GlobalBatchLoader` turns the examples into deterministic, data-parallel-sharded,
  resumable global batches of :class:`~probsft_megatron.runtime.Batch` micro-batches,
  plain (one example per row, right-padded) or packed (several examples per row with a
  block-diagonal causal attention mask).

Loss-mask convention (everywhere in this module): ``loss_mask[t] == 1`` iff the *next*
token ``input_ids[t + 1]`` is a response token (the end-of-sequence token that ends the
response included), so with ``labels[t] = input_ids[t + 1]`` the loss is exactly the
response tokens' negative log-likelihood. The last position of an example is never
trained (its label would belong to the next example or to padding).

Full behaviour, field presets and decisions: ``docs/data.md``.
"""
from __future__ import annotations

import json
import logging
import math
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.runtime import Batch

logger = logging.getLogger(__name__)

SOURCES = ("file", "figfont")
FORMATS = ("auto", "jsonl", "parquet", "numina", "m23k")
TRUNCATIONS = ("right", "error")
_TOKENIZE_CHUNK = 1024  # examples tokenized per call (bounds the Python-int lists in memory)


@dataclass
class DataConfig:
    """Where the SFT examples come from and how they are tokenized (the ``data.*`` keys)."""

    source: str = "file"
    """``file`` (``train_files``) or ``figfont`` (generated offline, no files needed)."""
    train_files: list[str] = field(default_factory=list)
    """Local ``.jsonl`` / ``.json`` / ``.parquet`` files, read in this order."""
    format: str = "auto"
    """``auto`` (by extension, fields from the keys below), ``jsonl``, ``parquet``, or a
    field preset: ``numina`` (NuminaMath-CoT) or ``m23k`` (the paper's medical set)."""
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: list[str] | None = None
    """When ``prompt_key`` holds a dict, the nested keys to follow (outermost first)."""
    response_dict_keys: list[str] | None = None
    chat_template: str = "auto"
    """``auto`` (the tokenizer's template if it has one), ``none``, or a Jinja template."""
    system_prompt: str | None = None
    """System message of the chat template (needs a template)."""
    max_length: int = 1024
    """Longest example in tokens (prompt + response)."""
    truncation: str = "right"
    """``right``: cut longer examples and count them; ``error``: refuse them."""
    packing: bool = False
    """Pack several examples per ``seq_length`` row (read by the trainer's loader)."""
    num_samples: int | None = None
    """Use only the first N records (file order, before any shuffling)."""
    figfont_split: str = "train"
    seed: int = 42
    """Seed of the per-epoch shuffle (pass it to :class:`GlobalBatchLoader`). The figfont
    generator always uses the paper's seed, so its train and test splits never overlap."""

    def __post_init__(self) -> None:
        self._check_values()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when a value or a combination of values
        is impossible (:func:`load_records` calls it; call it before starting a job)."""
        self._check_values()
        if self.source == "file" and not self.train_files:
            raise ConfigError("data.train_files is empty; list .jsonl/.json/.parquet files "
                              "or set data.source=figfont")
        if self.source == "figfont" and self.train_files:
            raise ConfigError("data.train_files is set but data.source=figfont generates its "
                              "data; remove one of them")

    def _check_values(self) -> None:
        """Per-key checks (every default passes, so a default config can be filled in later)."""
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is unknown; use one of {list(SOURCES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is unknown; use one of {list(FORMATS)}")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(
                f"data.truncation={self.truncation!r} is unknown; use one of {list(TRUNCATIONS)}")
        if self.chat_template not in ("auto", "none") and not (
                "{{" in self.chat_template or "{%" in self.chat_template):
            raise ConfigError(f"data.chat_template={self.chat_template!r} is neither auto, none "
                              "nor a Jinja template string")
        if isinstance(self.train_files, str):
            raise ConfigError("data.train_files must be a list of paths, e.g. [train.jsonl]")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"data.num_samples must be >= 1 (or null for all), got {self.num_samples}")


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Fields:
    """Where a record keeps its prompt and response: top-level keys plus nested keys."""

    prompt_key: str
    response_key: str
    prompt_path: tuple[str, ...] = ()
    response_path: tuple[str, ...] = ()
    messages: bool = False  # prompt/response are the user/assistant turns of a message list

    def describe(self) -> str:
        if self.messages:
            return f"{self.prompt_key} (user/assistant turns)"
        return (".".join((self.prompt_key, *self.prompt_path)) + " / "
                + ".".join((self.response_key, *self.response_path)))


def _numina_fields() -> list[_Fields]:
    # The paper's processed subset keeps question/answer under extra_info; the original
    # NuminaMath-CoT has problem/solution and the same pair as a chat message list.
    return [_Fields("extra_info", "extra_info", ("question",), ("answer",)),
            _Fields("problem", "solution"),
            _Fields("messages", "messages", messages=True)]


def _m23k_fields(cfg: DataConfig) -> list[_Fields]:
    # The paper's processed m23k: chat-formatted prompts and responses per model family
    # under extra_info (the "reponse" spelling is the dataset's own).
    return [_Fields("extra_info", "extra_info",
                    tuple(cfg.prompt_dict_keys or ("qwen_prompt",)),
                    tuple(cfg.response_dict_keys or ("qwen_reponse_no_thinking",)))]


def _key_fields(cfg: DataConfig) -> _Fields:
    """The layout named by ``prompt_key`` / ``response_key`` and their dict keys."""
    return _Fields(cfg.prompt_key, cfg.response_key, tuple(cfg.prompt_dict_keys or ()),
                   tuple(cfg.response_dict_keys or ()))


def _candidate_fields(cfg: DataConfig) -> list[_Fields]:
    if cfg.format == "numina":
        return _numina_fields()
    if cfg.format == "m23k":
        return _m23k_fields(cfg)
    return [_key_fields(cfg)]


def _choose_fields(cfg: DataConfig, keys: Sequence[str], where: str) -> _Fields:
    """The first field layout whose top-level keys the file has; DataError otherwise."""
    candidates = _candidate_fields(cfg)
    for fields in candidates:
        if fields.prompt_key in keys and fields.response_key in keys:
            return fields
    if len(candidates) == 1:
        role, key = next((role, key) for role, key in (("prompt", candidates[0].prompt_key),
                                                       ("response", candidates[0].response_key))
                         if key not in keys)
        raise DataError(f"{where}: missing field {key!r} (data.{role}_key); "
                        f"available keys: {sorted(keys)}")
    expected = ", ".join(f.describe() for f in candidates)
    raise DataError(f"{where}: no {cfg.format} fields ({expected}); available keys: {sorted(keys)}")


def _walk(record: dict, key: str, path: tuple[str, ...], role: str, where: str) -> str:
    """``record[key][path[0]][path[1]]...`` as a string, or a DataError naming the field."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (data.{role}_key); "
                        f"available keys: {sorted(record)}")
    value, name = record[key], key
    for nested in path:
        if isinstance(value, list) and len(value) == 1:  # a one-element list wraps the dict
            value = value[0]
        if not isinstance(value, dict) or nested not in value:
            have = (f"has keys {sorted(value)}" if isinstance(value, dict)
                    else f"is of type {type(value).__name__}")
            raise DataError(f"{where}: missing field {name}.{nested} (data.{role}_dict_keys); "
                            f"{name} {have}")
        value, name = value[nested], f"{name}.{nested}"
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name} is of type {type(value).__name__}, "
                        "expected a string")
    return value


def _from_messages(messages: Any, where: str) -> tuple[str, str]:
    """The first user turn and the assistant turn that follows it."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: field messages is of type {type(messages).__name__}, "
                        "expected a list")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        raise DataError(f"{where}: messages need a user turn followed by an assistant turn, "
                        f"got roles {roles}")
    user = roles.index("user")
    assistant = roles.index("assistant", user)
    return str(messages[user]["content"]), str(messages[assistant]["content"])


def _extract(record: Any, fields: _Fields, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got type "
                        f"{type(record).__name__}")
    if fields.messages:
        prompt, response = _from_messages(record.get(fields.prompt_key), where)
    else:
        prompt = _walk(record, fields.prompt_key, fields.prompt_path, "prompt", where)
        response = _walk(record, fields.response_key, fields.response_path, "response", where)
    return {"prompt": prompt, "response": response, "origin": where}


def _read_json_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs of a JSON list file or a JSON-lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
    return rows


def _file_kind(path: Path, fmt: str) -> str:
    if fmt in ("jsonl", "parquet"):
        return "json" if fmt == "jsonl" else "parquet"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(f"cannot tell the format of {path} from its extension; "
                    "set data.format=jsonl or data.format=parquet")


def _read_file(path: Path, cfg: DataConfig) -> list[dict]:
    """Prompt/response records of one file."""
    if not path.is_file():
        raise DataError(f"training file {path} does not exist (data.train_files)")
    if _file_kind(path, cfg.format) == "parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
            rows_in_file = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise DataError(f"cannot read {path} as parquet: {exc}") from None
        if rows_in_file == 0:
            raise DataError(f"{path} contains no records")
        fields = _choose_fields(cfg, schema.names, str(path))
        columns = sorted({fields.prompt_key, fields.response_key})
        table = pq.read_table(path, columns=columns)
        rows = [(f"{path}[{i}]", row) for i, row in enumerate(table.to_pylist())]
    else:
        rows = _read_json_rows(path)
        if not rows:
            raise DataError(f"{path} contains no records")
        where, first = rows[0]
        if not isinstance(first, dict):
            raise DataError(f"{where}: expected an object with fields, got type {type(first).__name__}")
        fields = _choose_fields(cfg, list(first), where)
    return [_extract(row, fields, where) for where, row in rows]


def load_records(cfg: DataConfig) -> list[dict]:
    """Prompt/response string records: ``{"prompt", "response", "origin"}``.

    ``origin`` is ``file:line`` (JSON lines), ``file[index]`` (JSON list, parquet) or
    ``figfont:<split>[index]``. Files are read in ``cfg.train_files`` order and the first
    ``cfg.num_samples`` records are kept (before any shuffling, so the subset does not
    depend on the seed). Raises :class:`DataError` for missing, empty or malformed files.
    """
    cfg.validate()
    if cfg.source == "figfont":
        from probsft_megatron.figfont import figfont_records

        fields = _key_fields(cfg)
        return [_extract(item, fields, f"figfont:{cfg.figfont_split}[{item['index']}]")
                for item in figfont_records(cfg.figfont_split, n=cfg.num_samples)]
    records: list[dict] = []
    for name in cfg.train_files:
        records.extend(_read_file(Path(name).expanduser(), cfg))
        if cfg.num_samples is not None and len(records) >= cfg.num_samples:
            break
    return records[:cfg.num_samples] if cfg.num_samples is not None else records


# ----------------------------------------------------------------------------- tokenization


def _resolve_template(cfg: DataConfig, tokenizer) -> str | None:
    """The Jinja template to render with, or None for plain concatenation."""
    if cfg.chat_template == "none":
        return None
    if cfg.chat_template == "auto":
        # m23k prompts are already chat-formatted for their model family.
        if cfg.format == "m23k":
            return None
        return getattr(tokenizer, "chat_template", None) or None
    return cfg.chat_template


class SFTDataset:
    """Tokenized SFT examples (all in memory, int32 token storage).

    ``dataset[i]`` is ``{"input_ids": LongTensor[n], "loss_mask": FloatTensor[n]}`` with
    ``n <= cfg.max_length`` and ``loss_mask[t] = 1`` iff ``input_ids[t + 1]`` is a response
    token. Every untruncated example ends with the tokenizer's eos token. ``stats``: ``n_examples`` (kept), ``n_truncated`` (cut at the right),
    ``n_dropped`` (prompt alone fills ``max_length``), ``n_template_fallback`` (prompt
    tokens were not a prefix of the conversation tokens), ``n_tokens``,
    ``n_response_tokens`` (trained labels). ``pad_id`` is the tokenizer's pad token
    (its end-of-sequence token when it has none).
    """

    def __init__(self, cfg: DataConfig, tokenizer, records: list[dict] | None = None):
        """Tokenize ``records`` (default: :func:`load_records` of ``cfg``)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        records = load_records(cfg) if records is None else records
        self.template = _resolve_template(cfg, tokenizer)
        if self.template is None and cfg.system_prompt is not None:
            raise ConfigError("data.system_prompt needs a chat template (data.chat_template is "
                              "none or the tokenizer has none); put the text into the prompts "
                              "or set data.chat_template")
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError("the tokenizer has no eos_token; SFT responses must end with one")
        self.eos_id = int(eos_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)

        self.stats = {"n_examples": 0, "n_truncated": 0, "n_dropped": 0,
                      "n_template_fallback": 0, "n_tokens": 0, "n_response_tokens": 0}
        tokens: list[np.ndarray] = []
        prompt_lengths: list[int] = []
        for start in range(0, len(records), _TOKENIZE_CHUNK):
            chunk = records[start:start + _TOKENIZE_CHUNK]
            for record, (prompt_ids, response_ids) in zip(chunk, self._tokenize(chunk)):
                ids = self._truncate(prompt_ids, response_ids, record)
                if ids is None:
                    continue
                tokens.append(ids)
                prompt_lengths.append(len(prompt_ids))
        if not tokens:
            raise DataError(f"no usable examples among {len(records)} records "
                            f"(dropped: {self.stats['n_dropped']}); raise data.max_length")
        self.lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        self.prompt_lengths = np.minimum(np.array(prompt_lengths, dtype=np.int64), self.lengths)
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self._tokens = np.concatenate(tokens).astype(np.int32)
        trained = self.lengths - np.maximum(self.prompt_lengths, 1)
        self.stats.update(n_examples=len(tokens), n_tokens=int(self.lengths.sum()),
                          n_response_tokens=int(trained.sum()))
        self._warn(len(records))

    # -- building

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _render(self, record: dict, with_response: bool) -> str:
        messages = [{"role": "user", "content": record["prompt"]}]
        if self.cfg.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        if with_response:
            messages.append({"role": "assistant", "content": record["response"]})
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=not with_response)
        except Exception as exc:  # Jinja errors surface as several exception types
            raise ConfigError(f"the chat template failed on {record.get('origin', 'a record')}: "
                              f"{exc}") from None

    def _tokenize(self, records: list[dict]) -> list[tuple[list[int], list[int]]]:
        """``(prompt_ids, response_ids)`` per record, before truncation."""
        if self.template is None:
            prompts = self._encode([r["prompt"] for r in records])
            responses = self._encode([r["response"] for r in records])
            return [(p, r + [self.eos_id]) for p, r in zip(prompts, responses)]
        prompt_texts = [self._render(r, with_response=False) for r in records]
        full_texts = [self._render(r, with_response=True) for r in records]
        prompts = self._encode(prompt_texts)
        fulls = self._encode(full_texts)
        out = []
        for record, p_text, f_text, p_ids, f_ids in zip(records, prompt_texts, full_texts,
                                                        prompts, fulls):
            if f_ids[:len(p_ids)] == p_ids:
                response_ids = f_ids[len(p_ids):]
            else:
                # Token boundaries differ (or the template renders the prompt differently
                # once an answer follows): concatenate prompt and response tokens instead.
                self.stats["n_template_fallback"] += 1
                if f_text.startswith(p_text):
                    response_ids = self._encode([f_text[len(p_text):]])[0]
                else:
                    response_ids = self._encode([record["response"]])[0] + [self.eos_id]
            if self.eos_id in response_ids:
                # Stop at the end-of-sequence token: what a template renders after it
                # (e.g. a newline after <|im_end|>) is never generated, so never trained.
                last = len(response_ids) - 1 - response_ids[::-1].index(self.eos_id)
                response_ids = response_ids[:last + 1]
            else:
                # The turn ends with a token other than eos (a base model's tokenizer, e.g.
                # Qwen2.5: eos <|endoftext|>, turns end with <|im_end|>): generation stops at
                # eos, so the example must end with it.
                response_ids = response_ids + [self.eos_id]
            out.append((p_ids, response_ids))
        return out

    def _truncate(self, prompt_ids: list[int], response_ids: list[int],
                  record: dict) -> np.ndarray | None:
        """The example's tokens within ``max_length``, or None when it is dropped."""
        limit = self.cfg.max_length
        n = len(prompt_ids) + len(response_ids)
        if n > limit:
            if self.cfg.truncation == "error":
                raise DataError(f"{record.get('origin', 'an example')} has {n} tokens, more than "
                                f"data.max_length={limit}; raise data.max_length or set "
                                "data.truncation=right")
            if len(prompt_ids) >= limit:
                self.stats["n_dropped"] += 1
                return None
            self.stats["n_truncated"] += 1
        return np.array((prompt_ids + response_ids)[:limit], dtype=np.int64)

    def _warn(self, n_records: int) -> None:
        s, limit = self.stats, self.cfg.max_length
        if s["n_truncated"]:
            logger.warning("%d of %d examples were longer than data.max_length=%d tokens and were "
                           "cut at the right; raise data.max_length to keep them whole",
                           s["n_truncated"], n_records, limit)
        if s["n_dropped"]:
            logger.warning("%d of %d examples were dropped: their prompt alone fills "
                           "data.max_length=%d tokens; raise data.max_length to keep them",
                           s["n_dropped"], n_records, limit)
        if s["n_template_fallback"]:
            logger.warning("%d of %d examples: the chat template's prompt tokens are not a prefix "
                           "of the whole conversation's tokens; their prompt and response were "
                           "tokenized separately and concatenated", s["n_template_fallback"],
                           n_records)

    # -- access

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        n, p = int(self.lengths[i]), int(self.prompt_lengths[i])
        ids = torch.from_numpy(self._tokens[self._offsets[i]:self._offsets[i] + n].astype(np.int64))
        loss_mask = torch.zeros(n, dtype=torch.float32)
        loss_mask[max(p, 1) - 1:n - 1] = 1.0
        return {"input_ids": ids, "loss_mask": loss_mask}


# ----------------------------------------------------------------------------- batching


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
      ``pad_id``, ``loss_mask`` 0.
    * ``drop_last=True`` drops an epoch's incomplete last global batch; ``drop_last=False``
      keeps it and fills the missing rows with empty rows (all padding, ``loss_mask`` 0).
    * ``state_dict()`` records the number of global batches handed out; a fresh loader
      given it by ``load_state_dict`` yields exactly what this one yields next, for any
      ``dp_size`` / ``micro_batch_size`` (the global batches do not depend on them).

    ``dataset``: ``len(dataset)`` and ``dataset[i] -> {"input_ids", "loss_mask"}`` with the
    module's loss-mask convention; a ``lengths`` attribute (tokens per example) is used
    when present instead of reading every example.
    """

    def __init__(self, dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seq_length: int, seed: int, epochs: int = 1, packing: bool = False,
                 pad_id: int = 0, drop_last: bool = True):
        for name, value, low in (("global_batch_size", global_batch_size, 1),
                                 ("micro_batch_size", micro_batch_size, 1),
                                 ("data-parallel size", dp_size, 1),
                                 ("seq_length", seq_length, 2), ("epochs", epochs, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is outside [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be divisible by micro_batch_size="
                f"{micro_batch_size} x data-parallel size {dp_size} (= {micro_batch_size * dp_size}); "
                "change global_batch_size or micro_batch_size")
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
            raise ConfigError(f"the longest example has {longest} tokens but seq_length="
                              f"{seq_length}; set seq_length >= data.max_length")
        self._cached: tuple[int, list] | None = None  # (epoch, units) of the last epoch used
        units_per_epoch = [len(self._units(e)) if packing else len(self._lengths)
                           for e in range(epochs)]
        self._steps_per_epoch = [self._count_steps(n) for n in units_per_epoch]
        if self._steps_per_epoch[0] == 0:
            what = "packed rows" if packing else "examples"
            raise ConfigError(f"one epoch has {units_per_epoch[0]} {what}, fewer than "
                              f"global_batch_size={global_batch_size}; lower global_batch_size "
                              "or keep the incomplete batch (drop_last=False)")
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
        fp = {"seed": self.seed, "global_batch_size": self.global_batch_size,
              "num_examples": len(self._lengths),
              "lengths_crc32": zlib.crc32(self._lengths.tobytes()),  # same data, same tokenizer
              "packing": self.packing, "drop_last": self.drop_last}
        if self.packing:
            fp["seq_length"] = self.seq_length
        return fp

    def state_dict(self) -> dict[str, Any]:
        """Data position: ``step`` (global batches handed out), ``epoch``,
        ``step_in_epoch``, plus the settings the schedule depends on (checked on load)."""
        epoch, in_epoch = self._locate(self._step)
        return {"step": self._step, "epoch": epoch, "step_in_epoch": in_epoch,
                **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["step"]`` global batches; settings recorded in ``state``
        must match this loader's (ConfigError naming the first that differs)."""
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise ConfigError(f"cannot resume the data position: it was saved with {key}="
                                  f"{state[key]} but this run has {key}={value}; use the same value")
        if "step" not in state:
            raise ConfigError("the saved data position has no 'step'; it is not a "
                              "GlobalBatchLoader state")
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ConfigError(f"cannot resume the data position at step {step}: this run has "
                              f"{len(self)} steps")
        self._step = step

    # -- batches

    def __iter__(self) -> Iterator[list[Batch]]:
        """This rank's micro-batches of each remaining global batch, in order."""
        g = self.global_batch_size
        share = g // self.dp_size
        while self._step < len(self):
            epoch, k = self._locate(self._step)
            units = self._units(epoch)[k * g:(k + 1) * g]
            mine = units[self.dp_rank * share:(self.dp_rank + 1) * share]
            self._step += 1
            m = self.micro_batch_size
            yield [self._micro_batch(mine[i * m:(i + 1) * m]) for i in range(share // m)]

    def _micro_batch(self, units: list) -> Batch:
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
                labels[row, offset:end - 1] = ids[1:]  # the last label stays pad_id
                loss_mask[row, offset:end - 1] = mask[:n - 1]
                position_ids[row, offset:end] = torch.arange(n)
                segments[row, offset:end] = seg
                offset = end
        attention_mask = None
        if self.packing:
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            same = segments[:, :, None] == segments[:, None, :]
            attention_mask = ~(same & causal)[:, None]
        return Batch(tokens=tokens, labels=labels, loss_mask=loss_mask,
                     position_ids=position_ids, attention_mask=attention_mask)
