"""The training configuration: typed sections, recipes with ``base:`` chains, dotted overrides."""

from __future__ import annotations

import functools
import importlib.util
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from probsft_megatron import hardware, resources
from probsft_megatron.errors import ConfigError
from probsft_megatron.typed_yaml import (
    Names,
    apply_override,
    deep_merge,
    from_mapping,
    read_yaml_mapping,
    section,
)

Attention = Literal["auto", "sdpa", "local", "te"]
RecomputeGranularity = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
ATTENTION_IMPLS, RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS = map(
    typing.get_args, (Attention, RecomputeGranularity, RecomputeMethod)
)
CHAT_TEMPLATES = ("chatml", "qwen2.5", "llama-3")  # configs/chat_templates/<name>.jinja
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
POSITIVE = Field(gt=0)
FRACTION = Field(ge=0, lt=1)
Count = Annotated[int, Field(ge=1)]


@section("model")
class ModelConfig:
    """A decoder-only transformer in Hugging Face terms: ``qwen2`` (q/k/v bias) or ``llama``."""

    arch: Literal["llama", "qwen2"] = "llama"
    num_layers: Count = 2
    hidden_size: Count = 64
    ffn_hidden_size: Count = 128
    num_attention_heads: Count = 4
    num_query_groups: Count = 2
    head_dim: Count | None = None
    vocab_size: Count = 256
    max_position_embeddings: Count = 2048
    rope_theta: Annotated[float, POSITIVE] = 10000.0
    rms_norm_eps: Annotated[float, POSITIVE] = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # None: the family's default (qwen2: True, llama: False)
    rope_scaling_factor: Annotated[float, POSITIVE] | None = None  # Llama-3 "llama3" scaling
    init_std: Annotated[float, POSITIVE] = 0.02

    def __post_init__(self) -> None:
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.arch == "qwen2")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )

    def num_parameters(self) -> int:
        """Parameter count of the unsharded model (for FLOPs and reporting)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * f + 2 * h  # attention, the gated MLP, two norms
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@section("parallel")
class ParallelConfig:
    """TP, PP, SP (the rest is DP), recomputation (selective: core attention; full: layers)."""

    tensor_model_parallel_size: Count = 1
    pipeline_model_parallel_size: Count = 1
    sequence_parallel: bool = False
    recompute_granularity: RecomputeGranularity = "none"
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: Count = 1

    def validate(self, world_size: int, model: ModelConfig | None = None) -> int:
        """Check the layout against the world size and the model; returns the DP size."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"TP*PP = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}; "
                "change parallel.tensor_model_parallel_size / "
                "parallel.pipeline_model_parallel_size or the number of processes"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"
            )
        if model is not None:
            for key in ("num_attention_heads", "num_query_groups", "vocab_size", "ffn_hidden_size"):
                if (value := getattr(model, key)) % tp:
                    raise ConfigError(
                        f"model.{key}={value} is not divisible by "
                        f"parallel.tensor_model_parallel_size={tp}; pick a TP that divides it"
                    )
            if model.num_layers % pp:
                raise ConfigError(
                    f"model.num_layers={model.num_layers} is not divisible by "
                    f"parallel.pipeline_model_parallel_size={pp}"
                )
            per_stage = model.num_layers // pp
            if self.recompute_granularity == "full" and self.recompute_num_layers > per_stage:
                raise ConfigError(
                    f"parallel.recompute_num_layers={self.recompute_num_layers} exceeds the "
                    f"{per_stage} layers of a pipeline stage; use 1..{per_stage}"
                )
        return world_size // (tp * pp)

    def megatron_recompute(self) -> dict[str, Any]:
        """The ``TransformerConfig`` recompute options (empty without recomputation)."""
        if self.recompute_granularity == "none":
            return {}
        if self.recompute_granularity == "selective":
            return {"recompute_granularity": "selective"}
        return {
            "recompute_granularity": "full",
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_num_layers,
        }


validate_layout = ParallelConfig.validate  # (parallel, world_size, model=None) -> the DP size


