"""Typed config sections from YAML and dotted overrides; a bad key or value is one line."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
import unicodedata
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from probsft_megatron.errors import ConfigError


def shown(text: str) -> str:
    """``text`` with every invisible or non-ASCII character escaped (``optim.lr\\u200b``)."""
    return "".join(
        c if c.isascii() and c.isprintable() else c.encode("unicode_escape").decode() for c in text
    )


def oddity(text: str) -> str:
    """`` (it contains U+200B ZERO WIDTH SPACE)`` for ``text``'s first such character, or ""."""
    c = next((c for c in text if not (c.isascii() and c.isprintable())), None)
    if c is None:
        return ""
    return f" (it contains U+{ord(c):04X} {unicodedata.name(c, 'a control character')})"


def read_yaml_mapping(path: Path, what: str = "config sections at the top level") -> dict:
    """A YAML file whose top level is a mapping (of ``what``); else a one-line ConfigError."""
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
    """One ``a.b.c=value`` override (a YAML value); a named section becomes ``__preset__``."""
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


# unknown keys refused, no inf/nan, a number accepted as a string; otherwise pydantic's lax mode
SETTINGS = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


def _split(value: Any) -> Any:
    """A CLI list: ``a,b`` or ``[a, b]`` (YAML) -> a list of strings; others unchanged."""
    if not isinstance(value, str):
        return value
    if value.strip().startswith("["):
        return yaml.safe_load(value)
    return [v for v in value.split(",") if v]


Names = Annotated[list[str], BeforeValidator(_split)]  # strings; an override may give a,b

_TYPE_WORDS = {"int": "int", "float": "float", "bool": "true/false", "string": "a string"}
_TYPE_WORDS |= {"list": "a list", "dataclass": "a mapping", "dict": "a mapping"}
_BOUNDS = {"ge": (">=", "["), "gt": (">", "("), "le": ("<=", "]"), "lt": ("<", ")")}


def _fields(cls) -> dict[str, FieldInfo]:
    return getattr(cls, "__pydantic_fields__", {})


def _nested(tp: Any):
    """``tp`` and every type inside it (``Annotated[...] | None``), a Literal's values not."""
    yield tp
    if typing.get_origin(tp) is not typing.Literal:
        for arg in typing.get_args(tp):
            yield from _nested(arg)


def _range(info: FieldInfo) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1)``: a field's bounds, its ``Annotated[...] | None``'s too."""
    nested = [m for tp in _nested(info.annotation) for m in getattr(tp, "__metadata__", ())]
    metadata = [*info.metadata, *(m for arg in nested for m in getattr(arg, "metadata", [arg]))]
    b = {k: getattr(m, k) for m in metadata for k in _BOUNDS if hasattr(m, k)}
    low, high = (next((k for k in pair if k in b), None) for pair in (("ge", "gt"), ("le", "lt")))
    if low and high:
        return f"in {_BOUNDS[low][1]}{b[low]:g}, {b[high]:g}{_BOUNDS[high][1]}"
    return f"{_BOUNDS[low or high][0]} {b[low or high]:g}" if low or high else ""


def _got(value: Any) -> str:
    """The bad value as a message shows it (a number given as text shown as the number)."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return repr(float(value))
    return repr(value)


def config_error(exc: ValidationError, cls, prefix: str = "") -> ConfigError:
    """pydantic's first error as one line: dotted key, bad value, what is allowed, hint."""
    err = exc.errors()[0]
    if isinstance((err.get("ctx") or {}).get("error"), ConfigError):
        return err["ctx"]["error"]  # a rule that spans keys, raised with its own words
    path, parent, owner, info = [prefix] if prefix else [], cls, cls, None
    for depth, part in enumerate(err["loc"]):
        if isinstance(part, int) and depth == 0:  # a positional argument
            part = list(_fields(cls))[part]
        elif isinstance(part, int):  # an item of a list
            path[-1] += f"[{part}]"
            continue
        parent, info = owner, _fields(owner).get(part)
        owner = info.annotation if info is not None else None
        path.append(part)
    key, kind, value = ".".join(path), err["type"], err["input"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        where = ".".join(path[:-1]) or "top level"
        return ConfigError(
            f"unknown config key '{shown(key)}'{oddity(key)}; valid keys under "
            f"'{where}' are: {', '.join(sorted(_fields(parent)))}"
        )
    hint = f" ({info.description})" if info is not None and info.description else ""
    if kind == "literal_error" and info is not None:
        literals = [t for t in _nested(info.annotation) if typing.get_origin(t) is typing.Literal]
        allowed = ", ".join(str(c) for t in literals for c in typing.get_args(t))
        return ConfigError(f"{key}={value!r} is invalid; use one of {allowed}{hint}")
    bounds = _range(info) if info is not None else ""
    if kind == "finite_number" and not (bounds and _got(value) == "nan"):
        return ConfigError(f"{key} must be a finite number (got {_got(value)}){hint}")
    if bounds and (kind == "finite_number" or kind.startswith(("greater", "less"))):
        return ConfigError(f"{key} must be {bounds} (got {_got(value)}){hint}")
    word = _TYPE_WORDS.get(kind.split("_")[0])
    if word is not None:
        return ConfigError(f"{key} expects {word}, got {value!r}")
    return ConfigError(f"{key or 'config'}: {err['msg']} (got {value!r})")


def _refuse_bool_numbers(cls, prefix: str, values: dict) -> None:
    """Refuse ``true``/``false`` where a number is expected (lax mode would read 1/0)."""
    for name, value in values.items():
        annotation = getattr(_fields(cls).get(name), "annotation", None)
        if isinstance(value, bool) and any(t in (int, float) for t in _nested(annotation)):
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key} expects a number, got {value!r}")


def section(prefix: str = "", *, frozen: bool = True):
    """A frozen pydantic dataclass whose bad constructions raise :func:`config_error` lines."""

    def make(cls):
        cls = dataclass(frozen=frozen, config=SETTINGS)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs) -> None:
            _refuse_bool_numbers(type(self), prefix, dict(zip(_fields(cls), args)) | kwargs)
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, type(self), prefix) from None

        cls.__init__ = __init__
        cls.to_dict = dataclasses.asdict  # the section as plain nested dicts
        return cls

    return make


def _nulls(cls, data: Any, prefix: str = "") -> Any:
    """``null``/``none`` given as text -> None for the keys that may be null (nested)."""
    if not isinstance(data, dict):
        return data
    _refuse_bool_numbers(cls, prefix, data)
    out = {}
    for name, value in data.items():
        annotation = getattr(_fields(cls).get(name), "annotation", None)
        null = isinstance(value, str) and value.strip().lower() in ("null", "none")
        if _fields(annotation):
            value = _nulls(annotation, value, f"{prefix}.{name}" if prefix else name)
        elif null and type(None) in typing.get_args(annotation):
            value = None
        out[name] = value
    return out


def from_mapping(cls, data: Any):
    """An instance of the :func:`section` class ``cls`` from a raw (nested) mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {data!r}")
    return cls(**_nulls(cls, data))
