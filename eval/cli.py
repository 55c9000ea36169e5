"""`probsft eval`: evaluate a Hugging Face model folder with vLLM, e.g.
``probsft eval --model ckpt/hf --task math500,aime24 --n 16 --temperature 1 --out results/``.
Every argument is checked (:func:`check_args`) before a model, tokenizer or engine loads."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from probsft_megatron.errors import ConfigError, ProbsftError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the eval options on ``parser``."""
    from probsft_megatron.eval.tasks import TASKS

    add = parser.add_argument
    add("--model", required=True, help="Hugging Face checkpoint folder (config.json + weights)")
    add(
        "--task",
        required=True,
        help=f"task name, or several separated by commas: {', '.join(TASKS)}",
    )
    add("--tensor-parallel-size", type=int, default=1, help="GPUs per model (vLLM TP)")
    add("--n", type=int, help="samples per problem (math default 16, others 1)")
    add("--temperature", type=float, help="sampling temperature (math default 1.0, others 0)")
    add("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    add(
        "--max-new-tokens",
        type=int,
        help="tokens generated per sample (math 4096, figfont 5, medical 4096, custom 1024)",
    )
    add("--seed", type=int, default=0, help="sampling seed (problem i uses seed + i)")
    add("--limit", type=int, help="evaluate only the first N problems of each task")
    add(
        "--prompt-format",
        help="qwen, llama, deepseek or raw (also qwen-boxed, llama-base-boxed-with-bos, "
        "deepseek-math); detected from the model when omitted",
    )
    add("--out", help="folder for samples.jsonl, summary.json and summary.md")
    add(
        "--overwrite",
        action="store_true",
        help="replace the reports of an earlier evaluation in --out",
    )
    add("--data", help="jsonl file for medical/custom (or another copy of a math set)")
    add("--prompt-field", help="field holding the question/prompt")
    add("--reference-field", help="field holding the reference answer")
    add("--options-field", help="field holding the options (medical; default 'options')")
    add("--grader", help="exact, math, jaro_winkler or choice (overrides the task's grader)")
    add("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")
    add("--max-model-len", type=int, help="context length for vLLM (default: the model's)")
    add(
        "--adapter",
        help="a LoRA adapter folder (probsft convert megatron-to-hf of a LoRA checkpoint) "
        "to evaluate on top of --model, served by vLLM's LoRA support",
    )


def check_args(args: argparse.Namespace) -> None:
    """Refuse, in one line each, what a user can get wrong before anything is loaded."""
    from probsft_megatron import manifest
    from probsft_megatron.eval.runner import adapter_rank, check_config, check_model

    if args.adapter is not None:
        adapter_rank(args.adapter)  # a PEFT LoRA folder, or one line saying what it is not
    check_config(config_from_args(args))
    folder = Path(args.model)
    check_model(folder, args.prompt_format)
    if args.data is not None and not Path(args.data).is_file():
        raise ConfigError(f"--data {args.data} is not a file; name a .jsonl file")
    if args.out is None:
        return
    out = Path(args.out)
    manifest.check_output(out, flag="--out", inputs=[("--model", folder), ("--data", args.data)])
    # an evaluation's reports (a summary.json list) go only with --overwrite, others never
    summary = out / "summary.json"
    if not summary.exists():
        return
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, list):
        raise ConfigError(
            f"--out {out} holds a summary.json that probsft eval did not write (it holds "
            f"{manifest.describe(out)}); --overwrite replaces only an evaluation's reports: "
            "choose another --out"
        )
    if not args.overwrite:
        raise ConfigError(
            f"--out {out} already holds the reports of an evaluation (summary.json); pass "
            "--overwrite to replace them, or choose another --out"
        )


def config_from_args(args: argparse.Namespace):
    """The EvalConfig described by parsed command-line arguments."""
    from probsft_megatron.eval.runner import EvalConfig
    from probsft_megatron.eval.tasks import DataOptions

    copied = [f.name for f in fields(EvalConfig) if f.name not in ("tasks", "data")]
    return EvalConfig(
        **{key: getattr(args, key) for key in copied},
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
    print(markdown_table(summaries) + format_notes(summaries), end="")
    if args.out:
        print(f"reports written to {args.out}")
    return 0
