"""Evaluation reports, each written atomically: ``<out>/<task>/samples.jsonl`` (one record
per problem), ``<out>/<task>/summary.json``, ``<out>/summary.json`` (every task's summary)
and ``<out>/summary.md`` (the table and the answer-format notes)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from probsft_megatron.fileio import atomic_write_json, atomic_write_text

# percentage columns after pass@k: (metric, header, shown when no task reports it)
_COLUMNS = (
    ("mean_score", "mean score", True),
    ("exact", "exact", True),
    ("boxed", "boxed", False),
    ("extracted", "extracted", False),
    ("accuracy_extracted", "acc. of extracted", False),
)


@dataclass
class TaskResult:
    """Per-sample records and the summary of one task (what the reports are written from)."""

    task: str
    summary: dict
    samples: list[dict]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """A markdown table with one row per task (percentages)."""
    ks = sorted({int(k) for s in summaries for k in s["metrics"]["pass@k"]})
    columns = [
        (key, title)
        for key, title, always in _COLUMNS
        if always or any(key in s["metrics"] for s in summaries)
    ]
    header = ["task", "problems", "n", "avg@n", *(f"pass@{k}" for k in ks)]
    header += [title for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        m = s["metrics"]
        row = [s["task"], str(m["problems"]), str(m["n"]), _pct(m["avg@n"])]
        row += [_pct(m["pass@k"][str(k)]) if str(k) in m["pass@k"] else "" for k in ks]
        row += [_pct(m[key]) if m.get(key) is not None else "" for key, _ in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_notes(summaries: list[dict]) -> str:
    """One line per task whose samples did not all yield a final answer (a formatting failure):
    how many, and the accuracy among the others."""
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
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples)
        atomic_write_text(root / result.task / "samples.jsonl", lines)
        atomic_write_json(root / result.task / "summary.json", result.summary)
    summaries = [r.summary for r in results]
    atomic_write_json(root / "summary.json", summaries)
    atomic_write_text(root / "summary.md", markdown_table(summaries) + format_notes(summaries))
    return root
