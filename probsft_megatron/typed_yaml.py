"""Typed dataclasses from YAML mappings and dotted ``section.key=value`` overrides.

Generic machinery under :mod:`probsft_megatron.config` (which owns the sections): reading a
YAML file whose top level is a mapping, merging mappings, applying an override, and building
a (nested) dataclass from a mapping with every key checked and every value coerced to its
annotated type. Every failure is a one-line :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from probsft_megatron.errors import ConfigError


def shown(text: str) -> str:
    """``text`` (a key, a path) as a message shows it: unchanged when it is printable ASCII,
    else with every invisible or non-ASCII character escaped (``optim.lr\\u200b``), so that
    a key or a file name that only looks right reads differently from the right one."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        c if c.isascii() and c.isprintable() else c.encode("unicode_escape").decode() for c in text
    )


def oddity(text: str) -> str:
    """`` (it contains U+200B ZERO WIDTH SPACE)``: the first invisible or non-ASCII character
    of ``text``, for a message; empty when there is none."""
    import unicodedata

    for c in text:
        if not (c.isascii() and c.isprintable()):
            name = unicodedata.name(c, "a control character")
            return f" (it contains U+{ord(c):04X} {name})"
    return ""


def read_yaml_mapping(path: Path, what: str = "config sections at the top level") -> dict:
    """A YAML file whose top level is a mapping (``what`` it should hold names it in the error);
    unreadable files, invalid YAML, a file with no YAML in it (empty, or only comments) and
    other top levels raise a one-line ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(
            f"{path} is empty (no YAML in it, only blank lines or comments); it must contain "
            f"a YAML mapping ({what})"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping ({what})")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, merging nested mappings key by key (new dicts, inputs kept)."""
    out = dict(base)
    for k, v in update.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if both else v
    return out


def apply_override(data: dict, override: str) -> dict:
    """Apply one ``a.b.c=value`` override to a raw config mapping (value parsed as YAML).

    A section given by name (``model: tiny-qwen2``) that an override reaches into becomes
    ``{"__preset__": name, ...}``, resolved by the config module.
    """
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} must look like section.key=value (e.g. optim.lr=4e-5)"
        )
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {"__preset__": node[p]} if isinstance(node.get(p), str) else {}
        node = node[p]
    node[parts[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in args:
            return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, where)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")


def _coerce_number(value: Any, tp: type, where: str) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{where} expects a number, got {value!r}")
    try:
        if tp is float:
            return float(value)
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError
        return int(as_float)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} expects {_type_name(tp)}, got {value!r}") from None


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (YAML and CLI strings alike)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = (
                yaml.safe_load(value)
                if value.strip().startswith("[")
                else [v for v in value.split(",") if v]
            )
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} expects true/false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, where)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return str(value)
    return value


def from_mapping(cls, data: dict[str, Any], where: str):
    """An instance of the dataclass ``cls`` from ``data`` (nested dataclasses recursively);
    unknown keys name the valid ones, values are coerced with :func:`coerce`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key '{shown(key)}'{oddity(key)}; valid keys under "
            f"'{where or 'top level'}' are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_mapping(tp, value or {}, key)
        else:
            kwargs[name] = coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None
