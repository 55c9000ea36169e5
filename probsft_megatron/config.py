"""Typed training configuration: YAML recipes + dotted command-line overrides.

A recipe is a YAML mapping whose sections mirror :class:`TrainJobConfig`; ``model`` may be a
preset name (``configs/models/<name>.yaml``) or a mapping of :class:`ModelConfig` fields, and
a recipe may start from another with ``base: <recipe name or path>``. Overrides are
``section.key=value`` strings (``optim.lr=4e-5``, ``loss.objective=GeneralFamily-8``).

Everything is checked here, before any process group starts: unknown keys (with the valid
ones listed), wrong types, and impossible layouts (TP*PP not dividing the world size, micro
batch not dividing the global batch, heads or vocabulary not divisible by TP).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from probsft_megatron.data import DataConfig
from probsft_megatron.errors import ConfigError
from probsft_megatron.loss import LossConfig
from probsft_megatron import compat, resources
from probsft_megatron.attention import ATTENTION_IMPLS
from probsft_megatron.model import ModelConfig, ParallelConfig



@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay (the paper's verl defaults)."""

    lr: float = 5e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    global_batch_size: int = 256
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int | None = None  # stop early (e.g. smoke tests); schedule still spans all steps
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attention: str = "auto"  # auto (te where TE+CUDA, else sdpa) | sdpa | local | te
    output_dir: str = "runs/sft"
    save_interval: int = 100  # steps; 0 = only at the end
    keep_last: int = 2
    log_interval: int = 1
    histogram_interval: int = 50  # steps between histograms of p (0 = never)
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    tensorboard: bool = True


@dataclass
class InitConfig:
    checkpoint: str | None = None  # a Megatron model dir (probsft convert) or None = random init
    tokenizer: str | None = None  # HF tokenizer dir; default: the checkpoint's hf/ folder


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int) -> int:
        """Check the whole job against ``world_size`` processes; returns the DP size."""
        dp = self.parallel.validate(world_size, self.model)
        self.data.validate()
        t = self.train
        for key in ("global_batch_size", "micro_batch_size", "epochs"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1 (got {getattr(t, key)})")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size*DP = {t.micro_batch_size}*{dp}; choose a global batch "
                f"that is a multiple of {t.micro_batch_size * dp}"
            )
        if t.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"train.attention={t.attention!r} is invalid; use one of "
                              f"{', '.join(ATTENTION_IMPLS)}")
        if t.attention == "te" and not compat.te_available():
            raise ConfigError("train.attention=te but Transformer Engine is not installed here; "
                              "use auto, sdpa or local")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision={t.precision!r} is invalid; use auto, bf16 or fp32")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule={self.optim.schedule!r} is invalid; "
                              "use cosine or constant")
        if not 0.0 <= self.optim.warmup_ratio < 1.0:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")
        if self.data.max_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"data.max_length={self.data.max_length} exceeds the model's "
                f"max_position_embeddings={self.model.max_position_embeddings}"
            )
        if t.keep_last < 1:
            raise ConfigError("train.keep_last must be >= 1")
        return dp


# -- generic dataclass <-> mapping ---------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` (YAML and CLI strings alike)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        try:
            number = float(value) if tp is float else value
            if tp is int:
                as_float = float(value)
                if not as_float.is_integer():
                    raise ValueError
                number = int(as_float)
            return number
        except (TypeError, ValueError):
            raise ConfigError(f"{where} expects {_type_name(tp)}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return str(value)
    return value


def _from_mapping(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{where or 'top level'}' are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_mapping(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def read_yaml_mapping(path: Path, what: str = "config sections at the top level") -> dict:
    """A YAML file whose top level is a mapping (``what`` it should hold names it in the error);
    unreadable files, invalid YAML and other top levels raise a one-line ConfigError."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping ({what})")
    return data


def list_presets() -> list[str]:
    return resources.names("models")


def list_recipes() -> list[str]:
    return resources.names("recipes")


def load_preset(name: str) -> dict[str, Any]:
    path = resources.find("models", name)
    if path is None:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    data = read_yaml_mapping(path)
    data.pop("hf_id", None)  # documentation only
    return data


def _resolve_recipe_path(ref: str, relative_to: Path | None) -> Path:
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.append(relative_to / ref)
    for c in candidates:
        if c.is_file():
            return c
    shipped = resources.find("recipes", ref)
    if shipped is not None:
        return shipped
    raise ConfigError(f"config {ref!r} not found (looked for a file and for a recipe named "
                      f"{ref!r} in {resources.describe_search('recipes')}; recipes: "
                      f"{', '.join(list_recipes())})")


def load_raw(ref: str, relative_to: Path | None = None, seen: tuple = ()) -> dict:
    path = _resolve_recipe_path(ref, relative_to).resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is not None:
        data = _deep_merge(load_raw(str(base), path.parent, seen + (path,)), data)
    return data


def apply_override(data: dict, override: str) -> dict:
    """Apply one ``a.b.c=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value "
                          "(e.g. optim.lr=4e-5)")
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
            node[p] = {} if node.get(p) is None or not isinstance(node.get(p), str) else \
                {"__preset__": node[p]}
        node = node[p]
    node[parts[-1]] = value
    return data


def build_config(raw: dict[str, Any]) -> TrainJobConfig:
    """Typed config from a raw mapping (presets expanded, every key checked)."""
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = load_preset(model)
    elif isinstance(model, dict) and "preset" in model:
        model = dict(model)
        raw["model"] = _deep_merge(load_preset(str(model.pop("preset"))), model)
    elif isinstance(model, dict) and "__preset__" in model:
        model = dict(model)
        raw["model"] = _deep_merge(load_preset(str(model.pop("__preset__"))), model)
    return _from_mapping(TrainJobConfig, raw, "")


def load_config(ref: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainJobConfig:
    """Load a recipe (path or name under configs/recipes) and apply dotted overrides."""
    raw = load_raw(ref) if ref else {}
    for o in overrides:
        raw = apply_override(raw, o)
    return build_config(raw)


def world_size_from_env(default: int = 1) -> int:
    return int(os.environ.get("WORLD_SIZE", default))
