"""SFT records: prompt/response strings from local files or the generated figlet-font task.

:func:`load_records` reads ``.jsonl`` / ``.json`` / ``.parquet`` files with the field layout
of ``data.*`` (plain keys, nested dict keys, chat message lists, the NuminaMath and m23k
presets), or generates the figlet-font task offline. Every malformed input is one
:class:`~probsft_megatron.errors.DataError` naming the file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probsft_megatron.config import DataConfig
from probsft_megatron.errors import DataError


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
        return (
            ".".join((self.prompt_key, *self.prompt_path))
            + " / "
            + ".".join((self.response_key, *self.response_path))
        )


def _numina_fields() -> list[_Fields]:
    # The paper's processed subset keeps question/answer under extra_info; the original
    # NuminaMath-CoT has problem/solution and the same pair as a chat message list.
    return [
        _Fields("extra_info", "extra_info", ("question",), ("answer",)),
        _Fields("problem", "solution"),
        _Fields("messages", "messages", messages=True),
    ]


def _m23k_fields(cfg: DataConfig) -> list[_Fields]:
    # The paper's processed m23k: chat-formatted prompts and responses per model family
    # under extra_info (the "reponse" spelling is the dataset's own).
    return [
        _Fields(
            "extra_info",
            "extra_info",
            tuple(cfg.prompt_dict_keys or ("qwen_prompt",)),
            tuple(cfg.response_dict_keys or ("qwen_reponse_no_thinking",)),
        )
    ]


def _key_fields(cfg: DataConfig) -> _Fields:
    """The layout named by ``prompt_key`` / ``response_key`` and their dict keys."""
    return _Fields(
        cfg.prompt_key,
        cfg.response_key,
        tuple(cfg.prompt_dict_keys or ()),
        tuple(cfg.response_dict_keys or ()),
    )


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
        role, key = next(
            (role, key)
            for role, key in (
                ("prompt", candidates[0].prompt_key),
                ("response", candidates[0].response_key),
            )
            if key not in keys
        )
        raise DataError(
            f"{where}: missing field {key!r} (data.{role}_key); available keys: {sorted(keys)}"
        )
    expected = ", ".join(f.describe() for f in candidates)
    raise DataError(f"{where}: no {cfg.format} fields ({expected}); available keys: {sorted(keys)}")


def _walk(record: dict, key: str, path: tuple[str, ...], role: str, where: str) -> str:
    """``record[key][path[0]][path[1]]...`` as a string, or a DataError naming the field."""
    if key not in record:
        raise DataError(
            f"{where}: missing field {key!r} (data.{role}_key); available keys: {sorted(record)}"
        )
    value, name = record[key], key
    for nested in path:
        if isinstance(value, list) and len(value) == 1:  # a one-element list wraps the dict
            value = value[0]
        if not isinstance(value, dict) or nested not in value:
            have = (
                f"has keys {sorted(value)}"
                if isinstance(value, dict)
                else f"is of type {type(value).__name__}"
            )
            raise DataError(
                f"{where}: missing field {name}.{nested} (data.{role}_dict_keys); {name} {have}"
            )
        value, name = value[nested], f"{name}.{nested}"
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {name} is of type {type(value).__name__}, expected a string"
        )
    return value


def _from_messages(messages: Any, where: str) -> tuple[str, str]:
    """The first user turn and the assistant turn that follows it."""
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field messages is of type {type(messages).__name__}, expected a list"
        )
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if "user" not in roles or "assistant" not in roles[roles.index("user") :]:
        raise DataError(
            f"{where}: messages need a user turn followed by an assistant turn, got roles {roles}"
        )
    user = roles.index("user")
    assistant = roles.index("assistant", user)
    return str(messages[user]["content"]), str(messages[assistant]["content"])


def _extract(record: Any, fields: _Fields, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with fields, got type {type(record).__name__}"
        )
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
    raise DataError(
        f"cannot tell the format of {path} from its extension; "
        "set data.format=jsonl or data.format=parquet"
    )


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
            raise DataError(
                f"{where}: expected an object with fields, got type {type(first).__name__}"
            )
        fields = _choose_fields(cfg, list(first), where)
    return [_extract(row, fields, where) for where, row in rows]


def _first_json_row(path: Path) -> tuple[str, Any] | None:
    """The first record of a JSON-lines file (read line by line), or of a JSON list."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if line.lstrip().startswith("["):  # a JSON list: parsed whole
                    rows = _read_json_rows(path)
                    return rows[0] if rows else None
                try:
                    return f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return None


def check_first_records(cfg: DataConfig) -> None:
    """The first record of every data file has the fields ``data.*`` names (a parquet file:
    its schema), before any tokenizer or model; the rest are checked as the data loads.
    Raises the :class:`DataError` that :func:`load_records` would raise for that record."""
    if cfg.source != "file":
        return
    for name in cfg.train_files:
        path = Path(name).expanduser()
        if _file_kind(path, cfg.format) == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(path)
                rows_in_file = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:  # pyarrow raises several types for unreadable files
                raise DataError(f"cannot read {path} as parquet: {exc}") from None
            if rows_in_file == 0:
                raise DataError(f"{path} contains no records")
            _choose_fields(cfg, schema.names, str(path))
            continue
        first = _first_json_row(path)
        if first is None:
            raise DataError(f"{path} contains no records")
        where, record = first
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected an object with fields, got type {type(record).__name__}"
            )
        _extract(record, _choose_fields(cfg, list(record), where), where)


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
        return [
            _extract(item, fields, f"figfont:{cfg.figfont_split}[{item['index']}]")
            for item in figfont_records(cfg.figfont_split, n=cfg.num_samples)
        ]
    records: list[dict] = []
    for name in cfg.train_files:
        records.extend(_read_file(Path(name).expanduser(), cfg))
        if cfg.num_samples is not None and len(records) >= cfg.num_samples:
            break
    return records[: cfg.num_samples] if cfg.num_samples is not None else records
