"""Reading run, eval and probe folders and telling them apart. Readers are forgiving: a
missing file is None (or empty), an unreadable one is noted in ``problems`` and skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROBE_FORMAT = "probsft-probe"
"""The ``format`` field of a ``probsft probe`` report."""
BOXED = "boxed"
EXTRACTED = "extracted"
"""``boxed_basis`` of a math task's ``boxed_rate``: ``boxed`` answers, or for samples older
than their ``source`` field any ``extracted`` answer (an upper bound)."""


def read_json(path: Path, problems: list[str]) -> Any:
    """JSON of ``path`` or None (a missing file is silent; an unreadable one is noted)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({type(exc).__name__})")
        return None


def read_jsonl(path: Path, problems: list[str]) -> list[dict]:
    """Records of a JSON-lines file; a cut last line (a writer still at work) is skipped."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i != len(lines) - 1:
                problems.append(f"{path}: line {i + 1} is not JSON; skipped")
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"section.key": value}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def is_probe_report(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == PROBE_FORMAT


def is_eval_summary(data: Any) -> bool:
    """The aggregate ``summary.json`` of ``probsft eval --out``: a list of task summaries."""
    return isinstance(data, list) and bool(data) and all(is_task_summary(s) for s in data)


def is_task_summary(data: Any) -> bool:
    return isinstance(data, dict) and "task" in data and isinstance(data.get("metrics"), dict)


RUN_FILES = ("config.json", "metrics.jsonl", "eval/summary.json")


def is_run_dir(path: Path) -> bool:
    """A training run folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ...)."""
    if (path / "checkpoints").is_dir() or any((path / f).is_file() for f in RUN_FILES):
        return True
    data = read_json(path / "summary.json", [])  # a training run's, not an eval folder's
    return isinstance(data, dict) and "output_dir" in data


def is_eval_dir(path: Path) -> bool:
    """A folder written by ``probsft eval --out``."""
    if is_eval_summary(read_json(path / "summary.json", [])):
        return True
    return any(is_task_summary(read_json(p, [])) for p in path.glob("*/summary.json"))


def read_eval(eval_dir: Path, problems: list[str]) -> dict[str, dict]:
    """Task -> ``{grader, sampling, metrics, model}`` of an eval folder's summaries; math tasks
    get ``metrics["boxed_rate"]`` (``boxed``, else counted from samples) and ``boxed_basis``."""
    tasks: dict[str, dict] = {}
    aggregate = read_json(eval_dir / "summary.json", problems)
    summaries = list(aggregate) if is_eval_summary(aggregate) else []
    for path in sorted(eval_dir.glob("*/summary.json")):
        data = read_json(path, problems)
        if is_task_summary(data) and data["task"] not in {s["task"] for s in summaries}:
            summaries.append(data)
    for s in summaries:
        task, metrics = str(s["task"]), dict(s["metrics"])
        entry = {k: s.get(k) for k in ("grader", "sampling", "metrics", "model")}
        entry["metrics"] = metrics
        if "boxed_rate" not in metrics and s.get("grader") == "math":
            rate, basis = metrics.get("boxed"), BOXED
            if not isinstance(rate, (int, float)):
                rate, basis = boxed_rate(eval_dir / task / "samples.jsonl", problems)
            if rate is not None:
                metrics["boxed_rate"] = rate
                entry["boxed_basis"] = basis
        tasks[task] = entry
    return tasks


def boxed_rate(samples: Path, problems: list[str]) -> tuple[float | None, str | None]:
    """``(rate, basis)`` of boxed answers in a math task's samples.jsonl (see :data:`EXTRACTED`);
    ``(None, None)`` without samples."""
    found = total = 0
    old = False
    for record in read_jsonl(samples, []):  # lines that are not JSON are skipped
        source, extracted = record.get("source"), record.get("extracted")
        if isinstance(source, list):
            total += len(source)
            found += sum(s == BOXED for s in source)
        elif isinstance(extracted, list):
            old = True
            total += len(extracted)
            found += sum(e is not None for e in extracted)
    if not total:
        return None, None
    return found / total, EXTRACTED if old else BOXED
