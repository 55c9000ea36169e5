"""The training configuration: every section and its one validation (resolution: :mod:`.job`).

A recipe is a YAML mapping whose sections mirror :class:`TrainJobConfig`; ``model`` may be a
preset name (``configs/models/<name>.yaml``) or a mapping of :class:`ModelConfig` fields, and
a recipe may start from another with ``base: <recipe name or path>``. Overrides are
``section.key=value`` strings (``optim.lr=4e-5``, ``loss.objective=GeneralFamily-8``).

Three steps, each once:

1. **load** (:func:`load_config`): YAML + overrides -> frozen section dataclasses; each value is
   type-checked and range-checked where it is read (``__post_init__``), so a bad key or value
   fails with one line naming it.
2. **validate** (:func:`validate`): the combinations, for a given world size: TP*PP dividing the
   world size, the micro batch dividing the global batch, heads/vocabulary divisible by TP,
   recomputation layers per stage, the objective's spelling, data sources. With
   ``files=True`` (what a run and its dry run ask, through ``resolve_job``) also every path
   the job reads or writes (:func:`probsft_megatron.input_checks.check_files`, its own
   module): the data files exist and are files, the tokenizer and ``init.checkpoint`` are
   what they should be and intact (their manifests),
   ``train.output_dir`` can be written and does not overlap an input, and a resume would
   not start from a damaged checkpoint. Cheap: no process group, tokenizer or model is
   built, and no data file is read.
3. **resolve** (:func:`probsft_megatron.job.resolve_job`): validate, then decide what a run
   derives from the config (the checkpoint's model, DP size, dtype, attention, objective,
   tokenizer, paths) into a frozen :class:`~probsft_megatron.job.Job`, which training reads.
   ``probsft train --dry-run`` and the real run both start with it. It lives in its own
   module because it reads a converted checkpoint's ``model_config.json``
   (:mod:`probsft_megatron.model_dir`, which itself needs :class:`ModelConfig`).

This module is longer than the others on purpose: it is one concern, every key a job
accepts with its default, its check and the checks that combine keys, and a reader looking up
a key should find all of that in one file.

Sections are frozen: code that needs a variant builds one with :func:`dataclasses.replace`
(or assigns a whole new section to the :class:`TrainJobConfig` it is assembling).
This module imports neither megatron nor torch at import time (``probsft objectives`` and
``--dry-run`` stay instant). YAML reading and type coercion live in
:mod:`probsft_megatron.typed_yaml`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron import hardware, resources
from probsft_megatron.errors import ConfigError
from probsft_megatron.typed_yaml import apply_override, deep_merge, from_mapping, read_yaml_mapping

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

ARCHITECTURES = ("llama", "qwen2")
ATTENTION_IMPLS = ("auto", "sdpa", "local", "te")
PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}
"""``train.precision`` -> parameter dtype name (``auto``: bf16 with CUDA, fp32 on the CPU)."""
NORMALIZATIONS = ("kept", "response", "sample")
SAMPLE_UNITS = ("example", "turn")
IMPLEMENTATIONS = ("unfused", "fused")
PERCENTILE_SCOPES = ("global", "micro")
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
SCHEDULES = ("cosine", "constant")
SOURCES = ("file", "figfont")
CHAT_TEMPLATES = ("chatml", "qwen2.5", "llama-3")
"""Chat templates shipped in ``configs/chat_templates/<name>.jinja``."""
FORMATS = ("auto", "jsonl", "parquet", "numina", "m23k")
TRUNCATIONS = ("turn", "right", "error")
PADDINGS = ("longest", "max_length")
TRAIN_ON = ("all_assistant", "last_assistant")


def _one_of(key: str, value: Any, allowed, hint: str = "") -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; use one of {', '.join(allowed)}{hint}")


def _at_least(key: str, value: Any, low: float, hint: str = "") -> None:
    """``value >= low`` (and a finite number), else a one-line ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ConfigError(f"{key} must be >= {low:g} (got {value!r}){hint}")
    if value == float("inf"):
        raise ConfigError(f"{key} must be a finite number (got {value!r})")


def _positive(key: str, value: Any, hint: str = "") -> None:
    """``value > 0`` (and a finite number), else a one-line ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be > 0 (got {value!r}){hint}")
    if value == float("inf"):
        raise ConfigError(f"{key} must be a finite number (got {value!r})")


# -- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer in Hugging Face terms.

    ``arch`` selects the family: ``qwen2`` (q/k/v bias) or ``llama`` (no biases; Llama-3 rope
    scaling when ``rope_scaling_factor`` is set). ``head_dim`` defaults to hidden/heads.
    """

    arch: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int | None = None
    vocab_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = None  # None: the family's default (qwen2: True, llama: False)
    rope_scaling_factor: float | None = None  # Llama-3 "llama3" rope scaling factor
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"model.arch={self.arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}"
            )
        for key in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "max_position_embeddings",
        ):
            _at_least(f"model.{key}", getattr(self, key), 1)
        if self.head_dim is not None:
            _at_least("model.head_dim", self.head_dim, 1)
        for key in ("rope_theta", "rms_norm_eps", "init_std"):
            _positive(f"model.{key}", getattr(self, key))
        if self.rope_scaling_factor is not None:
            _positive("model.rope_scaling_factor", self.rope_scaling_factor)
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}"
            )
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