@section("loss")
class LossConfig:
    """The objective (``auto``: the probe's choice), its normalization and implementation."""

    objective: Any = "original"
    normalization: Literal["kept", "response", "sample"] = Field(
        "kept",
        description="'kept': divide by the tokens the objective keeps, the paper's default; "
        "'response': all response tokens; 'sample': each example's mean, averaged",
    )
    implementation: Literal["unfused", "fused"] = "unfused"
    chunk_size: Count = Field(512, description="tokens per chunk of the fused loss, e.g. 512")
    percentile_scope: Literal["global", "micro"] = Field(
        "global",
        description="'global': exact over the global batch, 'micro': per micro-batch, "
        "no extra forward",
    )
    sample_unit: Literal["example", "turn"] = Field(
        "example",
        description="what normalization=sample averages: whole examples or assistant turns",
    )

    def __post_init__(self) -> None:
        if self.normalization == "sample" and self.implementation == "fused":
            raise ConfigError(
                "loss.normalization=sample needs loss.implementation=unfused (the fused head "
                "weights every response token alike); set one of them"
            )
        self.parsed_objective  # noqa: B018  (parsed here, once: a bad name fails at load)

    @functools.cached_property
    def parsed_objective(self):
        """The parsed objective; None for ``auto`` (the probe chooses when training starts)."""
        from probsft_megatron.objectives import parse_objective

        auto = isinstance(self.objective, str) and self.objective.strip().lower() == "auto"
        return None if auto else parse_objective(self.objective)


@section("data")
class DataConfig:
    """Where the SFT examples come from and how they are tokenized (the ``data.*`` keys)."""

    source: Literal["file", "figfont"] = "file"  # file (train_files) or figfont (generated offline)
    train_files: Names = Field(default_factory=list)  # .jsonl/.json/.parquet, in this order
    val_files: Names = Field(default_factory=list)  # held-out files for the validation loss
    format: Literal["auto", "jsonl", "parquet", "numina", "m23k"] = "auto"  # auto: by extension
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: Names | None = None  # nested keys to follow when prompt_key holds a dict
    response_dict_keys: Names | None = None
    messages_key: str | None = None  # a conversation's field; None: messages or conversations
    tools_key: str = "tools"  # a conversation's tool definitions (passed to the template)
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # a message's own wins
    chat_template: str = "auto"  # auto, none, a shipped name, a .jinja file or a template
    system_prompt: str | None = None
    max_length: int = Field(1024, ge=2)  # longest example in tokens (prompt + response)
    truncation: Literal["turn", "right", "error"] = "turn"  # turn: cut after a whole turn
    cache: bool = True  # tokenize once into a store every rank maps (data/store.py)
    cache_dir: str | None = None  # default $PROBSFT_CACHE/data; on a cluster, a shared one
    padding: Literal["longest", "max_length"] = "longest"  # pad to the micro-batch's longest
    packing: bool = False  # one row per micro-batch with cu_seqlens, no padding between
    num_samples: Count | None = Field(None, description="or null for all")  # the first N
    figfont_split: str = "train"
    seed: int = 42  # the per-epoch shuffle (the figfont generator keeps the paper's seed)

    def __post_init__(self) -> None:
        t = self.chat_template
        jinja = t.endswith(".jinja") or "{{" in t or "{%" in t
        if t not in ("auto", "none", *CHAT_TEMPLATES) and not jinja:
            raise ConfigError(
                f"data.chat_template={t!r} is neither auto, none, a shipped "
                f"template ({', '.join(CHAT_TEMPLATES)}), a .jinja file nor a Jinja template string"
            )

    def validate(self) -> None:
        """A one-line ConfigError when the sources contradict each other."""
        if self.source == "file" and not self.train_files:
            raise ConfigError(
                "data.train_files is empty; list .jsonl/.json/.parquet files "
                "or set data.source=figfont"
            )
        if self.source == "figfont" and self.train_files:
            raise ConfigError(
                "data.train_files is set but data.source=figfont generates its "
                "data; remove one of them"
            )


