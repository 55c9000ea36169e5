"""vLLM generation and :func:`evaluate`: everything a user can get wrong is checked before
the engine starts; then prompts are rendered, sampled, graded, summarized and reported.
vLLM starts worker processes: call :func:`evaluate` under ``if __name__ == "__main__":``."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from probsft_megatron import manifest
from probsft_megatron.errors import CheckpointError, ConfigError, ProbsftError
from probsft_megatron.eval.graders import CONTINUOUS_GRADERS, EXTRACTING_GRADERS, get_grader
from probsft_megatron.eval.metrics import summarize
from probsft_megatron.eval.prompts import STOP_STRINGS, detect_family, render, resolve_family
from probsft_megatron.eval.report import TaskResult, write_reports
from probsft_megatron.eval.tasks import DataOptions, Example, Task, get_task
from probsft_megatron.input_checks import TOKENIZER_FILES
from probsft_megatron.tokenizers import load_tokenizer

CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE without a GPU, when unset
DTYPES = ("auto", "bfloat16", "float16", "float32")
KNOWN_MODEL_TYPES = ("qwen2", "qwen3", "llama")  # others need --prompt-format
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank values
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
# vLLM's log lines: their prefix, an exception, a wrapper pointing elsewhere, where noise starts
_VLLM_PREFIX = re.compile(r"^\((?:[\w.-]+ )?pid=\d+\) (?:[A-Z]+ \d\d-\d\d [\d:]+ \[[^\]]*\] ?)?")
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = re.compile(
    r"EngineDeadError|see (the )?(stack trace|root cause)|check the stack trace above", re.I
)
_NOISY = re.compile(rb"Traceback \(most recent call last\)|\) ERROR \d\d-\d\d ")


@dataclass
class EvalConfig:
    """One evaluation run: ``None`` sampling fields take the task's defaults, ``grader``
    overrides the task's, ``adapter`` is a PEFT LoRA folder served on top of ``model``."""

    model: str
    tasks: list[str]
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    limit: int | None = None
    prompt_format: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    grader: str | None = None
    data: DataOptions = field(default_factory=DataOptions)
    out: str | None = None
    adapter: str | None = None


@dataclass
class _Plan:
    task: Task
    grader: str
    sampling: dict  # n, temperature, top_p, max_new_tokens, seed (the summary's "sampling")
    examples: list[Example]
    prompts: list[str] = field(default_factory=list)


def check_config(config: EvalConfig) -> None:
    """Refuse, in one line each, numbers out of range, an unknown dtype and no task."""
    for key in ("n", "max_new_tokens", "limit", "max_model_len", "tensor_parallel_size"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1 (got {value})")
    if config.temperature is not None and not config.temperature >= 0:
        raise ConfigError(f"--temperature must be >= 0 (got {config.temperature})")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (got {config.top_p})")
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype {config.dtype!r} is invalid; use one of {', '.join(DTYPES)}")
    if not config.tasks:
        raise ConfigError("--task is empty; name a task, e.g. --task math500")


def _plan(config: EvalConfig) -> list[_Plan]:
    """Validate the config and load every task's examples (no engine needed)."""
    check_config(config)
    plans = []
    for name in config.tasks:
        task = get_task(name)
        grader = config.grader or task.grader
        get_grader(grader)
        examples = task.load(config.data, config.limit)
        if not examples:
            raise ConfigError(f"task {name} has no examples to evaluate")
        sampling = {
            key: getattr(task, key) if getattr(config, key) is None else getattr(config, key)
            for key in ("n", "temperature", "top_p", "max_new_tokens")
        }
        if sampling["temperature"] == 0:
            if sampling["n"] > 1:
                raise ConfigError(
                    f"task {task.name}: greedy decoding (--temperature 0) gives one answer; "
                    "use --n 1 or a temperature > 0"
                )
            sampling["top_p"] = 1.0  # vLLM requires top_p == 1 for greedy sampling
        plans.append(_Plan(task, grader, {**sampling, "seed": config.seed}, examples))
    return plans


def check_model(path: str | os.PathLike, prompt_format: str | None = None) -> dict:
    """The parsed config.json of the Hugging Face checkpoint folder ``path`` (weights,
    tokenizer, a prompt format known or given); else one line naming what is wrong."""
    folder = Path(path)
    kind = manifest.folder_kind(folder)
    if kind in (manifest.MODEL_DIR, manifest.TRAINING_CHECKPOINT, manifest.TRAINING_RUN):
        raise CheckpointError(
            f"--model {folder} is {manifest.describe(folder)}, not a Hugging Face folder; export "
            f"it first: probsft convert megatron-to-hf --ckpt {folder} --out HF_DIR"
        )
    if folder.is_file():
        raise CheckpointError(
            f"--model {folder} is a file, not a folder; pass a Hugging Face "
            "checkpoint folder (config.json, weights, tokenizer files)"
        )
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {folder} does not exist; pass a Hugging Face checkpoint folder"
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} has no config.json, so it is not a Hugging Face checkpoint; export one "
            "with `probsft convert` or point --model at a folder saved by save_pretrained"
        )
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise CheckpointError(
            f"{folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
            "the checkpoint is incomplete"
        )
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
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); export it "
            "with --hf-template TOKENIZER_DIR or copy the tokenizer files into it"
        )
    model_type = str(config.get("model_type", "")).lower()
    if prompt_format is None and model_type not in KNOWN_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "none listed"
        raise ConfigError(
            f"--model {folder} has model_type {model_type or 'unset'!r} (architectures: {arch}), "
            f"whose prompt format probsft does not know (it knows {', '.join(KNOWN_MODEL_TYPES)}); "
            "pass --prompt-format qwen, llama, deepseek or raw to evaluate it with vLLM anyway"
        )
    return config


