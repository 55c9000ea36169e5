"""`probsft eval`: evaluate a Hugging Face model folder with vLLM, e.g.
``probsft eval --model ckpt/hf --task math500,aime24 --n 16 --temperature 1 --out results/``.
Every argument is checked (:func:`check_args`) before a model, tokenizer or engine loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from probsft_megatron.errors import CheckpointError, ConfigError, ProbsftError
from probsft_megatron.input_checks import TOKENIZER_FILES

# model types whose prompt format is detected; others need --prompt-format
KNOWN_MODEL_TYPES = ("qwen2", "qwen3", "llama")
DTYPES = ("auto", "bfloat16", "float16", "float32")
_OPTIONS = (
    ("--tensor-parallel-size", dict(type=int, default=1, help="GPUs per model (vLLM TP)")),
    ("--n", dict(type=int, help="samples per problem (math default 16, others 1)")),
    ("--temperature", dict(type=float, help="sampling temperature (math default 1.0, others 0)")),
    ("--top-p", dict(type=float, help="nucleus sampling mass (default 1.0)")),
    (
        "--max-new-tokens",
        dict(
            type=int,
            help="tokens generated per sample (math 4096, figfont 5, medical 4096, custom 1024)",
        ),
    ),
    ("--seed", dict(type=int, default=0, help="sampling seed (problem i uses seed + i)")),
    ("--limit", dict(type=int, help="evaluate only the first N problems of each task")),
    (
        "--prompt-format",
        dict(
            help="qwen, llama, deepseek or raw (also qwen-boxed, llama-base-boxed-with-bos, "
            "deepseek-math); detected from the model when omitted"
        ),
    ),
    ("--out", dict(help="folder for samples.jsonl, summary.json and summary.md")),
    (
        "--overwrite",
        dict(action="store_true", help="replace the reports of an earlier evaluation in --out"),
    ),
    ("--data", dict(help="jsonl file for medical/custom (or another copy of a math set)")),
    ("--prompt-field", dict(help="field holding the question/prompt")),
    ("--reference-field", dict(help="field holding the reference answer")),
    ("--options-field", dict(help="field holding the options (medical; default 'options')")),
    ("--grader", dict(help="exact, math, jaro_winkler or choice (overrides the task's grader)")),
    ("--dtype", dict(default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")),
    ("--max-model-len", dict(type=int, help="context length for vLLM (default: the model's)")),
    (
        "--adapter",
        dict(
            help="a LoRA adapter folder (probsft convert megatron-to-hf of a LoRA checkpoint) "
            "to evaluate on top of --model, served by vLLM's LoRA support"
        ),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the eval options on ``parser``."""
    from probsft_megatron.eval.tasks import TASKS

    parser.add_argument(
        "--model", required=True, help="Hugging Face checkpoint folder (config.json + weights)"
    )
    parser.add_argument(
        "--task",
        required=True,
        help=f"task name, or several separated by commas: {', '.join(TASKS)}",
    )
    for flag, options in _OPTIONS:
        parser.add_argument(flag, **options)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, in one line each, what a user can get wrong before anything is loaded."""
    from probsft_megatron import manifest
    from probsft_megatron.eval.runner import adapter_rank, check_hf_model_dir

    if args.adapter is not None:
        adapter_rank(args.adapter)  # a PEFT LoRA folder, or one line saying what it is not

    for flag, value in (
        ("--n", args.n),
        ("--max-new-tokens", args.max_new_tokens),
        ("--limit", args.limit),
        ("--max-model-len", args.max_model_len),
        ("--tensor-parallel-size", args.tensor_parallel_size),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if args.temperature is not None and not args.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (got {args.temperature})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r} is invalid; use one of {', '.join(DTYPES)}")
    if not [t for t in args.task.split(",") if t.strip()]:
        raise ConfigError("--task is empty; name a task, e.g. --task math500")
    folder = Path(args.model)
    kind = manifest.folder_kind(folder)
    if kind in (manifest.MODEL_DIR, manifest.TRAINING_CHECKPOINT, manifest.TRAINING_RUN):
        raise CheckpointError(
            f"--model {folder} is {manifest.describe(folder)}, not a Hugging "
            "Face folder; export it first: probsft convert megatron-to-hf "
            f"--ckpt {folder} --out HF_DIR"
        )
    if folder.is_file():
        raise CheckpointError(
            f"--model {folder} is a file, not a folder; pass a Hugging Face "
            "checkpoint folder (config.json, weights, tokenizer files)"
        )
    check_hf_model_dir(folder)
    manifest.verify(folder)  # an export written by probsft: every file intact
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{folder}/config.json is not valid JSON ({first}); export or save the model again"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder}/config.json does not hold a JSON object")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})"
            "; export it with --hf-template TOKENIZER_DIR or copy the "
            "tokenizer files into it"
        )
    model_type = str(config.get("model_type", "")).lower()
    if args.prompt_format is None and model_type not in KNOWN_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "none listed"
        raise ConfigError(
            f"--model {folder} has model_type {model_type or 'unset'!r} "
            f"(architectures: {arch}), whose prompt format probsft does not know "
            f"(it knows {', '.join(KNOWN_MODEL_TYPES)}); pass --prompt-format "
            "qwen, llama, deepseek or raw to evaluate it with vLLM anyway"
        )
    if args.data is not None and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data} is not a file; name a .jsonl file")
    if args.out is not None:
        manifest.check_output(
            args.out, flag="--out", inputs=[("--model", folder), ("--data", args.data)]
        )
        check_earlier_reports(Path(args.out), args.overwrite)


def check_earlier_reports(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` holding an evaluation's reports (a ``summary.json`` list) unless
    ``overwrite``, and one holding any other ``summary.json`` (a training run's) always."""
    summary = out / "summary.json"
    if not summary.exists():
        return
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, list):
        from probsft_megatron import manifest

        raise ConfigError(
            f"--out {out} holds a summary.json that probsft eval did not write (it holds "
            f"{manifest.describe(out)}); --overwrite replaces only an evaluation's reports: "
            "choose another --out"
        )
    if not overwrite:
        raise ConfigError(
            f"--out {out} already holds the reports of an evaluation (summary.json); pass "
            "--overwrite to replace them, or choose another --out"
        )


def config_from_args(args: argparse.Namespace):
    """The EvalConfig described by parsed command-line arguments."""
    from probsft_megatron.eval.runner import EvalConfig
    from probsft_megatron.eval.tasks import DataOptions

    copied = ("model", "n", "temperature", "top_p", "max_new_tokens", "seed", "limit")
    copied += ("prompt_format", "tensor_parallel_size", "adapter", "dtype", "max_model_len")
    return EvalConfig(
        **{key: getattr(args, key) for key in (*copied, "grader", "out")},
        tasks=[t.strip() for t in args.task.split(",") if t.strip()],
        data=DataOptions(args.data, args.prompt_field, args.reference_field, args.options_field),
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table (and where reports went). Returns the exit code."""
    from probsft_megatron.eval.report import format_notes, markdown_table
    from probsft_megatron.eval.runner import evaluate

    try:
        check_args(args)
        results = evaluate(config_from_args(args))
    except ProbsftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summaries = [r.summary for r in results]
    print(markdown_table(summaries), end="")
    print(format_notes(summaries), end="")
    if args.out:
        print(f"reports written to {args.out}")
    return 0