@section("optim")
class OptimConfig:
    """AdamW with warmup + cosine decay (the paper's verl defaults), megatron's optimizer."""

    lr: float = Field(5e-5, gt=0, description="the peak learning rate, e.g. 5e-5")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: Annotated[float, FRACTION] = 0.9
    adam_beta2: Annotated[float, FRACTION] = 0.95
    adam_eps: Annotated[float, POSITIVE] = 1e-8
    clip_grad: float = Field(1.0, ge=0, description="0 turns clipping off")
    warmup_ratio: Annotated[float, FRACTION] = 0.1
    schedule: Literal["cosine", "constant"] = "cosine"
    use_distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optim.min_lr={self.min_lr!r} is above optim.lr={self.lr!r}; the schedule decays "
                "from lr to min_lr: lower min_lr"
            )


@section("train")
class TrainConfig:
    global_batch_size: Count = 256
    micro_batch_size: Count = 4
    epochs: Count = 1
    max_steps: Count | None = Field(None, description="or null: every step of the epochs")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU
    attention: Attention = "auto"  # auto (te where TE+CUDA, else sdpa) | sdpa | local | te
    output_dir: str = "runs/sft"
    save_interval: int = Field(100, ge=0, description="0: save only at the end")
    keep_last: Count = 2
    log_interval: Count = 1
    histogram_interval: int = Field(50, ge=0, description="0: never")
    resume: bool = True  # continue from the newest checkpoint in output_dir
    resume_skip_damaged: bool = False  # pass over damaged newer ones, with a warning each
    tensorboard: bool = True
    eval_interval: int = Field(0, ge=0, description="0: only at the last step")
    eval_batches: Count | None = Field(None, description="or null: all of it")
    wandb_project: str | None = None  # null: no Weights & Biases
    wandb_mode: Literal["online", "offline"] = "online"
    # a collective's wait for a dead or hung rank; also bounds a rank's share of a save
    dist_timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds; 600 suits GPU clusters, raise it when a checkpoint save takes longer",
    )

    def __post_init__(self) -> None:
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ConfigError("train.wandb_project is empty; name a W&B project or set it null")
        if not self.output_dir.strip():
            raise ConfigError("train.output_dir is empty; name the run's folder, e.g. runs/sft")


@section("init")
class InitConfig:
    checkpoint: str | None = None  # a Megatron model dir (probsft convert) or None = random init
    tokenizer: str | None = None  # HF tokenizer dir; default: the checkpoint's hf/ folder


@section("peft")
class PeftConfig:
    """LoRA on megatron's linears (``all-linear``: all four); output layer, embeddings frozen."""

    method: Literal["none", "lora"] = "none"
    rank: Count = Field(16, description="e.g. 16")
    alpha: float = Field(32.0, gt=0, description="the adapter is scaled by alpha/rank")
    dropout: Annotated[float, FRACTION] = 0.0
    target_modules: Names = Field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.target_modules == ["all-linear"]:
            object.__setattr__(self, "target_modules", list(LORA_TARGETS))
        unknown = [t for t in self.target_modules if t not in LORA_TARGETS]
        if unknown or not self.target_modules:
            frozen = " (the output layer and embeddings stay frozen)" if unknown else ""
            raise ConfigError(
                f"peft.target_modules has {unknown[0] if unknown else 'nothing'!r}, which is not "
                f"a linear LoRA can adapt{frozen}; use some of {', '.join(LORA_TARGETS)} "
                "or all-linear"
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def validate(cfg: TrainJobConfig, world_size: int) -> int:
    """What single keys cannot check, for ``world_size`` processes (no file read): the DP size."""
    if world_size < 1:
        raise ConfigError(f"the number of processes must be >= 1 (got {world_size})")
    dp = validate_layout(cfg.parallel, world_size, cfg.model)
    cfg.data.validate()
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size*DP = {t.micro_batch_size}*{dp}; choose a global batch "
            f"that is a multiple of {t.micro_batch_size * dp}"
        )
    if t.attention == "te" and not hardware.te_available():
        raise ConfigError(
            "train.attention=te but Transformer Engine is not installed here; "
            "use auto, sdpa or local"
        )
    if cfg.peft.enabled and t.attention == "te":
        raise ConfigError(
            "peft.method=lora adapts megatron's local linears and train.attention=te builds "
            "Transformer Engine's; use train.attention=sdpa with LoRA"
        )
    if cfg.data.packing and t.attention == "local":
        raise ConfigError(
            "data.packing needs attention that takes packed sequences (sdpa or te); "
            "train.attention=local does not; use train.attention=auto"
        )
    if t.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.wandb_project is set but wandb is not installed here; "
            "pip install 'probsft-megatron[wandb]', or set train.wandb_project=null"
        )
    if (t.eval_interval or t.eval_batches is not None) and not cfg.data.val_files:
        key = "train.eval_interval" if t.eval_interval else "train.eval_batches"
        raise ConfigError(
            f"{key} is set but data.val_files is empty; list held-out files in data.val_files "
            "or remove it"
        )
    if cfg.data.max_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's "
            f"max_position_embeddings={cfg.model.max_position_embeddings}"
        )
    return dp