def adapter_rank(adapter: str) -> int:
    """The rank ``r`` of a PEFT LoRA adapter folder; one line when it is not one."""
    config = Path(adapter) / "adapter_config.json"
    if not Path(adapter).is_dir() or not config.is_file():
        raise ConfigError(
            f"--adapter {adapter} is not a LoRA adapter folder (no adapter_config.json); "
            "export one with probsft convert megatron-to-hf --ckpt <LoRA checkpoint>"
        )
    try:
        data = json.loads(config.read_text())
        rank = int(data["r"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--adapter {adapter}: adapter_config.json has no rank r") from None
    if data.get("peft_type", "LORA") != "LORA" or rank > VLLM_LORA_RANKS[-1]:
        raise ConfigError(
            f"--adapter {adapter} is a {data.get('peft_type')} adapter of rank {rank}; vLLM "
            f"serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}"
        )
    return rank


def lora_request(adapter: str):
    """vLLM's request for the LoRA adapter folder ``adapter``."""
    from vllm.lora.request import LoRARequest

    return LoRARequest("adapter", 1, str(Path(adapter).absolute()))


def build_llm(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    max_lora_rank: int | None = None,
):
    """A vLLM engine for ``model``, serving LoRA adapters up to ``max_lora_rank``; without a
    GPU it runs eagerly and loads float16 as bfloat16 (the CPU backend's half type)."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        config = Path(model) / "config.json"
        saved = json.loads(config.read_text(encoding="utf-8")) if dtype == "auto" else {}
        if (saved.get("torch_dtype") or saved.get("dtype")) == "float16":
            dtype = "bfloat16"
    from vllm import LLM

    if max_lora_rank is not None:  # the smallest of vLLM's ranks that holds it
        max_lora_rank = min(r for r in VLLM_LORA_RANKS if r >= max_lora_rank)
    lora = {} if max_lora_rank is None else dict(enable_lora=True, max_lora_rank=max_lora_rank)
    return LLM(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        enforce_eager=on_cpu,
        **lora,
    )


def _generate(
    llm, plan: _Plan, token_prompts: list[list[int]], adapter: str | None = None
) -> list[list[str]]:
    """``n`` completions per prompt, request ``i`` seeded with ``seed + i``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    context = llm.model_config.max_model_len
    for example, ids in zip(plan.examples, token_prompts):
        if len(ids) >= context:
            raise ConfigError(
                f"task {plan.task.name} problem {example.id} has a {len(ids)}-token prompt, "
                "which does not fit "
                f"the {context}-token context; raise --max-model-len or drop the problem"
            )
    s = plan.sampling
    fixed = dict(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], stop=STOP_STRINGS)
    params = [
        SamplingParams(**fixed, max_tokens=s["max_new_tokens"], seed=s["seed"] + i)
        for i in range(len(token_prompts))
    ]
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in token_prompts],
        params,
        use_tqdm=True,
        lora_request=None if adapter is None else lora_request(adapter),
    )
    return [[c.text for c in out.outputs] for out in outputs]


def _grade(plan: _Plan, completions: list[list[str]]) -> TaskResult:
    from tqdm import tqdm

    grade = get_grader(plan.grader)
    samples = []
    for example, prompt, outs in tqdm(
        zip(plan.examples, plan.prompts, completions),
        total=len(plan.examples),
        desc=f"grading {plan.task.name}",
    ):
        grades = [grade(text, example.reference) for text in outs]
        record = {
            "id": example.id,
            "prompt": prompt,
            "reference": example.reference,
            "completions": outs,
            "extracted": [g.extracted for g in grades],
            "correct": [g.correct for g in grades],
            "scores": [g.score for g in grades],
            **({"source": [g.source for g in grades]} if plan.grader == "math" else {}),
            **({"meta": example.meta} if example.meta else {}),
        }
        if plan.task.kind == "figfont":  # the paper's case-sensitive score on the raw output
            record["exact"] = [text == example.reference for text in outs]
        samples.append(record)
    scores = [r["scores"] for r in samples] if plan.grader in CONTINUOUS_GRADERS else None
    extracted = boxed = None
    if plan.grader in EXTRACTING_GRADERS:
        extracted = [[answer is not None for answer in r["extracted"]] for r in samples]
    if plan.grader == "math":
        boxed = [[source == "boxed" for source in r["source"]] for r in samples]
    metrics = summarize([r["correct"] for r in samples], scores, extracted, boxed)
    if plan.task.kind == "figfont":
        metrics["exact"] = sum(sum(r["exact"]) / len(r["exact"]) for r in samples) / len(samples)
    summary = dict(task=plan.task.name, grader=plan.grader, sampling=plan.sampling, metrics=metrics)
    return TaskResult(plan.task.name, summary, samples)


