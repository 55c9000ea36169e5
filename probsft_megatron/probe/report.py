"""The probe's report from measured CEs: statistics, the continuum placement (thresholds:
docs/probe.md), the table, the plot, the files, and percentile names -> absolute thresholds."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from probsft_megatron.config import ModelConfig
from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.fileio import atomic_write, atomic_write_json
from probsft_megatron.objectives import parse_objective

FORMAT = "probsft-probe"
FORMAT_VERSION = 1
REPORT_FILE = "report.json"
PLOT_FILE = "probe.png"
TABLE_PERCENTILES = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
"""The percentiles printed; the report stores every integer percentile 0..100."""
HISTOGRAM_BINS = 100

STRONG_MEAN_P = 0.65
"""Mean response-token p from which a task is model-strong (derivation: docs/probe.md)."""
WEAK_MEAN_P = 0.35
"""Mean response-token p below which a task is model-weak (derivation: docs/probe.md)."""

RECOMMENDATIONS: dict[str, dict[str, Any]] = {
    "model-strong": {
        "objective": "p",
        "alternatives": ["GeneralFamily-10", "OnlyTopP-K20"],
        "reason": "near the model-strong end prior-leaning objectives (-p, -p^10, thresholded "
        "variants) consistently outperform NLL",
    },
    "intermediate": {
        "objective": "original",
        "alternatives": ["GeneralFamily-0.5", "p"],
        "reason": "in the intermediate region no single objective prevails; NLL is the "
        "default, sweep the alternatives to decide",
    },
    "model-weak": {
        "objective": "original",
        "alternatives": [],
        "reason": "toward the model-weak end NLL dominates: prior-leaning objectives give "
        "tokens the model cannot predict almost no gradient",
    },
}


def _percentiles(values: np.ndarray, which: Iterable[int]) -> dict[str, float]:
    """Linear-interpolation percentiles (numpy's default, as objectives.resolve_percentile)."""
    which = list(which)
    return {str(k): float(v) for k, v in zip(which, np.percentile(values, which))}


def _num(x: float) -> str:
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def place(mean_p: float) -> dict[str, Any]:
    """The task's place on the capability continuum from the mean response-token p."""
    if mean_p >= STRONG_MEAN_P:
        regime, why = "model-strong", f"mean p {_num(mean_p)} >= {STRONG_MEAN_P}"
    elif mean_p < WEAK_MEAN_P:
        regime, why = "model-weak", f"mean p {_num(mean_p)} < {WEAK_MEAN_P}"
    else:
        regime, why = "intermediate", f"{WEAK_MEAN_P} <= mean p {_num(mean_p)} < {STRONG_MEAN_P}"
    return {
        "regime": regime,
        "score": "mean_p",
        "value": mean_p,
        "reason": why,
        "thresholds": {
            "model-strong": f"mean_p >= {STRONG_MEAN_P}",
            "model-weak": f"mean_p < {WEAK_MEAN_P}",
        },
    }


def build_probe_report(
    ce_by_example: dict[int, np.ndarray],
    examples,
    *,
    model_dir: str | os.PathLike,
    model: ModelConfig,
    dtype: str,
    key: str,
    layout: dict[str, int],
    elapsed_s: float,
) -> dict[str, Any]:
    """The JSON-serializable report from every example's response-token CE (``examples``: the
    measured :class:`~probsft_megatron.probe.examples.ProbeExamples`)."""
    n = len(examples.dataset)
    if missing := sorted(set(range(n)) - set(ce_by_example)):
        raise RuntimeError(
            f"the probe has no result for {len(missing)} example(s), e.g. {missing[0]}"
        )
    ce = np.concatenate([ce_by_example[i] for i in range(n)]) if n else np.zeros(0)
    if ce.size == 0:
        raise DataError(
            "the probe sample has no response tokens; check data.response_key and data.max_length"
        )
    p = np.exp(-ce)
    # Every example has at least one response token (SFTDataset drops prompt-only ones).
    per_example = [
        {
            "example": i,
            "origin": examples.origins[i],
            "tokens": int(ce_by_example[i].size),
            "mean_p": float(np.exp(-ce_by_example[i]).mean()),
            "mean_nll": float(ce_by_example[i].mean()),
        }
        for i in range(n)
    ]
    means = np.array([e["mean_p"] for e in per_example])
    counts, _ = np.histogram(p, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    stats = examples.dataset.stats
    placement = place(float(p.mean()))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "path": str(Path(model_dir).absolute()),
            **{k: getattr(model, k) for k in ("arch", "num_layers", "hidden_size")},
            "num_parameters": model.num_parameters(),
        },
        "data": {
            "config": dataclasses.asdict(examples.data_config),
            "records_available": examples.records_available,
            "examples": n,
            "truncated": stats["n_truncated"],
            "dropped": stats["n_dropped"],
            # conversations: measured over their trained assistant turns only
            "conversations": stats.get("n_conversations", 0),
            "assistant_turns_kept": stats.get("n_turns_kept", 0),
        },
        "dtype": dtype,
        "layout": layout,
        "elapsed_s": elapsed_s,
        "tokens": int(p.size),
        "mean_p": float(p.mean()),
        "median_p": float(np.median(p)),
        "mean_nll": float(ce.mean()),
        "frac_p_gt_0.5": float((p > 0.5).mean()),
        "frac_p_gt_0.9": float((p > 0.9).mean()),
        "percentiles": _percentiles(p, range(101)),
        "histogram": {"range": [0.0, 1.0], "bins": HISTOGRAM_BINS, "counts": counts.tolist()},
        "per_example_summary": {
            "mean": float(means.mean()),
            "percentiles": _percentiles(means, (0, 10, 25, 50, 75, 90, 100)),
        },
        "per_example": per_example,
        "placement": placement,
        "recommendation": dict(RECOMMENDATIONS[placement["regime"]]),
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a human-readable table."""
    pl, rec = report["placement"], report["recommendation"]
    lay, data = report["layout"], report["data"]
    config, ex = data["config"], report["per_example_summary"]
    source = "figfont" if config["source"] == "figfont" else ", ".join(config["train_files"])
    q, alts = ex["percentiles"], ", ".join(rec["alternatives"]) or "none"
    lines = [
        f"model  {report['model']['path']}",
        f"data   {source}: {report['tokens']} response tokens in {data['examples']} examples "
        f"(of {data['records_available']} records)",
        f"run    {report['dtype']}, TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}, "
        f"{report['elapsed_s']:.1f} s, {report['created']}",
        f"  mean p    {_num(report['mean_p'])}    median p  {_num(report['median_p'])}    "
        f"mean NLL  {report['mean_nll']:.4f}",
        f"  p > 0.5   {100 * report['frac_p_gt_0.5']:6.2f}%   p > 0.9   "
        f"{100 * report['frac_p_gt_0.9']:6.2f}%",
        "  percentile   p",
        *(f"  {k:>10}   {report['percentiles'][str(k)]:.6g}" for k in TABLE_PERCENTILES),
        f"  per-example mean p: mean {_num(ex['mean'])}  min {_num(q['0'])}  "
        f"median {_num(q['50'])}  max {_num(q['100'])}",
        f"  placement: {pl['regime']} ({pl['reason']})",
        f"  recommended objective: {rec['objective']}  (alternatives to sweep: {alts})",
    ]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG, written atomically: the token-p histogram and the CDFs of token and example p."""
    from probsft_megatron.report.figures import pyplot

    plt = pyplot()
    counts = np.asarray(report["histogram"]["counts"])
    fractions = counts / max(counts.sum(), 1)
    edges = np.linspace(0.0, 1.0, report["histogram"]["bins"] + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(edges[:-1], fractions, width=np.diff(edges), align="edge", color="tab:blue")
    for label, style in (("mean", "--"), ("median", ":")):
        value = report[f"{label}_p"]
        left.axvline(value, color="k", linestyle=style, label=f"{label} {value:.3f}")
    left.set(xlabel="p of the target token", ylabel="fraction of response tokens", xlim=(0, 1))
    left.set_title(f"{report['tokens']} response tokens")
    left.legend()
    pct = np.arange(101)
    right.plot([report["percentiles"][str(k)] for k in pct], pct / 100, label="token p")
    means = sorted(e["mean_p"] for e in report["per_example"])
    right.step(
        means, np.arange(1, len(means) + 1) / len(means), where="post", label="per-example mean p"
    )
    for bound, label in ((WEAK_MEAN_P, "mean-p bounds: weak | strong"), (STRONG_MEAN_P, None)):
        right.axvline(bound, color="grey", linewidth=0.8, label=label)
    title = f"{report['placement']['regime']} -> {report['recommendation']['objective']}"
    right.set(xlabel="p", ylabel="cumulative fraction", xlim=(0, 1), ylim=(0, 1), title=title)
    right.legend(loc="upper left")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """``report.json`` and ``probe.png`` into ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_report(report, out / PLOT_FILE)
    atomic_write_json(out / REPORT_FILE, report)
    return out / REPORT_FILE


def load_report(report: dict | str | os.PathLike) -> dict[str, Any]:
    """A report given as a dict, a report.json path or a folder holding one."""
    if isinstance(report, dict):
        return report
    path = Path(report) / REPORT_FILE if Path(report).is_dir() else Path(report)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the probe report {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{path} is not a JSON probe report") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a probe report (written by `probsft probe`)")
    return data


def resolve_threshold_names(
    report: dict | str | os.PathLike, names: Iterable[str | dict]
) -> dict[str, str]:
    """``{name as given: canonical absolute name}``: ``OnlyTopP-K20`` becomes ``OnlyTopP-<20th
    percentile of the report's token p>`` (the paper's figure 5); other names come back
    canonical. Percentiles must be integers; a value of 1 (top) or 0 (bottom) is moved just
    inside the objective's range, which keeps the same tokens."""
    data = load_report(report)
    out: dict[str, str] = {}
    for spec in names:
        objective = parse_objective(spec)
        label = spec if isinstance(spec, str) else objective.name
        if not objective.needs_percentile:
            out[label] = objective.name
            continue
        k = objective.threshold.value
        if not float(k).is_integer():
            raise ConfigError(
                f"{label}: a probe report holds integer percentiles 0..100, "
                f"not {k:g}; use K{round(k)}"
            )
        q = float(data["percentiles"][str(int(k))])
        # inside (0, 1): below 1, or the smallest normal float (CPU runs flush subnormals)
        top = objective.threshold.side == "top"
        q = min(q, math.nextafter(1.0, 0.0)) if top else max(q, sys.float_info.min)
        out[label] = parse_objective(f"{objective.name.rsplit('-', 1)[0]}-{q!r}").name
    return out
