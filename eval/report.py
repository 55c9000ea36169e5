"""Evaluation reports: per-sample JSONL, summary JSON and a markdown table.

Layout under the output folder::

    <out>/<task>/samples.jsonl   one JSON object per problem (prompt, completions,
                                 extracted answers, correctness, scores)
    <out>/<task>/summary.json    metrics and settings of the task
    <out>/summary.json           all task summaries
    <out>/summary.md             one table row per task

Every file is written to a temporary name in the same folder and renamed when complete.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from probsft_megatron.fileio import atomic_write_text

if TYPE_CHECKING:
    from probsft_megatron.eval.runner import TaskResult


def samples_jsonl(samples: Iterable[dict]) -> str:
    """Per-sample records as JSON lines."""
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_table(summaries: list[dict]) -> str:
    """A markdown table with one row per task (percentages)."""
    ks = sorted({int(k) for s in summaries for k in s["metrics"]["pass@k"]})
    header = ["task", "problems", "n", "avg@n"] + [f"pass@{k}" for k in ks] + ["mean score", "exact"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        m = s["metrics"]
        row = [s["task"], str(m["problems"]), str(m["n"]), _pct(m["avg@n"])]
        row += [_pct(m["pass@k"][str(k)]) if str(k) in m["pass@k"] else "" for k in ks]
        row += [_pct(m["mean_score"]) if "mean_score" in m else "", _pct(m["exact"]) if "exact" in m else ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_reports(out: str | os.PathLike, results: list["TaskResult"]) -> Path:
    """Write every report file under ``out`` and return that folder."""
    root = Path(out)
    for result in results:
        atomic_write_text(root / result.task / "samples.jsonl", samples_jsonl(result.samples))
        atomic_write_text(root / result.task / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    summaries = [r.summary for r in results]
    atomic_write_text(root / "summary.json", json.dumps(summaries, indent=2) + "\n")
    atomic_write_text(root / "summary.md", markdown_table(summaries))
    return root