def vllm_root_cause(log_text: str) -> str | None:
    """``Type: message`` of the first exception in a vLLM log that is not a wrapper pointing
    elsewhere (``EngineDeadError``), vLLM's line prefix removed; None without one."""
    causes = []  # (is a wrapper, "Type: message") of each exception line, in order
    for raw in log_text.splitlines():
        line = _VLLM_PREFIX.sub("", raw.strip("\r")).strip()
        if match := _EXCEPTION_LINE.match(line):
            cause = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
            causes.append((bool(_WRAPPERS.search(line)), cause))
    return min(causes, key=lambda c: c[0])[1] if causes else None  # the first non-wrapper


def _tee(fd: int, log) -> int:
    """What is written to ``fd`` (vLLM's engine processes too) goes to ``log`` and, until an
    error or a traceback starts, to where ``fd`` pointed before (its returned duplicate)."""
    saved = os.dup(fd)
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)

    def pump() -> None:
        quiet, pending = False, b""
        while data := os.read(read, 65536):
            log.write(data)
            log.flush()
            if quiet:
                continue
            pending += data
            match = _NOISY.search(pending)
            if match is not None:  # from the start of that line on, the log only
                data = pending[: pending.rfind(b"\n", 0, match.start()) + 1]
                quiet = True
            else:
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
                data, pending = pending[:cut], pending[cut:]
            if data:
                os.write(saved, data)
        os.close(read)

    threading.Thread(target=pump, daemon=True).start()
    return saved


@contextmanager
def vllm_output(log_path: str | os.PathLike) -> Iterator[Path]:
    """vLLM's output (this process's and its engine's) in ``log_path`` too; a failure inside
    becomes one ProbsftError line with its root cause and the log's path."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # the pumps write it as long as any writer remains
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: _tee(fd, log) for fd in (1, 2)}
    try:
        yield log_path
    except ProbsftError:
        raise
    except Exception as exc:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(1.0)  # the engine's last words reach the log
        text = log_path.read_text(encoding="utf-8", errors="replace")
        first = (str(exc).strip().splitlines() or [""])[0]
        own = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        cause = vllm_root_cause(text) or own
        raise ProbsftError(f"vLLM failed: {cause}; the whole log is {log_path}") from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, previous in saved.items():  # the pumps run on for processes holding the pipes
            os.dup2(previous, fd)


def evaluate(config: EvalConfig, llm=None) -> list[TaskResult]:
    """One TaskResult per task of ``config`` (reports written when ``config.out`` is set);
    ``llm``: an engine for the same model to reuse. User mistakes raise before vLLM starts."""
    hf_config = check_model(config.model, config.prompt_format)
    rank = adapter_rank(config.adapter) if config.adapter is not None else None
    if rank is not None:
        logging.getLogger(__name__).info(
            "evaluating %s with the LoRA adapter %s (vLLM's LoRA)", config.model, config.adapter
        )
    family = resolve_family(config.prompt_format) if config.prompt_format else None
    plans = _plan(config)
    model = str(config.model)
    tokenizer = load_tokenizer(model)
    bos = tokenizer.bos_token
    family = family or detect_family(hf_config, tokenizer.get_vocab(), model)
    for plan in plans:
        plan.prompts = [render(plan.task.kind, family, ex.text) for ex in plan.examples]
    if config.out:
        log_path = Path(config.out) / "vllm.log"
    else:
        fd, log_path = tempfile.mkstemp(prefix="probsft-eval-vllm-", suffix=".log")
        os.close(fd)
    results = []
    with vllm_output(log_path):  # a vLLM failure: one line, its cause, the log
        if llm is None:
            keys = ("tensor_parallel_size", "dtype", "seed", "max_model_len")
            options = {key: getattr(config, key) for key in keys}
            llm = build_llm(config.model, max_lora_rank=rank, **options)
        for plan in plans:
            start = time.perf_counter()
            prompts = [  # a prompt that spells out BOS gets no second one
                tokenizer(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"]
                for p in plan.prompts
            ]
            completions = _generate(llm, plan, prompts, config.adapter)
            seconds = round(time.perf_counter() - start, 2)
            result = _grade(plan, completions)
            result.summary.update(model=model, prompt_format=family, generation_s=seconds)
            if config.adapter is not None:
                result.summary.update(adapter=str(config.adapter))
            results.append(result)
    if config.out:
        write_reports(config.out, results)
    return results
