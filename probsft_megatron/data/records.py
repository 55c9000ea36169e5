"""SFT records from local ``.jsonl`` / ``.json`` / ``.parquet`` files or the figlet-font task.

A record is ``{"prompt", "response", "origin"}`` or a conversation ``{"messages", "tools",
"origin"}`` (OpenAI ``messages`` or ShareGPT ``conversations``, normalized by
:func:`conversation_messages`). Every malformed input is a DataError naming file, line, field."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence
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
    messages: bool = False  # prompt_key names a conversation (a list of messages)


def _key_fields(cfg: DataConfig) -> _Fields:
    """The layout named by ``prompt_key`` / ``response_key`` and their dict keys."""
    return _Fields(
        cfg.prompt_key,
        cfg.response_key,
        tuple(cfg.prompt_dict_keys or ()),
        tuple(cfg.response_dict_keys or ()),
    )


def _choose_fields(cfg: DataConfig, keys: Sequence[str], where: str) -> _Fields:
    """The first field layout whose top-level keys the file has; DataError otherwise."""
    # the field layouts cfg accepts, in order of preference
    if cfg.format == "numina":
        # The paper's processed subset keeps question/answer under extra_info; the original
        # NuminaMath-CoT has problem/solution and the same pair as a chat message list.
        candidates = [
            _Fields("extra_info", "extra_info", ("question",), ("answer",)),
            _Fields("problem", "solution"),
            _Fields("messages", "messages", messages=True),
        ]
    elif cfg.format == "m23k":
        # The paper's processed m23k: chat-formatted prompts and responses per model family
        # under extra_info (the "reponse" spelling is the dataset's own).
        prompt = tuple(cfg.prompt_dict_keys or ("qwen_prompt",))
        response = tuple(cfg.response_dict_keys or ("qwen_reponse_no_thinking",))
        candidates = [_Fields("extra_info", "extra_info", prompt, response)]
    else:
        names = [cfg.messages_key] if cfg.messages_key else ["messages", "conversations"]
        conversations = [_Fields(k, k, messages=True) for k in names]
        candidates = conversations if cfg.messages_key else [_key_fields(cfg), *conversations]
    for fields in candidates:
        if fields.prompt_key in keys and fields.response_key in keys:
            return fields
    if cfg.format != "numina":
        first = candidates[0]  # data.messages_key's or data.prompt_key / response_key's
        role = "prompt" if first.prompt_key not in keys else "response"
        key = getattr(first, f"{role}_key")
        role = "messages" if first.messages else role
        raise DataError(
            f"{where}: missing field {key!r} (data.{role}_key); available keys: {sorted(keys)}"
        )
    raise DataError(
        f"{where}: no numina fields (extra_info.question / extra_info.answer, problem / solution, "
        f"messages (a conversation)); available keys: {sorted(keys)}"
    )


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
            kind = f"is of type {type(value).__name__}"
            have = f"has keys {sorted(value)}" if isinstance(value, dict) else kind
            raise DataError(
                f"{where}: missing field {name}.{nested} (data.{role}_dict_keys); {name} {have}"
            )
        value, name = value[nested], f"{name}.{nested}"
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {name} is of type {type(value).__name__}, expected a string"
        )
    return value


ROLE_NAMES = {
    **dict.fromkeys(("system",), "system"),
    **dict.fromkeys(("user", "human"), "user"),
    **dict.fromkeys(
        ("assistant", "gpt", "chatgpt", "model", "bard", "bing", "function_call"), "assistant"
    ),
    **dict.fromkeys(("tool", "function", "function_response", "observation", "ipython"), "tool"),
}
"""Role names of OpenAI ``messages`` and ShareGPT ``conversations`` -> the template's role."""


def _content(value: Any, where: str) -> str:
    """A message's content as one string (None -> "", a list of text parts joined)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and "text" in part:
                parts.append(str(part["text"]))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(
                    f"{where}: a content part of type {kind!r} is not text; only text parts "
                    "are trained (remove the part or the record)"
                )
        return "".join(parts)
    raise DataError(
        f"{where}: content of type {type(value).__name__}, expected a string or text parts"
    )


def _weight(message: dict, where: str) -> float | None:
    """The message's own loss weight (``train``: bool or number; ``weight``), None if unset."""
    for key in ("train", "weight", "loss_weight"):
        if (value := message.get(key)) is not None:
            if isinstance(value, bool):
                return 1.0 if value else 0.0
            if isinstance(value, (int, float)) and value >= 0 and value == value:
                return float(value)
            raise DataError(f"{where}: {key}={value!r} is invalid; use true/false or a weight >= 0")
    return None


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise DataError(f"{where}: a tool call needs a function name, got {call!r:.80}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):  # else kept as the record's string
                args = json.loads(args) if args.strip() else {}
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def conversation_messages(messages: Any, train_on: str, where: str) -> list[dict]:
    """An OpenAI or ShareGPT conversation's messages: ``role`` (system / user / assistant /
    tool), ``content`` (a string), ``tool_calls`` (arguments parsed), and ``weight``: the loss
    weight of an assistant message (``data.train_on`` or its ``train`` / ``weight``), else 0."""
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: the conversation is of type {type(messages).__name__}, expected a list "
            "of messages"
        )
    out = []
    for k, message in enumerate(messages):
        at = f"{where} message {k}"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object, got {type(message).__name__}")
        sharegpt = "role" not in message and "from" in message
        raw_role = message.get("from" if sharegpt else "role")
        role = ROLE_NAMES.get(str(raw_role).strip().lower()) if raw_role is not None else None
        if role is None:
            raise DataError(
                f"{at}: role {raw_role!r} is unknown; use one of system, user, assistant, tool "
                "(ShareGPT: human, gpt, system, function_call, observation)"
            )
        content = _content(message.get("value" if sharegpt else "content"), at)
        item: dict[str, Any] = {"role": role, "content": content}
        if message.get("tool_calls"):
            if role != "assistant":
                raise DataError(f"{at}: tool_calls on a {role} message; only assistants call")
            item["tool_calls"] = _tool_calls(message["tool_calls"], at)
        item.update({k: message[k] for k in ("name", "tool_call_id") if message.get(k) is not None})
        item["weight"] = _weight(message, at)
        if role != "assistant":
            if item["weight"]:
                raise DataError(
                    f"{at}: a {role} message is marked as trained; only assistant messages "
                    "are trained (remove its train/weight)"
                )
            item["weight"] = 0.0
        out.append(item)
    assistants = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    if not assistants:
        raise DataError(
            f"{where}: the conversation has no assistant message, so nothing to train; "
            f"roles: {[m['role'] for m in out]}"
        )
    for i in assistants:
        if out[i]["weight"] is None:
            out[i]["weight"] = 1.0 if train_on == "all_assistant" or i == assistants[-1] else 0.0
    if not any(out[i]["weight"] > 0 for i in assistants):
        raise DataError(f"{where}: every assistant message is marked train=false; nothing to train")
    return out


