"""`probsft eval`: evaluate a Hugging Face model folder with vLLM.

Example::

    probsft eval --model ckpt/hf --task math500,aime24 --n 16 --temperature 1 --out results/
"""
from __future__ import annotations

import argparse
import sys

from probsft_megatron.errors import ProbsftError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the eval options on ``parser``."""
    from probsft_megatron.eval.tasks import TASKS

    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder (config.json + weights)")
    parser.add_argument("--task", required=True,
                        help=f"task name, or several separated by commas: {', '.join(TASKS)}")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (vLLM TP)")
    parser.add_argument("--n", type=int, help="samples per problem (math default 16, others 1)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (math default 1.0, others 0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="tokens generated per sample (math 4096, figfont 5, medical 4096, custom 1024)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (problem i uses seed + i)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems of each task")
    parser.add_argument("--prompt-format",
                        help="qwen, llama, deepseek or raw (also qwen-boxed, llama-base-boxed-with-bos, "
                             "deepseek-math); detected from the model when omitted")
    parser.add_argument("--out", help="folder for samples.jsonl, summary.json and summary.md")
    parser.add_argument("--data", help="jsonl file for medical/custom (or another copy of a math set)")
    parser.add_argument("--prompt-field", help="field holding the question/prompt")
    parser.add_argument("--reference-field", help="field holding the reference answer")
    parser.add_argument("--options-field", help="field holding the options (medical; default 'options')")
    parser.add_argument("--grader", help="exact, math, jaro_winkler or choice (overrides the task's grader)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")
    parser.add_argument("--max-model-len", type=int, help="context length for vLLM (default: the model's)")


def config_from_args(args: argparse.Namespace):
    """The EvalConfig described by parsed command-line arguments."""
    from probsft_megatron.eval.runner import EvalConfig
    from probsft_megatron.eval.tasks import DataOptions

    return EvalConfig(
        model=args.model,
        tasks=[t.strip() for t in args.task.split(",") if t.strip()],
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        limit=args.limit,
        prompt_format=args.prompt_format,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        grader=args.grader,
        data=DataOptions(args.data, args.prompt_field, args.reference_field, args.options_field),
        out=args.out,
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table (and where reports went). Returns the exit code."""
    from probsft_megatron.eval.report import format_notes, markdown_table
    from probsft_megatron.eval.runner import evaluate

    try:
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
