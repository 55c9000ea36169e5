"""The training configuration: every section and its one validation (resolution: :mod:`.job`).

A recipe is a YAML mapping whose sections mirror :class:`TrainJobConfig`; ``model`` may be a
preset name (``configs/models/<name>.yaml``) or a mapping of :class:`ModelConfig` fields, and
a recipe may start from another with ``base: <recipe name or path>``. Overrides are
``section.key=value`` strings (``optim.lr=4e-5``, ``loss.objective=GeneralFamily-8``).

Three steps, each once:

1. **load** (:func:`load_config`): YAML + overrides (applied to the raw mapping first) ->
   frozen section dataclasses. The sections are pydantic dataclasses
   (:func:`probsft_megatron.typed_yaml.section`): each key's type, its ``Literal`` choices and
   its ``Field(ge=, gt=, lt=)`` range are declared beside it and checked by pydantic; the few
   rules that span keys of one section sit in its ``__post_init__``. A bad key or value fails
   with one line naming the dotted key, the value and what is allowed.
2. **validate** (:func:`validate`): the combinations, for a given world size: TP*PP dividing the
   world size, the micro batch dividing the global batch, heads/vocabulary divisible by TP,
   recomputation layers per stage, the objective's spelling, data sources. Cheap: no process
   group, tokenizer or model is built, and no file is read.
3. **resolve** (:func:`probsft_megatron.job.resolve_job`): every path the job reads or writes
   (:func:`probsft_megatron.input_checks.check_files`), validate, then decide what a run
   derives from the config (the checkpoint's model, DP size, dtype, attention, objective,
   tokenizer, paths) into a frozen :class:`~probsft_megatron.job.Job`, which training reads.
   ``probsft train --dry-run`` and the real run both start with it.

Sections are frozen: code that needs a variant builds one with :func:`dataclasses.replace`
(validated again) or assigns a whole new section to the :class:`TrainJobConfig` it is
assembling. This module imports neither megatron nor torch at import time (``probsft
objectives`` and ``--dry-run`` stay instant). YAML reading, overrides and the translation of
pydantic's errors live in :mod:`probsft_megatron.typed_yaml`; docs/training.md says why
pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
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

logger = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "InitConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PeftConfig",
    "TrainConfig",
    "TrainJobConfig",
    "apply_override",
    "build_config",
    "is_auto",
    "list_presets",
    "list_recipes",
    "load_config",
    "load_preset",
    "load_raw",
    "read_yaml_mapping",
    "resolve_attention",
    "resolve_precision",
    "validate",
    "validate_layout",
    "world_size_from_env",
]

Arch = Literal["llama", "qwen2"]
Attention = Literal["auto", "sdpa", "local", "te"]
Precision = Literal["auto", "bf16", "fp32"]
Normalization = Literal["kept", "response", "sample"]
SampleUnit = Literal["example", "turn"]
Implementation = Literal["unfused", "fused"]
PercentileScope = Literal["global", "micro"]
RecomputeGranularity = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
Schedule = Literal["cosine", "constant"]
Source = Literal["file", "figfont"]
Format = Literal["auto", "jsonl", "parquet", "numina", "m23k"]
Truncation = Literal["turn", "right", "error"]
Padding = Literal["longest", "max_length"]
TrainOn = Literal["all_assistant", "last_assistant"]
PeftMethod = Literal["none", "lora"]
WandbMode = Literal["online", "offline"]

ARCHITECTURES, ATTENTION_IMPLS, SOURCES, FORMATS, TRUNCATIONS, PADDINGS = map(
    typing.get_args, (Arch, Attention, Source, Format, Truncation, Padding)
)
RECOMPUTE_GRANULARITIES = typing.get_args(RecomputeGranularity)
RECOMPUTE_METHODS = typing.get_args(RecomputeMethod)
PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}
"""``train.precision`` -> parameter dtype name (``auto``: bf16 with CUDA, fp32 on the CPU)."""
CHAT_TEMPLATES = ("chatml", "qwen2.5", "llama-3")
"""Chat templates shipped in ``configs/chat_templates/<name>.jinja``."""
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""megatron's linears LoRA can adapt (attention qkv and output, MLP fc1 and fc2)."""

