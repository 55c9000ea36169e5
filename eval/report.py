"""Evaluation reports: per-sample JSONL, summary JSON and a markdown table.

Layout under the output folder::

    <out>/<task>/samples.jsonl   one JSON object per problem (prompt, completions,
                                 extracted answers, correctness, scores)
    <out>/<task>/summary.json    metrics and settings of the task
    <out>/summary.json           all task summaries
    <out>/summary.md             one table row per task (and, for math, a line per task
                                 whose samples did not all yield a final answer)

Every file is written to a temporary name in the same folder and renamed when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from probsft_megatron.fileio import atomic_write_text


@dataclass
class TaskResult:
    """Per-sample records and the summary of one task (what the reports are written from)."""

    task: str
    summary: dict
    samples: list[dict]


def samples_jsonl(samples: Iterable[dict]) -> str:
    """Per-sample records as JSON lines."""
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


_FORMAT_COLUMNS = (
    ("boxed", "boxed"),
    ("extracted", "extracted"),
    ("accuracy_extracted", "acc. of extracted"),
)
"""Answer-format columns (metric, header), shown when some task reports them."""


def markdown_table(summaries: list[dict]) -> str:
    """A markdown table with one row per task (percentages).

    Math tasks add ``boxed`` (samples with a ``\\boxed{}`` answer), ``extracted`` (samples
    with any extracted final answer) and ``acc. of extracted`` (accuracy among those).
    """
    ks = sorted({int(k) for s in summaries for k in s["metrics"]["pass@k"]})
    formats = [
        (key, title)
        for key, title in _FORMAT_COLUMNS
        if any(key in s["metrics"] for s in summaries)
    ]
    header = (
        ["task", "problems", "n", "avg@n"] + [f"pass@{k}" for k in ks] + ["mean score", "exact"]
    )
    header += [title for _, title in formats]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        m = s["metrics"]
        row = [s["task"], str(m["problems"]), str(m["n"]), _pct(m["avg@n"])]
        row += [_pct(m["pass@k"][str(k)]) if str(k) in m["pass@k"] else "" for k in ks]
        row += [
            _pct(m["mean_score"]) if "mean_score" in m else "",
            _pct(m["exact"]) if "exact" in m else "",
        ]
        row += [_pct(m[key]) if m.get(key) is not None else "" for key, _ in formats]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_notes(summaries: list[dict]) -> str:
    """One line per task whose samples did not all yield a final answer: how many had none
    (a formatting failure, not a wrong answer) and the accuracy among the others."""
    lines = []
    for s in summaries:
        m = s["metrics"]
        if "extracted" not in m or m["extracted"] >= 1.0:
            continue
        line = (
            f"{s['task']}: {_pct(1 - m['extracted'])}% of samples have no extractable final answer"
        )
        if "boxed" in m:
            line += f" ({_pct(1 - m['boxed'])}% have no \\boxed{{}})"
        if m["accuracy_extracted"] is not None:
            line += f"; accuracy among the others {_pct(m['accuracy_extracted'])}%"
        lines.append(line)
    return "".join(line + "\n" for line in lines)


def write_reports(out: str | os.PathLike, results: list[TaskResult]) -> Path:
    """Write every report file under ``out`` and return that folder."""
    root = Path(out)
    for result in results:
        atomic_write_text(root / result.task / "samples.jsonl", samples_jsonl(result.samples))
        atomic_write_text(
            root / result.task / "summary.json", json.dumps(result.summary, indent=2) + "\n"
        )
    summaries = [r.summary for r in results]
    atomic_write_text(root / "summary.json", json.dumps(summaries, indent=2) + "\n")
    atomic_write_text(root / "summary.md", markdown_table(summaries) + format_notes(summaries))
    return root
