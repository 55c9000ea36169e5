"""Seed groups (:func:`group_runs`: configs equal but for seed and bookkeeping), their means
with a Student-t interval (:func:`summarize_values`) and blocks of groups sharing a setting
(:func:`build_tables`, the paper's per-model tables), as data."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ConfigError
from probsft_megatron.report.files import flatten
from probsft_megatron.report.runs import STATUSES, TRAINING_STATS

METRICS = ("avg@n", "mean_score", "exact", "boxed_rate")
"""Per-task metrics that may be the table's score; ``pass@K`` is accepted too."""


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= t) = confidence`` for ``df`` >= 1."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got {df}, {confidence}")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def summarize_values(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a Student-t interval: ``mean``, ``n``, ``std`` (sample),
    ``half_width``, ``low``, ``high``, ``values``. One value has no interval (n=1)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    n = len(vals)
    mean = sum(vals) / n
    out: dict[str, Any] = {"mean": mean, "n": n, "values": vals}
    out.update(std=None, half_width=None, low=None, high=None, confidence=confidence)
    if n > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, low=mean - half, high=mean + half)
    return out


def check_metric(metric: str) -> None:
    """A :class:`ConfigError` unless ``metric`` is one of :data:`METRICS` or ``pass@K``."""
    if metric not in METRICS and not re.fullmatch(r"pass@\d+", metric):
        raise ConfigError(
            f"--metric {metric!r} is not a task metric; use one of "
            f"{', '.join(METRICS)} or pass@K (e.g. pass@4)"
        )


def metric_label(metric: str) -> str:
    """How a metric is named on an axis or in the table's caption."""
    return {
        "avg@n": "accuracy (avg@n, %)",
        "mean_score": "score (mean, %)",
        "exact": "exact match (%)",
        "boxed_rate": "boxed answers (%)",
    }.get(metric, f"{metric} (%)")


def columns(tasks: list[str]) -> list[str]:
    """A block's columns: its tasks, then ``average`` when there are several."""
    return [*tasks, "average"] if len(tasks) > 1 else list(tasks)


def cell(g: dict, col: str) -> dict | None:
    """A group's statistics in a column (a task or ``average``)."""
    return g["average"] if col == "average" else g["cells"].get(col)


def status_counts(runs: list[dict]) -> dict[str, int]:
    """How many of ``runs`` are in each state, in :data:`STATUSES` order (none: left out)."""
    return {s: n for s in STATUSES if (n := sum(r["status"] == s for r in runs))}


def _table_order(g: dict) -> tuple:
    """By setting, eval-only rows first, then NLL, p, GeneralFamily by a, thresholded ones."""
    info, prefix, x = g["objective"], "", 0.0
    rank = -1 if info is None else {"nll": 0, "p": 1, "general": 2}.get(info["family"], 3)
    if rank == 2:
        x = info["a"]
    elif rank == 3:
        prefix = info["prefix"] or ""
        x = float(info["threshold"]["value"] if info["percentile"] is None else info["percentile"])
    return (g["setting"], g["kind"] != "eval", rank, prefix, x, g["label"])


