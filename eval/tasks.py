"""The evaluation tasks: where each task's examples come from, how they are prompted and
graded, and the paper's default sampling settings (the table in docs/eval.md)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from itertools import islice
from pathlib import Path

from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.eval.graders import boxed_answer
from probsft_megatron.figfont import figfont_records

_MATH_REFERENCES = {  # how a math task's reference field becomes its answer (default: str)
    "minerva_math": lambda solution: boxed_answer(solution) or "",
    "olympiadbench": lambda answer: ",".join(answer) if isinstance(answer, list) else str(answer),
    "gsm8k": lambda answer: answer.split("####")[-1].strip().replace(",", ""),
}


@dataclass(frozen=True)
class Example:
    """One evaluation item: the user-facing input text and the reference answer."""

    id: str
    text: str
    reference: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataOptions:
    """Where a task reads its data and which fields it uses (file-backed tasks)."""

    path: str | None = None
    prompt_field: str | None = None
    reference_field: str | None = None
    options_field: str | None = None


@dataclass(frozen=True)
class Task:
    """A registered task: its prompt ``kind``, ``grader`` and default sampling settings."""

    name: str
    kind: str
    grader: str
    description: str
    load: Callable[[DataOptions, int | None], list[Example]]
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; DataError on a bad file."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {lineno} is not a JSON object")
            yield lineno, row


def _field(row: dict, names: tuple[str, ...], path: Path, lineno: int, flag: str) -> object:
    """The first of ``names`` present in ``row``; DataError naming field, file and fix."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    wanted = " or ".join(repr(n) for n in names)
    raise DataError(
        f"{path} line {lineno} has no field {wanted} (fields: {', '.join(sorted(row)) or 'none'}); "
        f"rename it in the file or pass {flag}"
    )


def _data_path(options: DataOptions, name: str, filename: str | None) -> Path:
    """``--data``, else the copy shipped in ``eval/data``; tasks without one need ``--data``."""
    if options.path:
        return Path(options.path)
    if filename is None:
        raise ConfigError(f"the {name} task reads a local jsonl: pass --data FILE")
    return Path(str(files("probsft_megatron.eval") / "data" / filename))


def _jsonl_loader(
    name: str,
    filename: str | None,
    questions: tuple[str, ...],
    references: tuple[str, ...],
    to_ref: Callable = str,
    to_text: Callable | None = None,
    ids: tuple[str, ...] = ("idx", "id", "unique_id"),
) -> Callable[[DataOptions, int | None], list[Example]]:
    """A loader of question/reference rows (``--prompt-field``/``--reference-field`` rename
    the fields); an example's id is the first of ``ids`` in its row, else its line index."""

    def load(options: DataOptions, limit: int | None) -> list[Example]:
        path = _data_path(options, name, filename)
        q_names = (options.prompt_field,) if options.prompt_field else questions
        ref_names = (options.reference_field,) if options.reference_field else references
        examples = []
        for lineno, row in islice(_read_jsonl(path), limit):
            question = str(_field(row, q_names, path, lineno, "--prompt-field"))
            reference = to_ref(_field(row, ref_names, path, lineno, "--reference-field"))
            row_id = next((row[key] for key in ids if key in row), lineno - 1)
            text = to_text(row, question) if to_text else question
            examples.append(Example(str(row_id), text, reference))
        return examples

    return load


def _load_figfont(options: DataOptions, limit: int | None) -> list[Example]:
    return [
        Example(str(r["index"]), r["prompt"], r["response"], {"font": r["font"]})
        for r in figfont_records("test", n=limit)
    ]


def _load_medical(options: DataOptions, limit: int | None) -> list[Example]:
    path = _data_path(options, "medical", None)
    q_field = options.prompt_field or "question"
    o_field = options.options_field or "options"
    a_field = options.reference_field or "answer"
    examples = []
    for lineno, row in islice(_read_jsonl(path), limit):
        question = str(_field(row, (q_field,), path, lineno, "--prompt-field"))
        choices = _field(row, (o_field,), path, lineno, "--options-field")
        if isinstance(choices, list):  # in order, else a dict keyed by letters
            choices = {chr(ord("A") + i): v for i, v in enumerate(choices)}
        if not isinstance(choices, dict):
            raise DataError(
                f"{path} line {lineno}: 'options' must be a list or a letter -> text object"
            )
        choices = {str(k).strip().upper(): str(v) for k, v in choices.items()}
        answer = _field(row, (a_field,), path, lineno, "--reference-field")
        answer = str(answer).strip().strip("()").upper()
        if answer not in choices:
            raise DataError(
                f"{path} line {lineno}: answer {answer!r} is not one of the option letters "
                f"{''.join(choices)}"
            )
        lines = [question] + [f"{letter}. {choice}" for letter, choice in choices.items()]
        examples.append(Example(str(row.get("id", lineno - 1)), "\n".join(lines), answer))
    return examples


def _math_task(
    name: str,
    description: str,
    questions: tuple[str, ...],
    reference: str = "answer",
    to_text: Callable | None = None,
    filename: str | None = None,
) -> Task:
    refs = _MATH_REFERENCES.get(name, str)
    load = _jsonl_loader(name, filename or f"{name}.jsonl", questions, (reference,), refs, to_text)
    return Task(name, "math", "math", description, load, 16, 1.0, 1.0, 4096)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _math_task(
            "math500", "MATH500 test problems (500)", ("problem",), filename="math_oai.jsonl"
        ),
        _math_task("minerva_math", "Minerva math (272)", ("problem",), "solution"),
        _math_task(
            "olympiadbench",
            "OlympiadBench, English text-only (675)",
            ("question",),
            "final_answer",
            lambda row, q: f"{row['context']}\n{q}" if row.get("context") else q,
        ),
        _math_task("aime24", "AIME 2024 (30)", ("problem", "question")),
        _math_task("aime25", "AIME 2025 (30)", ("question", "problem")),
        _math_task("amc23", "AMC 2023 (40)", ("question", "problem")),
        _math_task("gsm8k", "GSM8K test (1319)", ("question",)),
        Task(
            "figfont",
            "figfont",
            "jaro_winkler",
            "figlet-font test split (5000)",
            _load_figfont,
            max_new_tokens=5,
        ),
        Task(
            "medical",
            "choice",
            "choice",
            "multiple choice from a local jsonl (--data)",
            _load_medical,
            max_new_tokens=4096,
        ),
        Task(
            "custom",
            "custom",
            "exact",
            "prompt/reference jsonl with a chosen grader (--data, --grader)",
            _jsonl_loader("custom", None, ("prompt",), ("reference",), ids=("id",)),
        ),
    )
}


def get_task(name: str) -> Task:
    """The task registered as ``name``; a ConfigError lists the valid names."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None