@dataclass(frozen=True)
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

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1

    def __post_init__(self) -> None:
        _at_least("parallel.tensor_model_parallel_size", self.tensor_model_parallel_size, 1)
        _at_least("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size, 1)
        _one_of(
            "parallel.recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES
        )
        _one_of("parallel.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        if self.recompute_num_layers < 1:
            raise ConfigError(
                f"parallel.recompute_num_layers must be >= 1 (got {self.recompute_num_layers})"
            )

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


@dataclass(frozen=True)
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
    normalization: str = "kept"
    implementation: str = "unfused"
    chunk_size: int = 512
    percentile_scope: str = "global"
    sample_unit: str = "example"

    def __post_init__(self) -> None:
        _one_of(
            "loss.sample_unit",
            self.sample_unit,
            SAMPLE_UNITS,
            " (what normalization=sample averages: whole examples or assistant turns)",
        )
        if (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise ConfigError(
                f"loss.chunk_size={self.chunk_size!r} is invalid; use a positive number of tokens "
                "per chunk of the fused loss (e.g. 512)"
            )
        _one_of(
            "loss.percentile_scope",
            self.percentile_scope,
            PERCENTILE_SCOPES,
            " ('global': exact over the global batch, 'micro': per micro-batch, no extra forward)",
        )
        _one_of("loss.implementation", self.implementation, IMPLEMENTATIONS)
        if self.normalization == "sample" and self.implementation == "fused":
            raise ConfigError(
                "loss.normalization=sample needs loss.implementation=unfused (the fused head "
                "weights every response token alike); set one of them"
            )
        _one_of(
            "loss.normalization",
            self.normalization,
            NORMALIZATIONS,
            " ('kept': divide by the tokens the objective keeps, the paper's default; "
            "'response': all response tokens; 'sample': each example's mean, averaged)",
        )

    @property
    def is_auto(self) -> bool:
        """Whether the objective is ``auto`` (chosen by the probe when training starts)."""
        return isinstance(self.objective, str) and self.objective.strip().lower() == "auto"


@dataclass(frozen=True)
class DataConfig:
    """Where the SFT examples come from and how they are tokenized (the ``data.*`` keys)."""

    source: str = "file"
    """``file`` (``train_files``) or ``figfont`` (generated offline, no files needed)."""
    train_files: list[str] = field(default_factory=list)
    """Local ``.jsonl`` / ``.json`` / ``.parquet`` files, read in this order."""
    val_files: list[str] = field(default_factory=list)
    """Held-out files (same format and fields as ``train_files``): the validation loss every
    ``train.eval_interval`` steps and at the last step; empty: no validation."""
    format: str = "auto"
    """``auto`` (by extension, fields from the keys below), ``jsonl``, ``parquet``, or a
    field preset: ``numina`` (NuminaMath-CoT) or ``m23k`` (the paper's medical set)."""
    prompt_key: str = "prompt"
    response_key: str = "response"
    prompt_dict_keys: list[str] | None = None
    """When ``prompt_key`` holds a dict, the nested keys to follow (outermost first)."""
    response_dict_keys: list[str] | None = None
    messages_key: str | None = None
    """The field holding a conversation (OpenAI ``messages`` or ShareGPT ``conversations``);
    None: ``messages`` or ``conversations`` when a record has no prompt/response fields."""
    tools_key: str = "tools"
    """The field with a conversation's tool definitions (passed to the chat template)."""
    train_on: str = "all_assistant"
    """Which assistant turns of a conversation are trained: ``all_assistant`` or
    ``last_assistant``; a message's own ``train`` (bool or weight) or ``weight`` wins."""
    chat_template: str = "auto"
    """``auto`` (the tokenizer's template if it has one), ``none``, a shipped template's name
    (``qwen2.5``, ``llama-3``, ``chatml``), a ``.jinja`` file, or a Jinja template."""
    system_prompt: str | None = None
    """System message of the chat template (needs a template)."""
    max_length: int = 1024
    """Longest example in tokens (prompt + response)."""
    truncation: str = "turn"
    """``turn``: cut a longer conversation after its last whole assistant turn that fits (at
    ``max_length`` when not even the first fits); ``right``: cut at ``max_length``;
    ``error``: refuse longer examples. Cut examples are counted."""
    cache: bool = True
    """Tokenize once into a store (memory-mapped by every rank, reused by later runs with
    the same data, tokenizer and settings); false: tokenize in memory on every rank."""
    cache_dir: str | None = None
    """Where stores live (default: ``$PROBSFT_CACHE/data``); on a cluster, a filesystem
    every node sees, so one process per job builds it."""
    padding: str = "longest"
    """Without packing: ``longest`` pads each micro-batch to its longest example (rounded
    up to a multiple of 8 and of the TP size); ``max_length`` pads every row to
    ``max_length`` (computes padding; kept for comparison)."""
    packing: bool = False
    """Concatenate each micro-batch's examples into one row with their boundaries
    (``cu_seqlens``, megatron's ``PackedSeqParams``): attention and rotary positions restart
    per example, no padding between examples, no ``s x s`` mask. Same global batches."""
    num_samples: int | None = None
    """Use only the first N records (file order, before any shuffling)."""
    figfont_split: str = "train"
    seed: int = 42
    """Seed of the per-epoch shuffle (pass it to the batch loader). The figfont generator
    always uses the paper's seed, so its train and test splits never overlap."""

    def __post_init__(self) -> None:
        """Per-key checks (every default passes, so a default config can be filled in later)."""
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is unknown; use one of {list(SOURCES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is unknown; use one of {list(FORMATS)}")
        if self.padding not in PADDINGS:
            raise ConfigError(
                f"data.padding={self.padding!r} is unknown; use one of {list(PADDINGS)}"
            )
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(
                f"data.truncation={self.truncation!r} is unknown; use one of {list(TRUNCATIONS)}"
            )
        _one_of("data.train_on", self.train_on, TRAIN_ON)
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
        if isinstance(self.train_files, str):
            raise ConfigError("data.train_files must be a list of paths, e.g. [train.jsonl]")
        if isinstance(self.val_files, str):
            raise ConfigError("data.val_files must be a list of paths, e.g. [val.jsonl]")
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(
                f"data.num_samples must be >= 1 (or null for all), got {self.num_samples}"
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


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay (the paper's verl defaults), megatron's optimizer.

    ``grad_reduce_in_fp32``: megatron DDP keeps the gradient buffers and reduces them over
    data-parallel ranks in float32 even when parameters are bf16 (more memory, exact sums).
    """

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
    grad_reduce_in_fp32: bool = True

    def __post_init__(self) -> None:
        _one_of("optim.schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1) (got {self.warmup_ratio!r})")
        _positive("optim.lr", self.lr, " (the peak learning rate, e.g. 5e-5)")
        _at_least("optim.min_lr", self.min_lr, 0)
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optim.min_lr={self.min_lr!r} is above optim.lr={self.lr!r}; the schedule decays "
                "from lr to min_lr: lower min_lr"
            )
        _at_least("optim.weight_decay", self.weight_decay, 0)
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1) (got {value!r})")
        _positive("optim.adam_eps", self.adam_eps)
        _at_least("optim.clip_grad", self.clip_grad, 0, " (0 turns clipping off)")


@dataclass(frozen=True)
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
    # resume from the newest *intact* checkpoint when newer ones are damaged (each is named in
    # a warning); without it a damaged newest checkpoint stops the run before any work
    resume_skip_damaged: bool = False
    tensorboard: bool = True
    # validation on data.val_files: every eval_interval steps and at the last step (0: only at
    # the last step); eval_batches global batches of it (null: all of it)
    eval_interval: int = 0
    eval_batches: int | None = None
    # Weights & Biases as a metrics sink beside metrics.jsonl and TensorBoard (null: off);
    # wandb_mode: online (needs a login) or offline (files only, `wandb sync` later)
    wandb_project: str | None = None
    wandb_mode: str = "online"
    # seconds a collective waits for the other ranks before the run stops with an error (a
    # dead or hung rank); also bounds the slowest rank's share of a checkpoint save
    dist_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        for key in ("global_batch_size", "micro_batch_size", "epochs", "log_interval"):
            _at_least(f"train.{key}", getattr(self, key), 1)
        if self.max_steps is not None:
            _at_least("train.max_steps", self.max_steps, 1, " (or null: every step of the epochs)")
        _at_least("train.save_interval", self.save_interval, 0, " (0: save only at the end)")
        _at_least("train.histogram_interval", self.histogram_interval, 0, " (0: never)")
        _at_least("train.eval_interval", self.eval_interval, 0, " (0: only at the last step)")
        if self.eval_batches is not None:
            _at_least("train.eval_batches", self.eval_batches, 1, " (or null: all of it)")
        _one_of("train.wandb_mode", self.wandb_mode, ("online", "offline"))
        if self.wandb_project is not None and not str(self.wandb_project).strip():
            raise ConfigError("train.wandb_project is empty; name a W&B project or set it null")
        if not str(self.output_dir).strip():
            raise ConfigError("train.output_dir is empty; name the run's folder, e.g. runs/sft")
        _one_of("train.attention", self.attention, ATTENTION_IMPLS)
        _one_of("train.precision", self.precision, ("auto", *PRECISIONS))
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1 (got {self.keep_last})")
        if not self.dist_timeout_s > 0:
            raise ConfigError(
                f"train.dist_timeout_s must be > 0 seconds (got {self.dist_timeout_s}); "
                "600 suits GPU clusters, raise it when a checkpoint save takes longer"
            )


@dataclass(frozen=True)
class InitConfig:
    checkpoint: str | None = None  # a Megatron model dir (probsft convert) or None = random init
    tokenizer: str | None = None  # HF tokenizer dir; default: the checkpoint's hf/ folder


PEFT_METHODS = ("none", "lora")
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""megatron's linears LoRA can adapt (attention qkv and output, MLP fc1 and fc2)."""


@dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (the ``peft.*`` keys; :mod:`probsft_megatron.lora`).

    ``method``: ``none`` (full fine-tuning) or ``lora``; ``rank``, ``alpha`` (the adapter's
    output is scaled by ``alpha / rank``), ``dropout`` (on the adapter's input), and
    ``target_modules``: megatron's linears to adapt (``all-linear`` names all four). The
    output layer and the embeddings stay frozen."""

    method: str = "none"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        _one_of("peft.method", self.method, PEFT_METHODS)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"peft.rank must be an integer >= 1 (got {self.rank!r}); e.g. 16")
        _positive("peft.alpha", self.alpha, " (the adapter is scaled by alpha/rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout must be in [0, 1) (got {self.dropout!r})")
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


@dataclass
class TrainJobConfig:
    """The sections of a training job. The sections are frozen; this container is not, so a
    caller assembling a job may put a whole section in place (``cfg.model = ...``).
    Training itself reads the frozen :class:`~probsft_megatron.job.Job`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int, *, files: bool = False) -> int:
        """Check the whole job against ``world_size`` processes; returns the DP size
        (:func:`validate`; ``files=True`` also checks every path,
        :func:`probsft_megatron.input_checks.check_files`)."""
        return validate(self, world_size, files=files)


# -- validation --------------------------------------------------------------------------------


def validate_layout(
    parallel: ParallelConfig, world_size: int, model: ModelConfig | None = None
) -> int:
    """Check a parallel layout against the world size and (optionally) the model; returns
    the data-parallel size."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError(
            "parallel.tensor_model_parallel_size and "
            "parallel.pipeline_model_parallel_size must be >= 1"
        )
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


def validate(cfg: TrainJobConfig, world_size: int, *, files: bool = False) -> int:
    """The one validation of a job for ``world_size`` processes; returns the DP size.

    Checks what single keys cannot: the layout (:func:`validate_layout`), the batch split,
    the objective's spelling, the data sources, Transformer Engine for ``train.attention=te``,
    the sequence length against the model. With ``files`` (a run and its dry run, through
    :func:`probsft_megatron.job.resolve_job`) first every path the job reads or writes
    (:func:`probsft_megatron.input_checks.check_files`); without it (planning a job for
    another machine, as the launcher does) no file is looked at. Touches no process group,
    tokenizer or model, and reads no data file.
    """
    if world_size < 1:
        raise ConfigError(f"the number of processes must be >= 1 (got {world_size})")
    if files:
        from probsft_megatron.input_checks import check_files

        check_files(cfg)
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
    if not cfg.loss.is_auto:
        from probsft_megatron.objectives import parse_objective

        parse_objective(cfg.loss.objective)
    return dp


# -- resolution of single values ------------------------------------------------------------


def resolve_precision(precision: str) -> str:
    """``train.precision`` (``auto`` | ``bf16`` | ``fp32``) -> ``bfloat16`` | ``float32``;
    ``auto`` is bf16 where CUDA exists and fp32 on the CPU."""
    if precision == "auto":
        return "bfloat16" if hardware.cuda_available() else "float32"
    _one_of("train.precision", precision, ("auto", *PRECISIONS))
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
    return from_mapping(TrainJobConfig, raw, "")


def load_config(ref: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainJobConfig:
    """Load a recipe (path or name under configs/recipes) and apply dotted overrides."""
    raw = load_raw(ref) if ref else {}
    for o in overrides:
        raw = apply_override(raw, o)
    return build_config(raw)


def world_size_from_env(default: int = 1) -> int:
    return int(os.environ.get("WORLD_SIZE", default))
