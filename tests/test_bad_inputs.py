"""The bad-input suite: every subcommand, fed what a user gets wrong, answers in one line.

Each row of :data:`CASES` is one bad input (a command line over a shared set of real
objects: a tiny Hugging Face checkpoint, its Megatron conversion and export, a tiny training
run with two checkpoints, and damaged copies of them). For every row the test asserts

* the exit code (2: a usage error),
* a short stderr with exactly one ``error:`` line that contains the row's words (the
  problem, and where there is one the fix), and no ``Traceback``,
* that every input file is byte-identical afterwards (a hash of every file under each
  input, before and after) and that no output was left where there was none.

Almost every row fails in the validation phase, so the rows run in this process
(``probsft_megatron.cli.main`` with stdout and stderr captured); the few whose process
boundary matters (the installed console script, a resume that gets as far as loading the
weights) run as subprocesses. The ``train-real-run-*`` rows leave out ``--dry-run``: the real
run calls the same validation first, before any process group, tokenizer or model.
docs/errors.md lists every row with its message; with
``PROBSFT_WRITE_ERRORS_DOC=1`` this module rewrites that list from what the rows printed.

The live SLURM refusal (sbatch rejects a job: its own message, the experiment marked failed)
needs the cluster and is tested in tests/test_slurm_live.py
(test_rejected_submission_is_one_line_and_marked_failed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from probsft_megatron.cli import main

DOC = REPO / "docs" / "errors.md"
WRITE_DOC = os.environ.get("PROBSFT_WRITE_ERRORS_DOC") == "1"
MAX_STDERR_LINES = 12
"""Warnings a third-party library prints before the error (torch's FutureWarnings while a
checkpoint is read) may precede the one error line, and so may a real run's first lines
(the data store, the steps it will train) in a case that gets as far as loading the
weights; nothing else may."""


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` (a template over the world's paths), the words the error line
    must contain, the inputs that must stay byte-identical and the outputs that must not
    appear."""

    id: str
    group: str
    argv: str
    needle: str
    inputs: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    code: int = 2
    subprocess: bool = False
    xfail: str = ""
    """Why the input is not refused yet (the case is expected to fail until it is)."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment variables of a subprocess case (templates over the world's paths)."""


DESTROY = "an output that would destroy an input"
DAMAGED = "damaged checkpoints and exports"
RANGE = "values out of range"
FILES = "missing, empty or wrong files"
KIND = "the wrong kind of folder"
LAYOUT = "layouts that cannot run or fit"
NAMES = "unknown names and keys"
USAGE = "usage: options and arguments"