POSITIVE = Field(gt=0)
"""Annotated[float, POSITIVE]: a finite number > 0."""
FRACTION = Field(ge=0, lt=1)
"""Annotated[float, FRACTION]: a number in [0, 1)."""
Count = Annotated[int, Field(ge=1)]
"""An integer >= 1."""


def is_auto(objective: Any) -> bool:
    """Whether a ``loss.objective`` value asks for the probe's choice (``auto``)."""
    return isinstance(objective, str) and objective.strip().lower() == "auto"


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; use one of {', '.join(allowed)}")


# -- sections ----------------------------------------------------------------------------------


@section("model")
class ModelConfig:
    """A decoder-only transformer in Hugging Face terms.

    ``arch`` selects the family: ``qwen2`` (q/k/v bias) or ``llama`` (no biases; Llama-3 rope
    scaling when ``rope_scaling_factor`` is set). ``head_dim`` defaults to hidden/heads.
    """

    arch: Arch = "llama"
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)

    def num_parameters(self) -> int:
        """Parameter count of the unsharded model (for FLOPs and reporting)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_query_groups * self.head_dim
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@section("parallel")
class ParallelConfig:
    """How the model is split and what it recomputes.

    ``tensor_model_parallel_size`` (TP), ``pipeline_model_parallel_size`` (PP),
    ``sequence_parallel`` (SP, needs TP > 1); the rest of the world is data parallel (DP).
    Activation recomputation, passed to megatron's ``TransformerConfig``:
    ``recompute_granularity`` ``none`` | ``selective`` (core attention is recomputed in the
    backward) | ``full`` (whole transformer layers); with ``full``, ``recompute_method``
    ``uniform`` (checkpoint groups of ``recompute_num_layers`` layers) or ``block`` (recompute
    the first ``recompute_num_layers`` layers of each pipeline stage).
    """

    tensor_model_parallel_size: Count = 1
    pipeline_model_parallel_size: Count = 1
    sequence_parallel: bool = False
    recompute_granularity: RecomputeGranularity = "none"
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: Count = 1

    def validate(self, world_size: int, model: ModelConfig | None = None) -> int:
        """Check the layout against the world size and model; returns the DP size
        (:func:`validate_layout`)."""
        return validate_layout(self, world_size, model)

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


@section("loss")
class LossConfig:
    """``objective``: a name or dict (see :mod:`probsft_megatron.objectives`) or ``auto``;
    ``normalization``: ``kept`` | ``response`` | ``sample`` (each example's mean token loss,
    averaged over the global batch's examples; ``sample_unit: turn`` averages each trained
    assistant turn's mean instead); ``implementation``: ``unfused`` (megatron's
    output layer + vocab-parallel CE) or ``fused`` (chunked linear + CE that never holds the
    full logits); ``chunk_size``: tokens per chunk of the fused path (its logits workspace is
    ``chunk_size x V/TP`` floats, see :mod:`probsft_megatron.fused_loss`); ``percentile_scope``:
    where percentile thresholds are taken, ``global`` (the whole global batch, exact and
    layout-independent, one extra forward per step) or ``micro`` (each micro-batch's tokens
    on all DP ranks, no extra forward; depends on the micro-batch split)."""

    objective: Any = "original"
    normalization: Normalization = Field(
        "kept",
        description="'kept': divide by the tokens the objective keeps, the paper's default; "
        "'response': all response tokens; 'sample': each example's mean, averaged",
    )
    implementation: Implementation = "unfused"
    chunk_size: Count = Field(512, description="tokens per chunk of the fused loss, e.g. 512")
    percentile_scope: PercentileScope = Field(
        "global",
        description="'global': exact over the global batch, 'micro': per micro-batch, "
        "no extra forward",
    )
    sample_unit: SampleUnit = Field(
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

    @property
    def is_auto(self) -> bool:
        """Whether the objective is ``auto`` (chosen by the probe when training starts)."""
        return is_auto(self.objective)

    @functools.cached_property
    def parsed_objective(self):
        """The objective parsed (:class:`~probsft_megatron.objectives.Objective`), once per
        section; None for ``auto``."""
        from probsft_megatron.objectives import parse_objective

        return None if self.is_auto else parse_objective(self.objective)


@section("data")
class DataConfig:
    """Where the SFT examples come from and how they are tokenized (the ``data.*`` keys)."""

    source: Source = "file"
    """``file`` (``train_files``) or ``figfont`` (generated offline, no files needed)."""
    train_files: Names = Field(default_factory=list)
    """Local ``.jsonl`` / ``.json`` / ``.parquet`` files, read in this order."""
    val_files: Names = Field(default_factory=list)
    """Held-out files (same format and fields as ``train_files``): the validation loss every
    ``train.eval_interval`` steps and at the last step; empty: no validation."""
    format: Format = "auto"
    """``auto`` (by extension, fields from the keys below), ``jsonl``, ``parquet``, or a
    field preset: ``numina`` (NuminaMath-CoT) or ``m23k`` (the paper's medical set)."""
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: Names | None = None
    """When ``prompt_key`` holds a dict, the nested keys to follow (outermost first)."""
    response_dict_keys: Names | None = None
    messages_key: str | None = None
    """The field holding a conversation (OpenAI ``messages`` or ShareGPT ``conversations``);
    None: ``messages`` or ``conversations`` when a record has no prompt/response fields."""
    tools_key: str = "tools"
    """The field with a conversation's tool definitions (passed to the chat template)."""
    train_on: TrainOn = "all_assistant"
    """Which assistant turns of a conversation are trained: ``all_assistant`` or
    ``last_assistant``; a message's own ``train`` (bool or weight) or ``weight`` wins."""
    chat_template: str = "auto"
    """``auto`` (the tokenizer's template if it has one), ``none``, a shipped template's name
    (``qwen2.5``, ``llama-3``, ``chatml``), a ``.jinja`` file, or a Jinja template."""
    system_prompt: str | None = None
    """System message of the chat template (needs a template)."""
    max_length: int = Field(1024, ge=2)
    """Longest example in tokens (prompt + response)."""
    truncation: Truncation = "turn"
    """``turn``: cut a longer conversation after its last whole assistant turn that fits (at
    ``max_length`` when not even the first fits); ``right``: cut at ``max_length``;
    ``error``: refuse longer examples. Cut examples are counted."""
    cache: bool = True
    """Tokenize once into a store (memory-mapped by every rank, reused by later runs with
    the same data, tokenizer and settings); false: tokenize in memory on every rank."""
    cache_dir: str | None = None
    """Where stores live (default: ``$PROBSFT_CACHE/data``); on a cluster, a filesystem
    every node sees, so one process per job builds it."""
    padding: Padding = "longest"
    """Without packing: ``longest`` pads each micro-batch to its longest example (rounded
    up to a multiple of 8 and of the TP size); ``max_length`` pads every row to
    ``max_length`` (computes padding; kept for comparison)."""
    packing: bool = False
    """Concatenate each micro-batch's examples into one row with their boundaries
    (``cu_seqlens``, megatron's ``PackedSeqParams``): attention and rotary positions restart
    per example, no padding between examples, no ``s x s`` mask. Same global batches."""
    num_samples: Count | None = Field(None, description="or null for all")
    """Use only the first N records (file order, before any shuffling)."""
    figfont_split: str = "train"
    seed: int = 42
    """Seed of the per-epoch shuffle (pass it to the batch loader). The figfont generator
    always uses the paper's seed, so its train and test splits never overlap."""

    def __post_init__(self) -> None:
        """The chat template's forms (every default passes, so a default config can be
        filled in later)."""
        if (
            self.chat_template not in ("auto", "none", *CHAT_TEMPLATES)
            and not self.chat_template.endswith(".jinja")
            and not ("{{" in self.chat_template or "{%" in self.chat_template)
        ):
            raise ConfigError(
                f"data.chat_template={self.chat_template!r} is neither auto, none, "
                f"a shipped template ({', '.join(CHAT_TEMPLATES)}), a .jinja file "
                "nor a Jinja template string"
            )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key when the sources contradict each other
        (the data loader calls it; :func:`validate` calls it for a whole job)."""
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
    """AdamW with warmup + cosine decay (the paper's verl defaults), megatron's optimizer.

    ``grad_reduce_in_fp32``: megatron DDP keeps the gradient buffers and reduces them over
    data-parallel ranks in float32 even when parameters are bf16 (more memory, exact sums).
    """

    lr: float = Field(5e-5, gt=0, description="the peak learning rate, e.g. 5e-5")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    adam_beta1: Annotated[float, FRACTION] = 0.9
    adam_beta2: Annotated[float, FRACTION] = 0.95
    adam_eps: Annotated[float, POSITIVE] = 1e-8
    clip_grad: float = Field(1.0, ge=0, description="0 turns clipping off")
    warmup_ratio: Annotated[float, FRACTION] = 0.1
    schedule: Schedule = "cosine"
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
    # stop early (e.g. smoke tests); the schedule still spans all steps
    max_steps: Count | None = Field(None, description="or null: every step of the epochs")
    seed: int = 42
    precision: Precision = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attention: Attention = "auto"  # auto (te where TE+CUDA, else sdpa) | sdpa | local | te
    output_dir: str = "runs/sft"
    save_interval: int = Field(100, ge=0, description="0: save only at the end")
    keep_last: Count = 2
    log_interval: Count = 1
    histogram_interval: int = Field(50, ge=0, description="0: never")  # steps between them
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    # resume from the newest *intact* checkpoint when newer ones are damaged (each is named in
    # a warning); without it a damaged newest checkpoint stops the run before any work
    resume_skip_damaged: bool = False
    tensorboard: bool = True
    # validation on data.val_files: every eval_interval steps and at the last step (0: only at
    # the last step); eval_batches global batches of it (null: all of it)
    eval_interval: int = Field(0, ge=0, description="0: only at the last step")
    eval_batches: Count | None = Field(None, description="or null: all of it")
    # Weights & Biases as a metrics sink beside metrics.jsonl and TensorBoard (null: off);
    # wandb_mode: online (needs a login) or offline (files only, `wandb sync` later)
    wandb_project: str | None = None
    wandb_mode: WandbMode = "online"
    # seconds a collective waits for the other ranks before the run stops with an error (a
    # dead or hung rank); also bounds the slowest rank's share of a checkpoint save
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
    """Parameter-efficient fine-tuning (the ``peft.*`` keys; :mod:`probsft_megatron.lora`).

    ``method``: ``none`` (full fine-tuning) or ``lora``; ``rank``, ``alpha`` (the adapter's
    output is scaled by ``alpha / rank``), ``dropout`` (on the adapter's input), and
    ``target_modules``: megatron's linears to adapt (``all-linear`` names all four). The
    output layer and the embeddings stay frozen."""

    method: PeftMethod = "none"
    rank: Count = Field(16, description="e.g. 16")
    alpha: float = Field(32.0, gt=0, description="the adapter is scaled by alpha/rank")
    dropout: Annotated[float, FRACTION] = 0.0
    target_modules: Names = Field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        targets = list(self.target_modules)
        if targets == ["all-linear"]:
            object.__setattr__(self, "target_modules", list(LORA_TARGETS))
            targets = list(LORA_TARGETS)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            frozen = " (the output layer and embeddings stay frozen)" if unknown else ""
            raise ConfigError(
                f"peft.target_modules has {unknown[0] if unknown else 'nothing'!r}, which is not "
                f"a linear LoRA can adapt{frozen}; use some of {', '.join(LORA_TARGETS)} "
                "or all-linear"
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@section(frozen=False)
class TrainJobConfig:
    """The sections of a training job. The sections are frozen; this container is not, so a
    caller assembling a job may put a whole section in place (``cfg.model = ...``).
    Training itself reads the frozen :class:`~probsft_megatron.job.Job`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int) -> int:
        """Check the whole job against ``world_size`` processes; returns the DP size
        (:func:`validate`)."""
        return validate(self, world_size)


# -- validation --------------------------------------------------------------------------------


def validate_layout(
    parallel: ParallelConfig, world_size: int, model: ModelConfig | None = None
) -> int:
    """Check a parallel layout against the world size and (optionally) the model; returns
    the data-parallel size."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError(
            f"TP*PP = {tp}*{pp} = {tp * pp} does not divide the world size {world_size}; "
            "change parallel.tensor_model_parallel_size / parallel.pipeline_model_parallel_size "
            "or the number of processes"
        )
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError(
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"
        )
    if model is not None:
        for key, value in (
            ("num_attention_heads", model.num_attention_heads),
            ("num_query_groups", model.num_query_groups),
            ("vocab_size", model.vocab_size),
            ("ffn_hidden_size", model.ffn_hidden_size),
        ):
            if value % tp:
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
        if parallel.recompute_granularity == "full" and parallel.recompute_num_layers > per_stage:
            raise ConfigError(
                f"parallel.recompute_num_layers={parallel.recompute_num_layers} exceeds the "
                f"{per_stage} layers of a pipeline stage; use 1..{per_stage}"
            )
    return world_size // (tp * pp)


def validate(cfg: TrainJobConfig, world_size: int) -> int:
    """The one validation of a job for ``world_size`` processes; returns the DP size.

    Checks what single keys cannot: the layout (:func:`validate_layout`), the batch split,
    the objective's spelling, the data sources, Transformer Engine for ``train.attention=te``,
    the sequence length against the model. Looks at no file (a run and its dry run check
    those first, :func:`probsft_megatron.input_checks.check_files`, through
    :func:`probsft_megatron.job.resolve_job`), so a job can be planned for another machine.
    """
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
    if t.wandb_project is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
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


# -- resolution of single values ------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """``train.precision`` (``auto`` | ``bf16`` | ``fp32``) -> ``bfloat16`` | ``float32``;
    ``auto`` is bf16 where CUDA exists and fp32 on the CPU."""
    if precision == "auto":
        return "bfloat16" if hardware.cuda_available() else "float32"
    _one_of("train.precision", precision, typing.get_args(Precision))
    return PRECISIONS[precision]


def resolve_attention(impl: str) -> str:
    """``auto`` is ``te`` (Transformer Engine layer spec) where TE is installed and CUDA
    exists, else ``sdpa``; other values are returned as they are."""
    _one_of("train.attention", impl, ATTENTION_IMPLS)
    if impl != "auto":
        return impl
    return "te" if hardware.cuda_available() and hardware.te_available() else "sdpa"


# -- loading -----------------------------------------------------------------------------------


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
    if Path(ref).is_dir():
        raise ConfigError(
            f"config {ref} is a folder; name a recipe YAML file in it or a shipped recipe "
            f"({', '.join(list_recipes())})"
        )
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.append(relative_to / ref)
    for c in candidates:
        if c.is_file():
            return c
    shipped = resources.find("recipes", ref)
    if shipped is not None:
        return shipped
    raise ConfigError(
        f"config {ref!r} not found (looked for a file and for a recipe named "
        f"{ref!r} in {resources.describe_search('recipes')}; recipes: "
        f"{', '.join(list_recipes())})"
    )


def load_raw(ref: str, relative_to: Path | None = None, seen: tuple = ()) -> dict:
    """The raw mapping of a recipe (a path or a shipped name), ``base`` chains merged."""
    path = _resolve_recipe_path(ref, relative_to).resolve()
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
    model = raw.get("model")
    if isinstance(model, str):
        raw["model"] = load_preset(model)
    elif isinstance(model, dict):
        for key in ("preset", "__preset__"):
            if key in model:
                model = dict(model)
                raw["model"] = deep_merge(load_preset(str(model.pop(key))), model)
                break
    return from_mapping(TrainJobConfig, raw)


def load_config(ref: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainJobConfig:
    """Load a recipe (path or name under configs/recipes) and apply dotted overrides."""
    raw = load_raw(ref) if ref else {}
    for o in overrides:
        raw = apply_override(raw, o)
    return build_config(raw)


def world_size_from_env(default: int = 1) -> int:
    return int(os.environ.get("WORLD_SIZE", default))