def _object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with fields, got type {type(record).__name__}"
        )
    return record


def _extract(record: Any, fields: _Fields, where: str, cfg: DataConfig) -> dict:
    _object(record, where)
    if not fields.messages:
        prompt = _walk(record, fields.prompt_key, fields.prompt_path, "prompt", where)
        response = _walk(record, fields.response_key, fields.response_path, "response", where)
        return {"prompt": prompt, "response": response, "origin": where}
    key = fields.prompt_key
    if key not in record and not cfg.messages_key:  # a file may mix the two
        key = next((k for k in ("messages", "conversations") if k in record), key)
    if key not in record:
        raise DataError(
            f"{where}: missing field {fields.prompt_key!r} (data.messages_key); "
            f"available keys: {sorted(record)}"
        )
    messages = conversation_messages(record[key], cfg.train_on, where)
    tools = record.get(cfg.tools_key) or None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{where}: tools must be a list of tool definitions")
    return {"messages": messages, "tools": tools, "origin": where}


def _iter_json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of a JSON-lines file, line by line, or of a JSON list (parsed whole)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = True
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if first and line.lstrip().startswith("["):  # a JSON list
                    try:
                        rows = json.loads(line + f.read())
                    except json.JSONDecodeError as exc:
                        at = exc.lineno + lineno - 1
                        raise DataError(f"{path}:{at}: invalid JSON ({exc.msg})") from None
                    yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
                    return
                first = False
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON line ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _iter_file(path: Path, cfg: DataConfig) -> Iterator[dict]:
    """The records of one file, one at a time (parquet: read a batch of rows at a time)."""
    if not path.is_file():
        raise DataError(f"training file {path} does not exist (data.train_files)")
    suffix = path.suffix.lower()
    if cfg.format not in ("jsonl", "parquet") and suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(
            f"cannot tell the format of {path} from its extension; "
            "set data.format=jsonl or data.format=parquet"
        )
    if cfg.format == "parquet" or (cfg.format != "jsonl" and suffix == ".parquet"):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for unreadable files
            raise DataError(f"cannot read {path} as parquet: {exc}") from None
        if parquet.metadata.num_rows == 0:
            raise DataError(f"{path} contains no records")
        names = parquet.schema_arrow.names
        fields = _choose_fields(cfg, names, str(path))
        columns = sorted({fields.prompt_key, fields.response_key})
        if fields.messages and cfg.tools_key in names:
            columns.append(cfg.tools_key)
        batches = parquet.iter_batches(batch_size=4096, columns=columns)
        rows = itertools.chain.from_iterable(batch.to_pylist() for batch in batches)
        for i, row in enumerate(rows):
            yield _extract(row, fields, f"{path}[{i}]", cfg)
        return
    fields = None
    for where, row in _iter_json_rows(path):
        fields = fields or _choose_fields(cfg, list(_object(row, where)), where)
        yield _extract(row, fields, where, cfg)
    if fields is None:
        raise DataError(f"{path} contains no records")


def check_first_records(cfg: DataConfig) -> None:
    """Read the first record of every data file, before any tokenizer or model: the
    DataError :func:`load_records` would raise for it comes now."""
    if cfg.source == "file":
        for name in cfg.train_files:
            next(_iter_file(Path(name).expanduser(), cfg), None)


def load_records(cfg: DataConfig) -> list[dict]:
    """The records (module docstring) of ``cfg``: files in ``cfg.train_files`` order, the
    first ``cfg.num_samples`` kept (before any shuffling). ``origin`` is ``file:line`` (JSON
    lines), ``file[index]`` (JSON list, parquet) or ``figfont:<split>[index]``."""
    return list(iter_records(cfg))


def iter_records(cfg: DataConfig) -> Iterator[dict]:
    """The records of :func:`load_records`, in the same order, one at a time (a JSON list
    file is parsed whole), so a consumer that does not keep them holds only the current one."""
    cfg.validate()
    if cfg.source == "figfont":
        from probsft_megatron.figfont import figfont_records

        fields = _key_fields(cfg)
        for item in figfont_records(cfg.figfont_split, n=cfg.num_samples):
            yield _extract(item, fields, f"figfont:{cfg.figfont_split}[{item['index']}]", cfg)
        return
    files = (_iter_file(Path(name).expanduser(), cfg) for name in cfg.train_files)
    yield from itertools.islice(itertools.chain.from_iterable(files), cfg.num_samples)