TRAIN = "train --config {recipe} --dry-run"
# fmt: off
# (one row a case, kept compact: the table is read more than it is edited)
CASES = [
    # -- no command destroys its input -----------------------------------------------------
    Case("convert-run-over-its-own-run", DESTROY,
         "convert megatron-to-hf --ckpt {run}/checkpoints/step_0000002 --out {run} --overwrite",
         "contains the input --ckpt", ("run",)),
    Case("convert-hf-onto-itself", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {hf} --overwrite", "is the input --hf", ("hf",)),
    Case("convert-hf-onto-itself-no-overwrite", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {hf}", "is the input --hf", ("hf",)),
    Case("convert-megatron-onto-itself", DESTROY,
         "convert megatron-to-hf --ckpt {mg} --out {mg} --overwrite", "is the input --ckpt",
         ("mg",)),
    Case("convert-out-inside-input", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {hf}/megatron", "lies inside the input --hf",
         ("hf",), ("{hf}/megatron",)),
    Case("convert-out-contains-input", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {W} --overwrite", "contains the input --hf",
         ("hf",)),
    Case("convert-out-is-template", DESTROY,
         "convert megatron-to-hf --ckpt {mg} --hf-template {hf_tok} --out {hf_tok} --overwrite",
         "is the input --hf-template", ("mg", "hf_tok")),
    Case("convert-overwrite-foreign-folder", DESTROY,
         "convert megatron-to-hf --ckpt {mg} --out {notes} --overwrite",
         "not a Hugging Face export written by probsft", ("mg", "notes")),
    Case("convert-overwrite-foreign-hf-folder", DESTROY,
         "convert megatron-to-hf --ckpt {mg} --out {hf} --overwrite",
         "holds a Hugging Face folder, not a Hugging Face export", ("mg", "hf")),
    Case("convert-overwrite-training-checkpoint", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {run}/checkpoints/step_0000001 --overwrite",
         "holds a training checkpoint, not a Megatron model dir", ("hf", "run")),
    Case("convert-existing-without-overwrite", DESTROY,
         "convert hf-to-megatron --hf {hf} --out {mg}",
         "already holds a Megatron model dir; pass --overwrite", ("hf", "mg")),
    Case("train-output-dir-is-a-model", DESTROY, TRAIN + " train.output_dir={mg}",
         "holds a Megatron model dir, not a training run", ("mg",)),
    Case("train-output-dir-contains-data", DESTROY,
         TRAIN + " data.source=file data.train_files=[{datadir}/train.jsonl] "
         "train.output_dir={datadir}", "contains the input data.train_files", ("datadir",)),
    Case("train-output-dir-inside-checkpoint", DESTROY,
         TRAIN + " init.checkpoint={mg_tok} train.output_dir={mg_tok}/run",
         "lies inside the input init.checkpoint", ("mg_tok",), ("{mg_tok}/run",)),
    Case("probe-out-inside-model", DESTROY,
         "probe --model {mg} --data figfont --out {mg}/probe", "lies inside the input --model",
         ("mg",), ("{mg}/probe",)),
    Case("eval-out-is-model", DESTROY,
         "eval --model {hf_tok} --task gsm8k --out {hf_tok}", "is the input --model",
         ("hf_tok",)),
    Case("data-generate-over-its-input", DESTROY,
         "data generate self-addition --from-eval {samples} --out {samples}",
         "is the input --from-eval", ("samples",)),
    Case("train-output-dir-foreign-folder", DESTROY, TRAIN + " train.output_dir={notes}",
         "holds other files, not a training run", ("notes",)),
    Case("convert-smollm2-into-foreign-folder", DESTROY, "convert smollm2 --out {notes}",
         "holds other files, not a Megatron model dir", ("notes",)),
    Case("train-output-dir-in-use", DESTROY, TRAIN + " train.output_dir={run_locked}",
         "train.output_dir {run_locked} is in use by another training run: pid", ("run_locked",)),
    Case("train-real-run-output-dir-in-use", DESTROY,
         "train --config {recipe} train.output_dir={run_locked}",
         "is in use by another training run", ("run_locked",)),
    Case("eval-out-holds-an-evaluation", DESTROY,
         "eval --model {hf_tok} --task gsm8k --out {evaldone}",
         "already holds the reports of an evaluation (summary.json); pass --overwrite",
         ("hf_tok", "evaldone")),
    Case("eval-out-is-a-run", DESTROY,
         "eval --model {hf_tok} --task gsm8k --out {run} --overwrite",
         "holds a summary.json that probsft eval did not write", ("hf_tok", "run")),
    Case("probe-out-holds-a-probe-report", DESTROY,
         "probe --model {mg} --data figfont --out {probedone}",
         "already holds a probe report (report.json); pass --overwrite", ("mg", "probedone")),
    Case("probe-out-holds-another-report", DESTROY,
         "probe --model {mg} --data figfont --out {otherreport} --overwrite",
         "holds a report.json that probsft probe did not write", ("mg", "otherreport")),
    Case("data-generate-over-existing-file", DESTROY,
         "data generate addition --n 2 --out {gen_existing}",
         "already holds generated addition records; pass --overwrite", ("gen_existing",)),
    Case("data-generate-overwrite-foreign-file", DESTROY,
         "data generate addition --n 2 --out {data} --overwrite",
         "is not a file written by probsft data generate", ("data",)),
    # -- damaged checkpoints and exports ----------------------------------------------------
    Case("resume-truncated-shard", DAMAGED, TRAIN + " train.output_dir={run_truncated}",
         "checkpoint step 2 ({run_truncated}/checkpoints/step_0000002) is damaged: "
         "weights/__0_0.distcp is 1000 bytes", ("run_truncated",)),
    Case("resume-corrupt-train-state", DAMAGED, TRAIN + " train.output_dir={run_badstate}",
         "train_state.json is 9 bytes, its manifest lists", ("run_badstate",)),
    Case("resume-corrupt-train-state-no-manifest", DAMAGED,
         TRAIN + " train.output_dir={legacy_badstate}",
         "is damaged: it has no probsft_manifest.json (it was not written by probsft",
         ("legacy_badstate",)),
    Case("resume-flipped-byte", DAMAGED, TRAIN + " train.output_dir={run_flipped}",
         "does not match its checksum", ("run_flipped",)),
    Case("resume-missing-listed-file", DAMAGED, TRAIN + " train.output_dir={run_nostate}",
         "checkpoint step 2 ({run_nostate}/checkpoints/step_0000002) is damaged: "
         "train_state.json is missing; resume from step 1", ("run_nostate",)),
    Case("resume-every-checkpoint-damaged", DAMAGED,
         TRAIN + " train.output_dir={run_all_damaged} train.resume_skip_damaged=true",
         "every checkpoint under", ("run_all_damaged",)),
    Case("resume-truncated-shard-no-manifest", DAMAGED,
         "train --config {recipe} train.output_dir={legacy_truncated}",
         "is damaged: it has no probsft_manifest.json", ("legacy_truncated",), subprocess=True),
    Case("export-truncated-shard", DAMAGED,
         "convert megatron-to-hf --ckpt {run_truncated}/checkpoints/step_0000002 --out {W}/x1",
         "use the previous step", ("run_truncated",), ("{W}/x1",)),
    Case("export-truncated-shard-no-manifest", DAMAGED,
         "convert megatron-to-hf --ckpt {legacy_truncated}/checkpoints/step_0000002 "
         "--out {W}/x2", "is damaged: it has no probsft_manifest.json", ("legacy_truncated",),
         ("{W}/x2",)),
    Case("export-damaged-model-dir", DAMAGED,
         "convert megatron-to-hf --ckpt {mg_damaged} --out {W}/x3",
         "is damaged: weights/__0_0.distcp", ("mg_damaged",), ("{W}/x3",)),
    Case("convert-damaged-export", DAMAGED,
         "convert hf-to-megatron --hf {export_damaged} --out {W}/x4",
         "is damaged: model.safetensors", ("export_damaged",), ("{W}/x4",)),
    Case("init-checkpoint-damaged", DAMAGED, TRAIN + " init.checkpoint={mg_damaged}",
         "is damaged: weights/__0_0.distcp", ("mg_damaged",)),
    Case("probe-damaged-model", DAMAGED, "probe --model {mg_damaged} --data figfont",
         "is damaged", ("mg_damaged",)),
    Case("eval-damaged-export", DAMAGED, "eval --model {export_damaged} --task gsm8k",
         "is damaged: model.safetensors", ("export_damaged",)),
    # -- values out of range ------------------------------------------------------------------
    Case("train-lr-negative", RANGE, TRAIN + " optim.lr=-1", "optim.lr must be > 0"),
    Case("train-lr-zero", RANGE, TRAIN + " optim.lr=0", "optim.lr must be > 0"),
    Case("train-lr-nan", RANGE, TRAIN + " optim.lr=nan", "optim.lr must be > 0"),
    Case("train-min-lr-above-lr", RANGE, TRAIN + " optim.min_lr=1", "is above optim.lr"),
    Case("train-max-steps-negative", RANGE, TRAIN + " train.max_steps=-5",
         "train.max_steps must be >= 1"),
    Case("train-max-steps-zero", RANGE, TRAIN + " train.max_steps=0",
         "train.max_steps must be >= 1"),
    Case("train-global-batch-zero", RANGE, TRAIN + " train.global_batch_size=0",
         "train.global_batch_size must be >= 1"),
    Case("train-epochs-zero", RANGE, TRAIN + " train.epochs=0", "train.epochs must be >= 1"),
    Case("train-lora-rank-zero", RANGE, TRAIN + " peft.method=lora peft.rank=0",
         "peft.rank must be >= 1"),
    Case("train-lora-unknown-target", NAMES, TRAIN + " peft.method=lora peft.target_modules=q_proj",
         "is not a linear LoRA can adapt"),
    Case("train-peft-method-unknown", NAMES, TRAIN + " peft.method=dora",
         "peft.method='dora' is invalid; use one of none, lora"),
    Case("train-train-on-unknown", NAMES, TRAIN + " data.train_on=first_assistant",
         "data.train_on='first_assistant' is invalid"),
    Case("train-padding-unknown", NAMES, TRAIN + " data.padding=none",
         "data.padding='none' is invalid"),
    Case("train-truncation-unknown", NAMES, TRAIN + " data.truncation=middle",
         "data.truncation='middle' is invalid"),
    Case("train-sample-normalization-fused", LAYOUT,
         TRAIN + " loss.normalization=sample loss.implementation=fused",
         "loss.normalization=sample needs loss.implementation=unfused"),
    Case("export-merge-full-weights", KIND,
         "convert megatron-to-hf --ckpt {mg} --out {W}/x6 --merge",
         "--merge needs a LoRA checkpoint", ("mg",), ("{W}/x6",)),
    Case("eval-adapter-not-an-adapter", KIND,
         "eval --model {hf_tok} --task gsm8k --adapter {notes}",
         "is not a LoRA adapter folder", ("notes",)),
    Case("train-save-interval-negative", RANGE, TRAIN + " train.save_interval=-1",
         "train.save_interval must be >= 0"),
    Case("train-keep-last-zero", RANGE, TRAIN + " train.keep_last=0",
         "train.keep_last must be >= 1"),
    Case("train-warmup-ratio-one", RANGE, TRAIN + " optim.warmup_ratio=1",
         "optim.warmup_ratio must be in [0, 1)"),
    Case("train-beta-above-one", RANGE, TRAIN + " optim.adam_beta2=1.5",
         "optim.adam_beta2 must be in [0, 1)"),
    Case("train-heads-zero", RANGE, TRAIN + " model.num_attention_heads=0",
         "model.num_attention_heads must be >= 1"),
    Case("train-num-samples-zero", RANGE, TRAIN + " data.num_samples=0",
         "data.num_samples must be >= 1"),
    Case("train-max-length-beyond-positions", RANGE, TRAIN + " data.max_length=100000",
         "exceeds the model's max_position_embeddings"),
    Case("train-objective-threshold-out-of-range", RANGE, TRAIN + " loss.objective=OnlyTopP-2",
         "OnlyTopP needs 0 <= q < 1 (got 2)"),
    Case("train-objective-negative-a", RANGE, TRAIN + " loss.objective=GeneralFamily--1",
         "GeneralFamily-<a>"),
    Case("train-gpu-memory-zero", RANGE, TRAIN + " --gpu-memory 0",
         "--gpu-memory must be a positive number"),
    Case("train-nproc-zero", RANGE, TRAIN + " --nproc 0", "--nproc must be >= 1"),
    Case("probe-samples-zero", RANGE, "probe --model {mg} --data figfont --samples 0",
         "--samples must be >= 1"),
    Case("probe-micro-batch-zero", RANGE,
         "probe --model {mg} --data figfont --micro-batch-size 0", "--micro-batch-size must be"),
    Case("eval-n-zero", RANGE, "eval --model {hf_tok} --task gsm8k --n 0", "--n must be >= 1"),
    Case("eval-temperature-negative", RANGE,
         "eval --model {hf_tok} --task gsm8k --temperature -1", "--temperature must be >= 0"),
    Case("eval-top-p-zero", RANGE, "eval --model {hf_tok} --task gsm8k --top-p 0",
         "--top-p must be in (0, 1]"),
    Case("eval-greedy-with-samples", RANGE,
         "eval --model {hf_tok} --task figfont --n 4 --limit 1", "--temperature"),
    Case("convert-shard-size-zero", RANGE,
         "convert megatron-to-hf --ckpt {mg} --out {W}/x5 --max-shard-size 0",
         "--max-shard-size 0 must be a positive size", ("mg",), ("{W}/x5",)),
    Case("launch-nproc-zero", RANGE,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun --nproc 0 "
         "--work-dir {W}/launch", "--nproc must be >= 1", (), ("{W}/launch",)),
    Case("launch-learning-rate-negative", RANGE,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun "
         "--work-dir {W}/launch --set optim.lr=-1", "optim.lr must be > 0", (), ("{W}/launch",)),
    Case("data-generate-n-zero", RANGE, "data generate addition --n 0 --out {W}/gen.jsonl",
         "--n must be >= 1", (), ("{W}/gen.jsonl",)),
    Case("data-generate-corrupt-above-one", RANGE,
         "data generate addition --corrupt 2 --out {W}/gen.jsonl", "--corrupt must be a fraction",
         (), ("{W}/gen.jsonl",)),
    Case("plan-gpu-memory-negative", RANGE, "plan --config tiny-figfont-cpu --gpu-memory -1",
         "--gpu-memory must be a positive number"),
    Case("objectives-threshold-out-of-range", RANGE, "objectives --describe OnlyTopP-1.5",
         "OnlyTopP needs 0 <= q < 1"),
    Case("train-max-length-zero", RANGE, TRAIN + " data.max_length=0",
         "data.max_length must be >= 2"),
    Case("train-clip-grad-negative", RANGE, TRAIN + " optim.clip_grad=-1",
         "optim.clip_grad must be >= 0"),
    Case("train-weight-decay-negative", RANGE, TRAIN + " optim.weight_decay=-1",
         "optim.weight_decay must be >= 0"),
    Case("train-pp-zero", RANGE, TRAIN + " parallel.pipeline_model_parallel_size=0",
         "parallel.pipeline_model_parallel_size must be >= 1"),
    Case("train-dist-timeout-zero", RANGE, TRAIN + " train.dist_timeout_s=0",
         "train.dist_timeout_s must be > 0"),
    Case("plan-gpus-zero", RANGE, "plan --config tiny-figfont-cpu --gpus 0",
         "--gpus must be >= 1"),
    Case("plan-margin-negative", RANGE, "plan --config tiny-figfont-cpu --margin-gb -3",
         "--margin-gb must be a number >= 0"),
    Case("launch-profile-zero-nodes", RANGE,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm "
         "--profile {profile_nodes0} --dryrun --work-dir {W}/launch",
         "'nodes' must be an integer >= 1 (got 0)", ("profile_nodes0",), ("{W}/launch",)),
    Case("launch-profile-time-out-of-range", RANGE,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm "
         "--profile {profile_badtime} --dryrun --work-dir {W}/launch_badtime",
         "is not a SLURM time limit", ("profile_badtime",), ("{W}/launch_badtime",)),
    Case("train-max-steps-beyond-data", RANGE, TRAIN + " train.max_steps=400",
         "train.max_steps=400 is more than the at most 4 steps the data gives"),
    Case("train-real-run-max-steps-beyond-tokenized-data", RANGE,
         "train --config {recipe} train.output_dir={W}/run_long train.max_steps=4",
         "train.max_steps=4 is more than the 3 steps the data gives (train.epochs=1 over 12 "
         "examples", (), ("{W}/run_long/checkpoints",), subprocess=True),
    Case("train-real-run-lr-negative", RANGE, "train --config {recipe} optim.lr=-1",
         "optim.lr must be > 0"),
    Case("train-real-run-max-steps-negative", RANGE,
         "train --config {recipe} --nproc 2 train.max_steps=-5",
         "train.max_steps must be >= 1"),
    Case("train-real-run-objective-out-of-range", RANGE,
         "train --config {recipe} loss.objective=OnlyTopP-2", "OnlyTopP needs 0 <= q < 1"),
    # -- missing, empty or wrong files ------------------------------------------------------
    Case("train-no-config", FILES, "train --dry-run", "probsft train needs --config RECIPE"),
    Case("train-config-is-a-folder", FILES, "train --config {W} --dry-run", "is a folder"),
    Case("train-config-missing", FILES, "train --config {W}/nope.yaml --dry-run", "not found"),
    Case("train-config-invalid-yaml", FILES, "train --config {bad_yaml} --dry-run",
         "is not valid YAML", ("bad_yaml",)),
    Case("train-config-only-comments", FILES, "train --config {empty_recipe} --dry-run",
         "is empty (no YAML in it, only blank lines or comments)", ("empty_recipe",)),
    Case("train-data-symlink-loop", FILES,
         TRAIN + " data.source=file data.train_files=[{loop}]", "is a symbolic link loop"),
    Case("train-data-path-invisible-character", FILES,
         TRAIN + " data.source=file data.train_files=[{W}/nope\u200b.jsonl]",
         "nope\\u200b.jsonl does not exist (it contains U+200B ZERO WIDTH SPACE)"),
    Case("train-data-file-missing", FILES,
         TRAIN + " data.source=file data.train_files=[{W}/nope.jsonl]", "does not exist"),
    Case("train-data-empty-folder", FILES,
         TRAIN + " data.source=file data.train_files=[{emptydir}]",
         "is a folder with no .jsonl/.json/.parquet file"),
    Case("train-data-folder", FILES, TRAIN + " data.source=file data.train_files=[{datadir}]",
         "is a folder, not a data file; list its files", ("datadir",)),
    Case("train-data-empty-file", FILES, TRAIN + " data.source=file data.train_files=[{empty}]",
         "is empty", ("empty",)),
    Case("train-data-unknown-extension", FILES,
         TRAIN + " data.source=file data.train_files=[{csv}]", "cannot tell the format",
         ("csv",)),
    Case("train-data-none", FILES, TRAIN + " data.source=file", "data.train_files is empty"),
    Case("train-output-dir-is-a-file", FILES, TRAIN + " train.output_dir={afile}",
         "is a file, not a folder", ("afile",)),
    Case("train-tokenizer-missing", FILES, TRAIN + " init.tokenizer={W}/nope",
         "init.tokenizer {W}/nope does not exist"),
    Case("train-tokenizer-without-files", FILES, TRAIN + " init.tokenizer={hf}",
         "has no tokenizer files", ("hf",)),
    Case("train-checkpoint-without-tokenizer", FILES,
         TRAIN + " init.checkpoint={mg} init.tokenizer=null", "has no tokenizer", ("mg",)),
    Case("train-tokenizer-larger-than-vocabulary", FILES,
         TRAIN + " init.checkpoint={mg} init.tokenizer=smollm2",
         "has 49152 token ids but the model's vocabulary has 512", ("mg",)),
    Case("convert-hf-missing", FILES, "convert hf-to-megatron --hf {W}/nope --out {W}/x6",
         "does not exist", (), ("{W}/x6",)),
    Case("convert-config-invalid-json", FILES,
         "convert hf-to-megatron --hf {hf_badjson} --out {W}/x7", "config.json is not valid JSON",
         ("hf_badjson",), ("{W}/x7",)),
    Case("convert-hf-without-weights", FILES,
         "convert hf-to-megatron --hf {hf_noweights} --out {W}/x8", "has no model.safetensors",
         ("hf_noweights",), ("{W}/x8",)),
    Case("convert-template-missing", FILES,
         "convert megatron-to-hf --ckpt {mg} --hf-template {W}/nope --out {W}/x9",
         "--hf-template {W}/nope does not exist", ("mg",), ("{W}/x9",)),
    Case("convert-out-is-a-file", FILES, "convert megatron-to-hf --ckpt {mg} --out {afile}",
         "is a file, not a folder", ("mg", "afile")),
    Case("eval-model-missing", FILES, "eval --model {W}/nope --task gsm8k", "does not exist"),
    Case("eval-model-without-tokenizer", FILES, "eval --model {hf} --task gsm8k",
         "has no tokenizer files", ("hf",)),
    Case("eval-out-is-a-file", FILES, "eval --model {hf_tok} --task gsm8k --out {afile}",
         "is a file, not a folder", ("hf_tok", "afile")),
    Case("eval-data-missing", FILES,
         "eval --model {hf_tok} --task custom --data {W}/nope.jsonl", "is not a file"),
    Case("probe-model-missing", FILES, "probe --model {W}/nope --data figfont",
         "does not exist"),
    Case("probe-model-without-tokenizer", FILES, "probe --model {mg} --data figfont",
         "pass --tokenizer DIR", ("mg",)),
    Case("probe-tokenizer-larger-than-vocabulary", FILES,
         "probe --model {mg} --data figfont --tokenizer smollm2",
         "has 49152 token ids but the model's vocabulary has 512", ("mg",)),
    Case("probe-out-is-a-file", FILES, "probe --model {mg} --data figfont --out {afile}",
         "is a file, not a folder", ("mg", "afile")),
    Case("probe-data-missing", FILES, "probe --model {mg} --data {W}/nope.jsonl",
         "does not exist", ("mg",)),
    Case("launch-work-dir-is-a-file", FILES,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun "
         "--work-dir {afile}", "is a file, not a folder", ("afile",)),
    Case("data-generate-out-is-a-folder", FILES,
         "data generate addition --n 2 --out {dir_jsonl}", "is a folder", ("dir_jsonl",)),
    Case("data-generate-from-eval-missing", FILES,
         "data generate self-addition --from-eval {W}/nope.jsonl --out {W}/gen.jsonl",
         "is not a file", (), ("{W}/gen.jsonl",)),
    Case("data-inspect-missing-file", FILES, "data inspect {W}/nope.jsonl", "does not exist"),
    Case("report-missing-path", FILES, "report {W}/nope", "does not exist"),
    Case("convert-hf-without-config", FILES,
         "convert hf-to-megatron --hf {notes} --out {W}/x10", "has no config.json",
         ("notes",), ("{W}/x10",)),
    Case("data-inspect-unknown-extension", FILES, "data inspect {afile}",
         "cannot tell what", ("afile",)),
    Case("train-real-run-data-file-missing", FILES,
         "train --config {recipe} data.source=file data.train_files=[{W}/nope.jsonl]",
         "does not exist"),
    Case("train-real-run-output-dir-is-a-file", FILES,
         "train --config {recipe} train.output_dir={afile}", "is a file, not a folder",
         ("afile",)),
    Case("train-data-missing-field", FILES,
         TRAIN + " data.source=file data.train_files=[{nofield}]",
         "missing field 'prompt' (data.prompt_key); available keys: ['answer', 'question']",
         ("nofield",)),
    Case("train-data-invalid-json", FILES,
         TRAIN + " data.source=file data.train_files=[{badjsonl}]", ":1: invalid JSON line",
         ("badjsonl",)),
    Case("train-data-not-parquet", FILES,
         TRAIN + " data.source=file data.train_files=[{fakeparquet}]",
         "as parquet: Parquet magic bytes not found", ("fakeparquet",)),
    Case("probe-data-missing-field", FILES, "probe --model {mg} --data {nofield}",
         "missing field 'prompt'", ("mg", "nofield")),
    # /proc: a folder nothing can be created in, for root too (os.access alone says yes)
    Case("train-output-dir-not-writable", FILES, TRAIN + " train.output_dir=/proc/probsft_run",
         "is not writable (nothing can be created in /proc)"),
    Case("convert-out-not-writable", FILES,
         "convert megatron-to-hf --ckpt {mg} --out /proc/probsft_export", "is not writable",
         ("mg",)),
    Case("probe-out-not-writable", FILES,
         "probe --model {mg} --data figfont --out /proc/probsft_probe", "is not writable",
         ("mg",)),
    Case("eval-out-not-writable", FILES,
         "eval --model {hf_tok} --task gsm8k --out /proc/probsft_eval", "is not writable",
         ("hf_tok",)),
    Case("data-generate-out-not-writable", FILES,
         "data generate addition --n 2 --out /proc/probsft.jsonl", "is not writable"),
    Case("data-generate-out-under-a-file", FILES,
         "data generate addition --n 2 --out {afile}/x.jsonl", "is a file, not a folder",
         ("afile",)),
    Case("report-out-not-writable", FILES, "report {run} --out /proc/probsft_report",
         "cannot create the folder", ("run",)),
    Case("launch-work-dir-not-writable", FILES,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun "
         "--work-dir /proc/probsft_launch", "is not writable"),
    # -- the wrong kind of folder ----------------------------------------------------------
    Case("convert-ckpt-is-a-run-folder", KIND, "convert megatron-to-hf --ckpt {run} --out {W}/y1",
         "is a training run folder, not a model dir; name one of its checkpoints", ("run",),
         ("{W}/y1",)),
    Case("convert-ckpt-is-hf", KIND, "convert megatron-to-hf --ckpt {hf} --out {W}/y2",
         "is a Hugging Face folder; convert it first", ("hf",), ("{W}/y2",)),
    Case("convert-hf-is-megatron", KIND, "convert hf-to-megatron --hf {mg} --out {W}/y3",
         "is a Megatron model dir, not a Hugging Face folder", ("mg",), ("{W}/y3",)),
    Case("train-init-checkpoint-is-hf", KIND, TRAIN + " init.checkpoint={hf}",
         "is a Hugging Face folder; convert it first", ("hf",)),
    Case("train-init-checkpoint-is-a-run", KIND, TRAIN + " init.checkpoint={run}",
         "is a training run folder", ("run",)),
    Case("train-init-checkpoint-missing", KIND, TRAIN + " init.checkpoint={W}/nope",
         "does not exist"),
    Case("train-init-checkpoint-is-a-training-checkpoint", KIND,
         TRAIN + " init.checkpoint={run}/checkpoints/step_0000002",
         "is a training checkpoint", ("run",)),
    Case("probe-training-checkpoint", KIND,
         "probe --model {run}/checkpoints/step_0000002 --data figfont --tokenizer smollm2",
         "is a training checkpoint", ("run",)),
    Case("probe-run-folder", KIND, "probe --model {run} --data figfont",
         "is a training run folder", ("run",)),
    Case("eval-model-is-megatron", KIND, "eval --model {mg} --task gsm8k",
         "is a Megatron model dir, not a Hugging Face folder; export it first", ("mg",)),
    Case("eval-unknown-architecture", KIND, "eval --model {hf_gpt2} --task gsm8k",
         "model_type 'gpt2'", ("hf_gpt2",)),
    Case("convert-unsupported-architecture", KIND,
         "convert hf-to-megatron --hf {hf_mistral} --out {W}/y4", "MistralForCausalLM",
         ("hf_mistral",), ("{W}/y4",)),
    Case("convert-ckpt-is-a-plain-folder", KIND,
         "convert megatron-to-hf --ckpt {notes} --out {W}/y5", "is not a Megatron model dir",
         ("notes",), ("{W}/y5",)),
    Case("probe-model-is-a-plain-folder", KIND, "probe --model {notes} --data figfont",
         "is neither a Megatron model dir", ("notes",)),
    Case("eval-model-is-a-plain-folder", KIND, "eval --model {notes} --task gsm8k",
         "has no config.json, so it is not a Hugging Face checkpoint", ("notes",)),
    Case("eval-model-is-a-file", KIND, "eval --model {afile} --task gsm8k",
         "is a file, not a folder", ("afile",)),
    Case("report-folder-without-runs", KIND, "report {notes}", "holds no run", ("notes",)),
    Case("report-file-not-a-probe-report", KIND, "report {afile}",
         "is a file that is not a probe report", ("afile",)),
    Case("convert-smollm2-over-another-model", KIND, "convert smollm2 --out {mg}",
         "already holds a Megatron model dir of another model", ("mg",)),
    Case("launch-status-of-a-plain-folder", KIND, "launch status {notes}",
         "not a folder with probsft_experiment.json", ("notes",)),
    # -- layouts that cannot run or fit -------------------------------------------------------
    Case("train-tp-does-not-divide", LAYOUT, TRAIN + " parallel.tensor_model_parallel_size=3",
         "does not divide the world size 1"),
    Case("train-sp-without-tp", LAYOUT, TRAIN + " parallel.sequence_parallel=true",
         "needs parallel.tensor_model_parallel_size > 1"),
    Case("train-micro-batch-does-not-divide", LAYOUT, TRAIN + " train.micro_batch_size=3",
         "is not divisible by train.micro_batch_size*DP"),
    Case("train-query-groups-not-divisible-by-tp", LAYOUT,
         TRAIN + " --nproc 2 parallel.tensor_model_parallel_size=2 model.num_query_groups=1",
         "model.num_query_groups=1 is not divisible"),
    Case("train-will-not-fit", LAYOUT,
         "train --config math-qwen2.5-7b --nproc 8 --dry-run --gpu-memory 40 "
         "data.train_files=[{data}] data.format=auto train.output_dir={W}/fit",
         "will not fit: TP=4 PP=1 DP=2 SP dist-opt needs", ("data",), ("{W}/fit",)),
    Case("probe-tp-does-not-divide", LAYOUT, "probe --model {mg} --data figfont --tp 2",
         "does not divide the world size 1", ("mg",)),
    Case("probe-tp-names-probe-flags", LAYOUT, "probe --model {mg} --data figfont --tp 3",
         "change --tp / --pp or --nproc", ("mg",)),
    Case("plan-max-length-beyond-positions", LAYOUT,
         "plan --config tiny-figfont-cpu data.max_length=100000",
         "no layout or number of GPUs changes that; set data.max_length=2048 or lower"),
    # -- unknown names and keys ----------------------------------------------------------------
    Case("train-unknown-key", NAMES, TRAIN + " optim.lrr=1", "unknown config key 'optim.lrr'"),
    Case("train-key-invisible-character", NAMES, TRAIN + " optim.lr\u200b=1",
         "unknown config key 'optim.lr\\u200b' (it contains U+200B ZERO WIDTH SPACE)"),
    Case("train-wrong-type", NAMES, TRAIN + " train.global_batch_size=abc", "expects int"),
    Case("train-unknown-objective", NAMES, TRAIN + " loss.objective=Bogus",
         "unknown objective 'Bogus'"),
    Case("train-unknown-precision", NAMES, TRAIN + " train.precision=fp8",
         "train.precision='fp8' is invalid"),
    Case("train-override-without-value", NAMES, TRAIN + " optim.lr",
         "must look like section.key=value"),
    Case("objectives-unknown", NAMES, "objectives --describe Bogus", "unknown objective"),
    Case("eval-unknown-task", NAMES, "eval --model {hf_tok} --task math5000",
         "unknown task 'math5000'"),
    Case("eval-unknown-dtype", NAMES, "eval --model {hf_tok} --task gsm8k --dtype fp8",
         "--dtype 'fp8' is invalid"),
    Case("probe-non-data-override", NAMES, "probe --model {mg} --data figfont optim.lr=1",
         "is not a data.* key"),
    Case("launch-unknown-dataset", NAMES,
         "launch --dataset nope --model tiny-llama --objective p --dryrun --work-dir {W}/launch",
         "unknown dataset 'nope'", (), ("{W}/launch",)),
    Case("launch-unknown-preset", NAMES,
         "launch --dataset figfont --model nope --objective p --dryrun --work-dir {W}/launch",
         "unknown model preset 'nope'", (), ("{W}/launch",)),
    Case("launch-slurm-without-profile", NAMES,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm --dryrun",
         "--executor slurm needs --profile"),
    Case("launch-unknown-profile", NAMES,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm "
         "--profile nope --dryrun", "cluster profile 'nope' not found"),
    Case("data-generate-unknown-task", NAMES, "data generate nope --out {W}/gen.jsonl",
         "nope", (), ("{W}/gen.jsonl",)),
    Case("plan-unknown-recipe", NAMES, "plan --config nope", "not found"),
    Case("train-wrong-type-seed", NAMES, TRAIN + " train.seed=abc", "train.seed expects int"),
    Case("train-unknown-data-source", NAMES, TRAIN + " data.source=bogus",
         "data.source='bogus' is invalid"),
    Case("train-unknown-model-preset", NAMES, TRAIN + " model.preset=bogus",
         "unknown model preset 'bogus'"),
    Case("launch-unknown-objective", NAMES,
         "launch --dataset figfont --model tiny-llama --objective Bogus --dryrun "
         "--work-dir {W}/launch", "unknown objective 'Bogus'", (), ("{W}/launch",)),
    Case("launch-profile-unknown-field", NAMES,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm "
         "--profile {profile_unknown} --dryrun --work-dir {W}/launch",
         "unknown field 'bogus_key'", ("profile_unknown",), ("{W}/launch",)),
    Case("plan-unknown-key", NAMES, "plan --config tiny-figfont-cpu optim.lrr=1",
         "unknown config key 'optim.lrr'"),
    Case("report-unknown-metric", NAMES, "report {notes} --metric bogus",
         "--metric 'bogus' is not a task metric", ("notes",)),
    Case("data-inspect-non-data-override", NAMES, "data inspect figfont optim.lr=1",
         "`probsft data inspect` only takes data overrides"),
    Case("launch-unknown-eval-task", NAMES,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun "
         "--work-dir {W}/launch_evaltask --eval-task math5000", "unknown task 'math5000'", (),
         ("{W}/launch_evaltask",)),
    # -- usage: options and arguments --------------------------------------------------------
    Case("train-unknown-option", USAGE, TRAIN + " --bogus", "unrecognized arguments: --bogus"),
    Case("train-nproc-not-a-number", USAGE, TRAIN + " --nproc two", "invalid int value: 'two'"),
    Case("convert-no-direction", USAGE, "convert", "the following arguments are required"),
    Case("data-no-action", USAGE, "data", "probsft data needs an action"),
    Case("data-inspect-nothing", USAGE, "data inspect", "needs the data"),
    Case("data-generate-out-not-jsonl", USAGE, "data generate addition --out {W}/gen.csv",
         "must end in .jsonl", (), ("{W}/gen.csv",)),
    Case("launch-missing-objective", USAGE, "launch --dataset figfont --model tiny-llama "
         "--dryrun --work-dir {W}/launch", "missing --objective", (), ("{W}/launch",)),
    Case("launch-env-without-value", USAGE,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun --env FOO "
         "--work-dir {W}/launch", "--env 'FOO' must look like KEY=VALUE", (), ("{W}/launch",)),
    Case("launch-eval-args-unbalanced", USAGE,
         "launch --dataset figfont --model tiny-llama --objective p --dryrun "
         "--work-dir {W}/launch --eval-args=\"'--limit\"", "cannot be split into arguments", (),
         ("{W}/launch",)),
    Case("console-script-exit-code", USAGE, "objectives --describe OnlyBottomP-0",
         "OnlyBottomP", subprocess=True),
    Case("plan-no-config", USAGE, "plan", "probsft plan needs --config RECIPE"),
    Case("launch-slurm-without-sbatch", USAGE,
         "launch --dataset figfont --model tiny-llama --objective p --executor slurm "
         "--profile local-cpu --work-dir {W}/launch_nosbatch", "sbatch, which is not on PATH",
         (), ("{W}/launch_nosbatch",), subprocess=True, env=(("PATH", "{nobin}"),)),
    Case("objectives-unknown-option", USAGE, "objectives --bogus",
         "unrecognized arguments: --bogus"),
    Case("convert-unknown-direction", USAGE, "convert sideways --hf {hf} --out {W}/y6",
         "invalid choice: 'sideways'", ("hf",), ("{W}/y6",)),
    Case("data-generate-seed-not-a-number", USAGE,
         "data generate addition --n 2 --out {W}/gen.jsonl --seed abc",
         "invalid int value: 'abc'", (), ("{W}/gen.jsonl",)),
]
# fmt: on

# -- the world the cases run against -----------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    """A cheap copy of ``src``: files hard-linked (damage them with :func:`_own`)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _own(path: Path) -> Path:
    """Give a hard-linked file its own bytes before it is damaged."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _truncate(path: Path, size: int = 1000) -> None:
    with open(_own(path), "r+b") as f:
        f.truncate(size)


def _drop_manifests(folder: Path) -> None:
    for manifest in folder.rglob("probsft_manifest.json"):
        manifest.unlink()


def _lock_by_this_process(run: Path) -> None:
    """A run lock held by a live run: this (pytest) process, on this host."""
    import socket

    import psutil

    from probsft_megatron.run_lock import LOCK_FILE, Holder

    holder = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_started=psutil.Process().create_time(),
        started="2026-12-07T10:00:00+0000",
        command="probsft train --config recipe.yaml",
    )
    (run / LOCK_FILE).write_text(holder.to_json())


def _run_probsft(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
    return subprocess.run(
        [sys.executable, "-m", "probsft_megatron.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Real inputs: a tiny HF checkpoint (and broken variants), its conversion (with and
    without a tokenizer), an export, a two-checkpoint training run (and damaged copies), data
    files and a recipe. Built once (about a minute on 2 cores, most of it the training run)."""
    from mp.tiny_hf import tiny_hf_checkpoint
    from probsft_megatron.converters import api
    from probsft_megatron.tokenizers import load_tokenizer

    w = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {"W": w}
    # the training run first (a subprocess); the cases' recipe is the same job with an
    # output folder that does not exist
    recipe = w / "recipe.yaml"
    recipe.write_text(
        "base: tiny-figfont-cpu\n"
        "model: {preset: tiny-llama, hidden_size: 64, ffn_hidden_size: 128}\n"
        "data: {num_samples: 16}\n"
        f"train: {{max_steps: 2, save_interval: 1, output_dir: {w / 'dry'}}}\n"
    )
    proc = _run_probsft(["train", "--config", str(recipe), f"train.output_dir={w / 'run'}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = paths["run"] = w / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000001",
        "step_0000002",
    ]
    paths["recipe"] = recipe

    step2 = "checkpoints/step_0000002"
    paths["run_truncated"] = _copy(run, w / "run_truncated")
    _truncate(paths["run_truncated"] / step2 / "weights" / "__0_0.distcp")
    paths["run_badstate"] = _copy(run, w / "run_badstate")
    _own(paths["run_badstate"] / step2 / "train_state.json").write_text('{"step": ')
    paths["legacy_badstate"] = _copy(run, w / "legacy_badstate")
    _drop_manifests(paths["legacy_badstate"])
    _own(paths["legacy_badstate"] / step2 / "train_state.json").write_text('{"step": ')
    paths["run_flipped"] = _copy(run, w / "run_flipped")
    shard = _own(paths["run_flipped"] / step2 / "weights" / "__0_0.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, one byte changed
    shard.write_bytes(bytes(data))
    paths["run_all_damaged"] = _copy(run, w / "run_all_damaged")
    for step in ("step_0000001", "step_0000002"):
        _truncate(paths["run_all_damaged"] / "checkpoints" / step / "weights" / "__0_0.distcp")
    paths["run_nostate"] = _copy(run, w / "run_nostate")
    (paths["run_nostate"] / step2 / "train_state.json").unlink()  # listed in the manifest
    paths["run_locked"] = _copy(run, w / "run_locked")
    _lock_by_this_process(paths["run_locked"])
    paths["legacy_truncated"] = _copy(run, w / "legacy_truncated")
    _drop_manifests(paths["legacy_truncated"])
    _truncate(paths["legacy_truncated"] / step2 / "weights" / "__0_0.distcp")

    hf = paths["hf"] = tiny_hf_checkpoint(w / "hf", "qwen2")  # vocab 512, no tokenizer
    paths["hf_tok"] = _copy(hf, w / "hf_tok")
    (paths["hf_tok"] / "tokenizer_config.json").write_text("{}")
    paths["hf_badjson"] = _copy(hf, w / "hf_badjson")
    _own(paths["hf_badjson"] / "config.json").write_text("{bad")
    paths["hf_noweights"] = w / "hf_noweights"
    paths["hf_noweights"].mkdir()
    shutil.copy2(hf / "config.json", paths["hf_noweights"])
    paths["hf_mistral"] = _copy(hf, w / "hf_mistral")
    cfg = json.loads((hf / "config.json").read_text())
    _own(paths["hf_mistral"] / "config.json").write_text(
        json.dumps(dict(cfg, architectures=["MistralForCausalLM"], model_type="mistral"))
    )
    paths["hf_gpt2"] = _copy(paths["hf_tok"], w / "hf_gpt2")
    _own(paths["hf_gpt2"] / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )

    mg = paths["mg"] = api.hf_to_megatron(hf, w / "mg").path
    paths["mg_damaged"] = _copy(mg, w / "mg_damaged")
    _truncate(paths["mg_damaged"] / "weights" / "__0_0.distcp")
    tokenizer = w / "smollm2_tokenizer"
    load_tokenizer("smollm2").save_pretrained(tokenizer)
    tok_hf = tiny_hf_checkpoint(
        w / "hf_smollm2", "qwen2", vocab_size=49152, tokenizer_dir=tokenizer
    )
    paths["mg_tok"] = api.hf_to_megatron(tok_hf, w / "mg_tok").path
    export = paths["export"] = api.megatron_to_hf(mg, w / "export", hf_template=paths["hf_tok"])
    paths["export_damaged"] = _copy(export, w / "export_damaged")
    _truncate(paths["export_damaged"] / "model.safetensors")

    data_dir = paths["datadir"] = w / "datadir"
    data_dir.mkdir()
    rows = [{"prompt": f"{i} + 1 =", "response": str(i + 1)} for i in range(8)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["data"] = data_dir / "train.jsonl"
    paths["samples"] = w / "samples.jsonl"
    paths["samples"].write_text(json.dumps({"id": 0, "completions": ["2"]}) + "\n")
    paths["empty"] = w / "empty.jsonl"
    paths["empty"].write_text("")
    paths["nofield"] = w / "nofield.jsonl"
    paths["nofield"].write_text(json.dumps({"question": "1 + 1 =", "answer": "2"}) + "\n")
    paths["badjsonl"] = w / "badjson.jsonl"
    paths["badjsonl"].write_text("{'prompt': '1 + 1 =', 'response': '2'}\n")
    paths["fakeparquet"] = w / "fake.parquet"
    paths["fakeparquet"].write_text("prompt,response\n1,2\n")
    paths["csv"] = w / "train.csv"
    paths["csv"].write_text("prompt,response\n1,2\n")
    paths["emptydir"] = w / "emptydir"
    paths["emptydir"].mkdir()
    paths["dir_jsonl"] = w / "dir.jsonl"
    paths["dir_jsonl"].mkdir()
    paths["afile"] = w / "afile"
    paths["afile"].write_text("not a folder\n")
    paths["notes"] = w / "notes"
    paths["notes"].mkdir()
    (paths["notes"] / "todo.txt").write_text("keep me\n")
    paths["empty_recipe"] = w / "empty_recipe.yaml"
    paths["empty_recipe"].write_text("# a recipe with nothing but comments\n\n# base: x\n")
    paths["loop"] = w / "loop.jsonl"
    paths["loop"].symlink_to(paths["loop"].name)  # a link to itself
    paths["gen_existing"] = w / "gen_existing.jsonl"
    record = {"prompt": "1 + 1", "response": "2", "reference": "2", "task": "addition"}
    paths["gen_existing"].write_text(json.dumps(record) + "\n")
    paths["evaldone"] = w / "evaldone"
    paths["evaldone"].mkdir()
    (paths["evaldone"] / "summary.json").write_text(json.dumps([{"task": "gsm8k"}]) + "\n")
    from probsft_megatron.probe.report import FORMAT as PROBE_FORMAT

    for name, report in (("probedone", {"format": PROBE_FORMAT, "key": "k"}), ("otherreport", {})):
        paths[name] = w / name
        paths[name].mkdir()
        (paths[name] / "report.json").write_text(json.dumps(report) + "\n")
    paths["nobin"] = w / "nobin"
    paths["nobin"].mkdir()
    paths["bad_yaml"] = w / "bad.yaml"
    paths["bad_yaml"].write_text("train: {max_steps: [1,\n")
    profile = yaml.safe_load((REPO / "configs" / "clusters" / "local-cpu.yaml").read_text())
    for name, change in (
        ("badtime", {"time": dict(profile["time"], train="25:99")}),
        ("nodes0", {"nodes": 0}),
        ("unknown", {"bogus_key": 1}),
    ):
        paths[f"profile_{name}"] = w / f"profile_{name}.yaml"
        paths[f"profile_{name}"].write_text(yaml.safe_dump(dict(profile, **change)))
    return {k: str(v) for k, v in paths.items()}


# -- running one case ----------------------------------------------------------------------------


def _fingerprint(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself) by relative name, and
    every folder (``path`` included, so an empty folder has a fingerprint too)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.is_dir():
        return {}
    found = {".": "folder"}
    for p in sorted(path.rglob("*")):
        name = p.relative_to(path).as_posix()
        found[name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return found


def _in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _as_subprocess(
    argv: list[str], extra_env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    exe = Path(sys.executable).parent / "probsft"
    command = (
        [str(exe), *argv] if exe.exists() else [sys.executable, "-m", "probsft_megatron.cli", *argv]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR", **(extra_env or {}))
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    return proc.returncode, proc.stdout, proc.stderr


MESSAGES: dict[str, str] = {}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, strict=True)) if c.xfail else c
        for c in CASES
    ],
    ids=[c.id for c in CASES],
)
def test_bad_input_is_refused_in_one_line_and_loses_nothing(case: Case, world):
    argv = shlex.split(case.argv.format(**world))
    inputs = {name: Path(world[name]) for name in case.inputs}
    absent = [Path(p.format(**world)) for p in case.absent]
    assert not any(p.exists() for p in absent), "a previous case left an output behind"
    before = {name: _fingerprint(p) for name, p in inputs.items()}
    assert all(before.values()), "an input of the case does not exist"

    if case.subprocess:
        code, out, err = _as_subprocess(argv, {k: v.format(**world) for k, v in case.env})
    else:
        code, out, err = _in_process(argv)

    shown = f"\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-4000:]}"
    assert code == case.code, f"exit code {code}, expected {case.code}{shown}"
    assert "Traceback" not in err + out, shown
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, f"expected one error line{shown}"
    assert len(lines) <= MAX_STDERR_LINES, f"stderr has {len(lines)} lines{shown}"
    assert case.needle.format(**world) in errors[0], shown
    for name, path in inputs.items():
        assert _fingerprint(path) == before[name], f"input {name} ({path}) changed"
    for path in absent:
        assert not path.exists(), f"{path} was written"
    message = MESSAGES[case.id] = _placeholders(errors[0], world)
    if not WRITE_DOC:
        rows = {_loose(line) for line in _doc_lines()}
        documented = _loose(_row(case, message)) in rows
        assert documented, (
            f"docs/errors.md does not show this case as it runs now:\n{_row(case, message)}"
            "\nrewrite it: PROBSFT_WRITE_ERRORS_DOC=1 pytest tests/test_bad_inputs.py"
        )


def _placeholders(text: str, world: dict[str, str]) -> str:
    """``text`` with the world's paths (and the repository's) written as their placeholder
    names in capitals (``RUN``, ``W``), the longest path first."""
    import socket

    names = {**{path: name.upper() for name, path in world.items()}, str(REPO): "REPO"}
    for path in sorted(names, key=len, reverse=True):
        text = re.sub(re.escape(path) + r"(?![\w.-])", names[path], text)
    return text.replace(f" on host {socket.gethostname()},", " on host HOST,")


def _command(case: Case) -> str:
    return "probsft " + re.sub(
        r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(case.argv.split())
    )


def _row(case: Case, message: str) -> str:
    return f"| `{case.id}` | `{_command(case)}` | {message.replace('|', chr(92) + '|')} |"


def _loose(row: str) -> str:
    """A row with its numbers blurred: sizes, GiB and line numbers in a message may move
    with a library's version without the message being wrong."""
    return re.sub(r"\d+(\.\d+)?", "#", row.strip())


@functools.cache
def _doc_lines() -> tuple[str, ...]:
    return tuple(DOC.read_text(encoding="utf-8").splitlines()) if DOC.is_file() else ()


def test_resume_skip_damaged_falls_back_loudly_and_replaces_the_damaged_step(world, tmp_path):
    """The one way past a damaged checkpoint: ``train.resume_skip_damaged=true`` resumes from
    the newest intact step, says so in a warning naming the damaged one, and the run writes a
    new, intact checkpoint of that step in its place."""
    from probsft_megatron import manifest

    run = Path(shutil.copytree(world["run_truncated"], tmp_path / "run"))  # real copies: the
    step2 = run / "checkpoints" / "step_0000002"  # run appends to its metrics
    assert manifest.checkpoint_damage(step2) is not None
    proc = _run_probsft(
        [
            "train",
            "--config",
            world["recipe"],
            f"train.output_dir={run}",
            "train.resume_skip_damaged=true",
        ]
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Traceback" not in proc.stderr
    assert re.search(
        r"DAMAGED checkpoint step 2 passed over \(train.resume_skip_damaged=true\)"
        r".*weights/__0_0.distcp is 1000 bytes",
        proc.stderr,
    ), proc.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step_0000001'}" in proc.stderr, proc.stderr
    assert manifest.checkpoint_damage(step2) is None
    assert json.loads((step2 / "train_state.json").read_text())["step"] == 2


def test_vllm_failure_is_reduced_to_its_root_cause():
    """A vLLM engine failure as it was captured (tests/data/vllm_engine_failure.log: a tiny
    Qwen2 with head_dim 16, which vLLM's CPU attention refuses at the first generate; the
    main process only sees ``EngineDeadError ... See stack trace (above)``): the root cause
    is the worker's exception, not the wrapper."""
    from probsft_megatron.eval.runner import vllm_root_cause

    text = (REPO / "tests" / "data" / "vllm_engine_failure.log").read_text()
    assert "EngineDeadError" in text
    assert vllm_root_cause(text) == (
        "RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
    )
    # negative controls: only the wrapper, and no exception at all
    wrapper = [ln for ln in text.splitlines() if "EngineDeadError" in ln]
    assert vllm_root_cause("\n".join(wrapper)).startswith("EngineDeadError: EngineCore")
    assert vllm_root_cause("(EngineCore pid=1) INFO 12-07 11:54:05 [x.py:1] ready") is None


def test_vllm_output_keeps_the_traceback_in_the_log(tmp_path, capfd):
    """A child process (as vLLM's engine is) prints its log and a traceback to the inherited
    stdout/stderr, and the parent then fails with a wrapper: the terminal shows the log up to
    the error and no traceback; the log file has everything; the error is one line naming
    the child's exception and the log."""
    from probsft_megatron.errors import ProbsftError
    from probsft_megatron.eval.runner import vllm_output

    child = (
        "import sys\n"
        "print('(Worker pid=7) INFO 12-07 11:54:03 [loader.py:1] loading weights', flush=True)\n"
        "raise RuntimeError('Unsupported CPU attention configuration: head_dim=16')\n"
    )
    log = tmp_path / "vllm.log"
    with pytest.raises(ProbsftError) as err, vllm_output(log):
        subprocess.run([sys.executable, "-c", child], check=False)
        raise RuntimeError("EngineCore encountered an issue. See stack trace (above) for it.")
    assert str(err.value) == (
        "vLLM failed: RuntimeError: Unsupported CPU attention configuration: head_dim=16; "
        f"the whole log is {log}"
    )
    shown = capfd.readouterr()
    assert "loading weights" in shown.out
    assert "Traceback" not in shown.out + shown.err, shown
    text = log.read_text()
    assert "loading weights" in text and "Traceback (most recent call last)" in text


def test_cases_are_distinct_and_cover_every_subcommand():
    from probsft_megatron.cli import SUBCOMMANDS

    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.argv for c in CASES}) == len(CASES)
    assert len(CASES) >= 60
    covered = {shlex.split(c.argv)[0] for c in CASES}
    assert covered == set(SUBCOMMANDS), set(SUBCOMMANDS) - covered


def test_docs_list_every_case():
    """docs/errors.md names every case and the count (PROBSFT_WRITE_ERRORS_DOC=1 rewrites
    it first from what the cases printed; the cases run before this test)."""
    if WRITE_DOC:
        missing = [c.id for c in CASES if c.id not in MESSAGES and not c.xfail]
        assert not missing, f"run every case to write docs/errors.md; not run: {missing}"
        _write_doc()
    text = DOC.read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/errors.md lacks {missing}"
    assert f"**{len(CASES)} bad inputs**" in text
    for group in {c.group for c in CASES}:
        count = sum(c.group == group for c in CASES)
        assert re.search(rf"\| {re.escape(group)} \| {count} \|", text), group


# -- docs/errors.md ------------------------------------------------------------------------------

DOC_HEAD = """# Errors: every bad input refused in one line

Every `probsft` subcommand checks what it is given before it does any work, and refuses a
bad input with one line on stderr, `error: ...`, that names the problem and the fix, with
exit code 2 (argparse's own usage errors also exit 2; a run that fails on its own terms, such
as a local experiment whose steps failed, exits 1). No command destroys its input: an output
that is, contains or lies inside an input is refused with or without `--overwrite`, and
`--overwrite` replaces only a previous output of the same kind, recognised by what probsft
writes into it (`probsft_manifest.json`, `model_config.json`, `train_state.json`). The
same holds for files: `data generate --out FILE`, `eval --out` (its `summary.json`) and
`probe --out` (its `report.json`) refuse to replace an earlier output without `--overwrite`,
and with it replace only an output of their own kind.

## Checkpoints that can be verified

Every training checkpoint, converted model dir and Hugging Face export carries
`probsft_manifest.json`, written inside the folder before its atomic rename: every file with
its size and a CRC-32 (of the whole file up to 64 MiB, of its first and last MiB above).
Resume, export, probe, `init.checkpoint`, `eval` and `convert hf-to-megatron` (of an export)
check a folder against it first; a damaged one is named with its step, the file and the fix
(`train.resume_skip_damaged=true` resumes from the newest intact step and says so in a warning
for each damaged one it passes over; the run then writes a new, intact checkpoint of the
damaged step in its place, as
`test_resume_skip_damaged_falls_back_loudly_and_replaces_the_damaged_step` shows).
A Megatron model dir or training checkpoint without a manifest (not written by probsft, or its
write did not finish) is refused the same way, in one line with the fix.

## The bad-input suite

`tests/test_bad_inputs.py` feeds **{count} bad inputs** to every subcommand and asserts for
each the exit code, a short stderr with exactly one `error:` line and no traceback, and that
every input file is byte-identical afterwards (no output is left either). Its rows, by class:

| class | inputs |
|---|---|
{classes}

The live SLURM case (sbatch rejects a job: its own message in one line, the experiment
folder marked failed) needs the cluster: tests/test_slurm_live.py,
`test_rejected_submission_is_one_line_and_marked_failed`.

Ctrl-C during training (save, then "interrupted at step N; resume with the same command")
is covered with the rest of the signal handling in tests/test_resilience.py, not here.

A vLLM engine that fails (a model its CPU attention cannot run, such as head size 16) ends
`probsft eval` in one line with the root cause found in vLLM's output, which is kept whole
in a log (`OUT/vllm.log`, or a temporary file without `--out`) instead of a traceback:
`error: vLLM failed: RuntimeError: Unsupported CPU attention configuration: head_dim=16
isa=2 kv_cache_idx=0; the whole log is OUT/vllm.log`
(`test_vllm_failure_is_reduced_to_its_root_cause` on the captured log of that failure,
`test_vllm_output_keeps_the_traceback_in_the_log` on a real child process).

Two training runs into one `train.output_dir` are refused by the run lock (a row below for a
live holder; the two real runs started at once are tests/test_run_lock.py, a SLURM job
launched twice tests/test_slurm_live.py).

A case whose message reads "not refused yet" is an expected failure (a strict `xfail`): it names
the change it waits for, and the suite fails once that change lands, so that the case becomes an
ordinary one.

This page is generated and checked: every case of the suite compares its row below with the
message it printed (numbers aside, since file sizes move with library versions) and fails
when they differ; `PROBSFT_WRITE_ERRORS_DOC=1 pytest tests/test_bad_inputs.py` rewrites the
page from what the cases print. Commands and messages name the suite's objects in capitals:

| name | what it is |
|---|---|
{placeholders}
"""

PLACEHOLDERS = {
    "W": "the suite's scratch folder (a fresh temporary folder)",
    "AFILE": "a plain file",
    "BAD_YAML": "a recipe that is not valid YAML",
    "CSV": "a `.csv` file",
    "DATA": "a valid 8-row prompt/response `.jsonl` in `DATADIR`",
    "DATADIR": "a folder holding `DATA`",
    "DIR_JSONL": "a folder named `dir.jsonl`",
    "EMPTY": "an empty `.jsonl` file",
    "EMPTYDIR": "an empty folder",
    "EMPTY_RECIPE": "a recipe holding only comments and blank lines",
    "EVALDONE": "a folder holding an earlier evaluation's `summary.json`",
    "OTHERREPORT": "a folder holding a `report.json` that is not a probe's",
    "PROBEDONE": "a folder holding an earlier probe's `report.json`",
    "GEN_EXISTING": "a `.jsonl` written by `probsft data generate addition`",
    "LOOP": "a symbolic link to itself, named `loop.jsonl`",
    "NOBIN": "an empty folder, used as `PATH` (no `sbatch` on it)",
    "RUN_LOCKED": "`RUN` with a `run.lock` naming a live process on this host (`HOST`)",
    "RUN_NOSTATE": "`RUN` with step 2's `train_state.json` deleted (its manifest lists it)",
    "EXPORT_DAMAGED": "a Hugging Face export of `MG` with its `model.safetensors` truncated",
    "HF": "a tiny random Qwen2 Hugging Face folder (vocabulary 512, no tokenizer)",
    "HF_BADJSON": "`HF` whose `config.json` is not JSON",
    "HF_GPT2": "`HF_TOK` whose `config.json` declares GPT2LMHeadModel",
    "HF_MISTRAL": "`HF` whose `config.json` declares MistralForCausalLM",
    "HF_NOWEIGHTS": "`HF`'s `config.json` alone",
    "HF_TOK": "`HF` with a `tokenizer_config.json`",
    "LEGACY_BADSTATE": "`RUN_BADSTATE` without manifests (as written before they existed)",
    "LEGACY_TRUNCATED": "`RUN_TRUNCATED` without manifests",
    "MG": "`HF` converted to a Megatron model dir",
    "MG_DAMAGED": "`MG` with its weight shard truncated",
    "MG_TOK": "a Megatron model dir with the SmolLM2 tokenizer (vocabulary 49152)",
    "NOFIELD": "a `.jsonl` whose records have `question`/`answer`, not `prompt`/`response`",
    "BADJSONL": "a `.jsonl` written with Python's quotes (not JSON)",
    "FAKEPARQUET": "a CSV file named `.parquet`",
    "NOTES": "a folder of a user's own files",
    "PROFILE_BADTIME": "the local-cpu cluster profile with `time.train: '25:99'`",
    "PROFILE_NODES0": "the local-cpu cluster profile with `nodes: 0`",
    "PROFILE_UNKNOWN": "the local-cpu cluster profile with a field `bogus_key`",
    "RECIPE": "tiny-figfont-cpu with a 64-wide tiny-llama, 2 steps, a checkpoint each",
    "REPO": "the repository",
    "RUN": "a finished run of `RECIPE` with checkpoints `step_0000001` and `step_0000002`",
    "RUN_ALL_DAMAGED": "`RUN` with both steps' weight shards truncated",
    "RUN_BADSTATE": "`RUN` with step 2's `train_state.json` cut to 9 bytes",
    "RUN_FLIPPED": "`RUN` with one byte of step 2's weight shard changed (same size)",
    "RUN_TRUNCATED": "`RUN` with step 2's weight shard truncated to 1000 bytes",
    "SAMPLES": "the `samples.jsonl` of an eval run",
}


def _write_doc() -> None:
    groups: dict[str, list[Case]] = {}
    for case in CASES:
        groups.setdefault(case.group, []).append(case)
    used = sorted({m.upper() for c in CASES for m in re.findall(r"\{(\w+)\}", c.argv)} | {"W"})
    unknown = [name for name in used if name not in PLACEHOLDERS]
    assert not unknown, f"describe {unknown} in PLACEHOLDERS"
    parts = [
        DOC_HEAD.format(
            count=len(CASES),
            classes="\n".join(f"| {g} | {len(cs)} |" for g, cs in groups.items()),
            placeholders="\n".join(
                f"| `{name}` | {PLACEHOLDERS[name]} |" for name in [*used, "REPO"]
            ),
        )
    ]
    for group, cases in groups.items():
        parts.append(
            f"\n## {group[0].upper()}{group[1:]} ({len(cases)})\n\n"
            "| case | command | message |\n|---|---|---|\n"
        )
        parts.extend(
            _row(c, MESSAGES[c.id] if c.id in MESSAGES else f"(not refused yet: {c.xfail})") + "\n"
            for c in cases
        )
    DOC.write_text("".join(parts), encoding="utf-8")