@section(frozen=False)
class TrainJobConfig:
    """A job's sections (frozen; the container is not); training reads the frozen ``Job``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)

    validate = validate  # (world_size) -> the DP size


def resolve_precision(precision: str) -> str:
    """``train.precision`` -> ``bfloat16`` | ``float32`` (``auto``: bf16 with CUDA)."""
    if precision == "auto":
        return "bfloat16" if hardware.cuda_available() else "float32"
    return {"bf16": "bfloat16", "fp32": "float32"}[precision]


def resolve_attention(impl: str) -> str:
    """``auto`` -> ``te`` where TE and CUDA exist, else ``sdpa``; others as they are."""
    if impl not in ATTENTION_IMPLS:
        allowed = ", ".join(ATTENTION_IMPLS)
        raise ConfigError(f"train.attention={impl!r} is invalid; use one of {allowed}")
    if impl != "auto":
        return impl
    return "te" if hardware.cuda_available() and hardware.te_available() else "sdpa"


list_presets = functools.partial(resources.names, "models")  # () -> the model presets' names
list_recipes = functools.partial(resources.names, "recipes")  # () -> the shipped recipes' names


def load_preset(name: str) -> dict[str, Any]:
    path = resources.find("models", name)
    if path is None:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    data = read_yaml_mapping(path)
    data.pop("hf_id", None)  # documentation only
    return data


def load_raw(ref: str, relative_to: Path | None = None, seen: tuple = ()) -> dict:
    """The raw mapping of a recipe (a path or a shipped name), ``base`` chains merged."""
    if Path(ref).is_dir():
        raise ConfigError(
            f"config {ref} is a folder; name a recipe YAML file in it or a shipped recipe "
            f"({', '.join(list_recipes())})"
        )
    local = [Path(ref), *([relative_to / ref] if relative_to is not None else [])]
    path = next((c for c in local if c.is_file()), None) or resources.find("recipes", ref)
    if path is None:
        raise ConfigError(
            f"config {ref!r} not found (looked for a file and for a recipe named {ref!r} in "
            f"{resources.describe_search('recipes')}; recipes: {', '.join(list_recipes())})"
        )
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(load_raw(str(base), path.parent, seen + (path,)), data)
    return data


def build_config(raw: dict[str, Any]) -> TrainJobConfig:
    """Typed config from a raw mapping (presets expanded, every key checked)."""
    raw = dict(raw)
    model = {"preset": raw["model"]} if isinstance(raw.get("model"), str) else raw.get("model")
    for key in ("preset", "__preset__") if isinstance(model, dict) else ():
        if key in model:
            model = dict(model)
            raw["model"] = deep_merge(load_preset(str(model.pop(key))), model)
            break
    return from_mapping(TrainJobConfig, raw)


def load_config(ref: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainJobConfig:
    """Load a recipe (path or name under configs/recipes) and apply dotted overrides."""
    return build_config(functools.reduce(apply_override, overrides, load_raw(ref) if ref else {}))


def world_size_from_env(default: int = 1) -> int:
    return int(os.environ.get("WORLD_SIZE", default))