def group_runs(runs: list[dict]) -> list[dict]:
    """Groups of runs that differ only by seed, in table order; ``setting`` names the config
    differences to other groups, the objective aside."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["identity"] or f"run:{run['path']}", []).append(run)
    firsts = [members[0] for members in groups.values()]
    flats = [flatten(json.loads(r["identity"])) if r["identity"] else None for r in firsts]
    # which config keys vary between groups (the objective is shown on its own)
    known = [f for f in flats if f]
    varying = [
        k
        for k in sorted({k for f in known for k in f} - {"loss.objective"})
        if len({json.dumps(f.get(k), default=str) for f in known}) > 1
    ]
    rest = [k for k in varying if not k.startswith(("model.", "data.")) or k == "data.seed"]
    out = []
    for first, flat, members in zip(firsts, flats, groups.values()):
        parts: list[str] = []
        if flat:
            for prefix, field_name in (("model.", "model"), ("data.", "dataset")):
                keys_here = [k for k in varying if k.startswith(prefix) and k != "data.seed"]
                names = {r[field_name] for r in firsts if r["identity"]}
                if keys_here and len(names) > 1:  # the preset / dataset name tells them apart
                    parts.append(first[field_name] or "?")
                else:
                    parts += [f"{k}={_short(flat.get(k))}" for k in keys_here]
            parts += [f"{k}={_short(flat.get(k))}" for k in rest]
        obj = first["objective"]
        members = sorted(members, key=lambda r: (r["seed"] is None, r["seed"] or 0, r["name"]))
        out.append(
            {
                "id": "",
                "label": obj["label"] if obj else first["name"],
                "objective": obj,
                "setting": ", ".join(parts),
                **{k: first[k] for k in ("model", "dataset", "kind")},
                "runs": [r["name"] for r in members],
                "seeds": [r["seed"] for r in members],
                "_members": members,
            }
        )
    out.sort(key=_table_order)
    used: set[str] = set()
    for g in out:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{g['setting']}-{g['label']}".strip("-"))
        gid, i = base, 2
        while gid in used:
            gid, i = f"{base}-{i}", i + 1
        used.add(gid)
        g["id"] = gid
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and "/" in value:  # a path: its last component says enough
        value = Path(value).name
    elif isinstance(value, list) and value and all(isinstance(v, str) and "/" in v for v in value):
        value = [Path(v).name for v in value]
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def metric_value(task: dict, metric: str) -> float | None:
    """One run's value of ``metric`` on one task (``task``: an entry of its ``eval``)."""
    m = task["metrics"]
    v = (m.get("pass@k") or {}).get(metric[5:]) if metric.startswith("pass@") else m.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _aggregate_group(g: dict, metric: str, tasks: list[str]) -> None:
    """Per-task statistics over the group's seeds, the average column, and training stats."""
    members = g["_members"]
    cells: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for task in tasks:
        evals = [r["eval"][task] for r in members if task in r["eval"]]
        if not evals:
            continue
        d: dict[str, Any] = {}
        ks = sorted(
            {k for e in evals for k in (e["metrics"].get("pass@k") or {})},
            key=lambda k: int(k) if str(k).isdigit() else 0,
        )
        for name in [*METRICS, *[f"pass@{k}" for k in ks]]:
            vs = [v for e in evals if (v := metric_value(e, name)) is not None]
            if vs:
                d[name] = summarize_values(vs)
        if metric in d:
            cells[task] = d[metric]
        if "boxed_rate" in d:  # what the boxed rate counts (see report.files.EXTRACTED)
            d["boxed_basis"] = sorted({b for e in evals if (b := e.get("boxed_basis"))})
        samples = {(e["metrics"].get("problems"), e["metrics"].get("n")) for e in evals}
        d["problems"] = sorted({p for p, _ in samples if p is not None})
        d["samples_per_problem"] = sorted({n for _, n in samples if n is not None})
        sampling = {json.dumps(e.get("sampling"), sort_keys=True) for e in evals}
        d["same_sampling"] = len(sampling) == 1 and len(samples) == 1
        details[task] = d
    # average over the block's tasks, per run, then over seeds
    per_run = []
    for r in members:
        vals = [metric_value(r["eval"][t], metric) if t in r["eval"] else None for t in tasks]
        if tasks and all(v is not None for v in vals):
            per_run.append(sum(vals) / len(vals))
    trained = [r["training"] for r in members if r["training"]]
    train_stats: dict[str, Any] = {}
    for part, keys in (("final", TRAINING_STATS), ("validation", ("val_loss", "val_nll"))):
        for key in keys:  # validation: the newest of each run
            vs = [t[part][key] for t in trained if (t.get(part) or {}).get(key) is not None]
            if vs:
                train_stats[key] = summarize_values(vs)
    train_stats.update({k: [t[k] for t in trained] for k in ("steps", "planned_steps")})
    g.update(
        cells=cells,
        details=details,
        average=summarize_values(per_run) if per_run and len(tasks) > 1 else None,
        evaluated=sum(1 for r in members if r["eval"]),
        training=train_stats,
        statuses=status_counts(members),
    )


def build_tables(groups: list[dict], metric: str) -> list[dict]:
    """One block per setting (the paper's per-model blocks): its tasks, its groups with
    per-task statistics, the average column, and the best group per column."""
    blocks: dict[str, list[dict]] = {}
    for g in groups:
        blocks.setdefault(g["setting"], []).append(g)
    out = []
    for setting, members in blocks.items():
        tasks = sorted({t for g in members for r in g["_members"] for t in r["eval"]})
        for g in members:
            _aggregate_group(g, metric, tasks)
        best: dict[str, list[str]] = {}
        for col in columns(tasks):
            vals = [(s["mean"], g["id"]) for g in members if (s := cell(g, col))]
            if len(vals) > 1:
                top = max(v for v, _ in vals)
                best[col] = [
                    gid for v, gid in vals if math.isclose(v, top, rel_tol=1e-12, abs_tol=1e-15)
                ]
        out.append(
            {"setting": setting, "tasks": tasks, "groups": [g["id"] for g in members], "best": best}
        )
    return out
