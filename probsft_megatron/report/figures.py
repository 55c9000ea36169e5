"""The report's PNG figures (matplotlib Agg, written atomically): training curves, score
against ``a`` or the threshold, and the probe's token p with the objectives' ``w(p)``."""

from __future__ import annotations

import math
from pathlib import Path

from probsft_megatron.fileio import atomic_write
from probsft_megatron.objectives import parse_objective
from probsft_megatron.report.tables import cell, columns, metric_label


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, handles: list, labels: list, **legend) -> Path:
    """The legend right of the axes, then the PNG at ``path``."""
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, **legend)
    fig.tight_layout()
    try:
        return atomic_write(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        )
    finally:
        pyplot().close(fig)


def _colors(n: int) -> list:
    cmap = pyplot().get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def plot_curves(groups: list[dict], out: Path) -> Path | None:
    """``out/curves.png``: loss and mean p against step, every run (seeds share a colour)."""
    trained = [g for g in groups if any(r["curves"]["step"] for r in g["_members"])]
    if not trained:
        return None
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.2))
    few = max(len(r["curves"]["step"]) for g in trained for r in g["_members"]) < 8
    marker = "o" if few else None  # a few points: show them
    for color, g in zip(_colors(len(trained)), trained):
        label = g["label"] + (f" ({g['setting']})" if g["setting"] else "")
        style = dict(color=color, alpha=0.85, linewidth=1.2, marker=marker, markersize=3)
        for i, r in enumerate(g["_members"]):
            c = r["curves"]
            for ax, key in zip(axes, ("loss", "mean_p")):
                pts = [(s, v) for s, v in zip(c["step"], c[key]) if isinstance(v, (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=label if i == 0 else None, **style)
    axes[0].set(xlabel="step", ylabel="training loss (each run's own objective)", title="loss")
    axes[1].set(xlabel="step", ylabel="mean p of response tokens", title="mean p", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    title, ncol = "group (seeds share a colour)", 1 + len(labels) // 25
    return _save(fig, out / "curves.png", handles, labels, title=title, ncol=ncol)


def _errorbar(ax, xs, stats, **kw):
    ys = [100 * s["mean"] for s in stats]
    err = [100 * (s["half_width"] or 0.0) for s in stats]
    ax.errorbar(xs, ys, yerr=err if any(err) else None, capsize=3, **kw)


def plot_sweep(
    groups: list[dict], blocks: list[dict], axis: str, metric: str, out: Path
) -> Path | None:
    """``out/sweep-{axis}.png``, one panel per task: score against ``a`` (GeneralFamily; ``p``
    at a = 1, NLL a line at a = 0) or against the threshold (percentile if the runs name one)."""
    by_id = {g["id"]: g for g in groups}
    series: list[tuple[dict, str, list[tuple[float, dict, dict]]]] = []
    refs: list[tuple[dict, str, dict]] = []  # (block, column, group): NLL and p
    for block in blocks:
        members = [by_id[i] for i in block["groups"]]
        fams: dict[tuple, list] = {}  # one line per family (and threshold kind)
        for g in members:
            o = g["objective"]
            if axis == "a" and o and o["family"] == "general":
                fams.setdefault(("", False), []).append((o["a"], g))
            elif axis != "a" and o and o["threshold"] is not None:
                pct = o["percentile"] is not None
                x = o["percentile"] if pct else o["threshold"]["value"]
                fams.setdefault((o["prefix"], pct), []).append((x, g))
        lines = [sorted(p, key=lambda t: t[0]) for _, p in sorted(fams.items()) if len(p) >= 2]
        if not lines:
            continue
        for col in columns(block["tasks"]):
            for pts in lines:
                if line := [(x, g, s) for x, g in pts if (s := cell(g, col))]:
                    series.append((block, col, line))
            refs += [
                (block, col, g)
                for g in members
                if g["objective"] and g["objective"]["family"] in ("nll", "p") and cell(g, col)
            ]
    if not series:
        return None
    cols = list(dict.fromkeys(col for _, col, _ in series))
    fig, (axes,) = pyplot().subplots(1, len(cols), figsize=(4.6 * len(cols), 3.8), squeeze=False)
    settings = list(dict.fromkeys(b["setting"] for b, _, _ in series))
    colors = dict(zip(settings, _colors(max(len(settings), 1))))
    for ax, col in zip(axes, cols):
        fam_idx: dict[str, int] = {}
        mine = [(block, line) for block, c, line in series if c == col]
        for block, line in mine:
            xs, _, stats = zip(*line)
            name = line[0][1]["objective"]["prefix"] if axis != "a" else "GeneralFamily-a"
            fam = fam_idx.setdefault(name, len(fam_idx))
            parts = (name if axis != "a" else "", block["setting"])
            label = ", ".join(t for t in parts if t) or "GeneralFamily-a"
            marker = "os^vDP"[fam % 6]  # one per family
            _errorbar(ax, xs, stats, color=colors[block["setting"]], marker=marker, label=label)
        for block, g in [(b, g) for b, c, g in refs if c == col]:
            s, label = cell(g, col), g["label"]
            color = colors.get(block["setting"], "k")
            where = f", {block['setting']}" if block["setting"] else ""
            seeds = f", n={s['n']}" if s["n"] > 1 else ""
            if axis == "a" and g["objective"]["family"] == "p":
                star = {"marker": "*", "markersize": 12, "linestyle": "none"}
                _errorbar(ax, [1.0], [s], color=color, label=f"p (a = 1{seeds}){where}", **star)
            else:
                nll = g["objective"]["family"] == "nll"
                what = ("NLL, a = 0" if axis == "a" else "NLL") if nll else "no threshold"
                style = dict(color=color, linestyle="--" if nll else ":", linewidth=1)
                ax.axhline(100 * s["mean"], label=f"{label} ({what}{seeds}){where}", **style)
                if s.get("half_width"):  # the seed interval as a band
                    band = dict(color=color, alpha=0.08, linewidth=0)
                    ax.axhspan(100 * s["low"], 100 * s["high"], **band)
        if axis == "a":
            xs_all = [x for _, line in mine for x, _, _ in line]
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
                ax.set_xscale("log")
            xlabel = "convexity a of (1 - p^a) / a"
        elif any(line[0][1]["objective"]["percentile"] is not None for _, line in mine):
            xlabel = "threshold: percentile of the base model's token p"
        else:
            xlabel = "threshold q (absolute p)"
        ax.set(xlabel=xlabel, ylabel=metric_label(metric), title=col)
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes[:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return _save(fig, out / f"sweep-{axis}.png", handles, labels)


def weight_curve(objective: str, p, probe: dict | None = None):
    """``w(p)`` of an objective on the probabilities ``p`` (numpy), thresholds applied; a
    per-batch percentile threshold (``OnlyTopP-K20``) at the probe's percentile (None without)."""
    import numpy as np
    import torch

    obj = parse_objective(objective)
    ce = torch.from_numpy(-np.log(np.asarray(p, dtype=np.float64)))
    w = obj.weight_from_ce(ce)
    if obj.thresholded:
        q = None
        if obj.needs_percentile:
            pct = (probe or {}).get("percentiles") or {}
            k = obj.threshold.value
            lo, hi = math.floor(k), math.ceil(k)
            if not {str(lo), str(hi)} <= pct.keys():
                return None
            q = pct[str(lo)] + (pct[str(hi)] - pct[str(lo)]) * (k - lo)
        w = w * obj.keep_mask(ce, q).to(w.dtype)
    return w.numpy()


def plot_probe(probe: dict, objectives: list[tuple[str, str]], path: Path) -> Path | None:
    """The base model's token-p histogram with the ``w(p)`` of ``objectives`` (label, name)."""
    import numpy as np

    hist = probe.get("histogram") or {}
    counts = np.asarray(hist.get("counts") or [], dtype=float)
    if counts.size == 0:
        return None
    lo, hi = (hist.get("range") or [0.0, 1.0])[:2]
    edges = np.linspace(lo, hi, counts.size + 1)
    fig, ax = pyplot().subplots(figsize=(9, 4.4))
    shares = counts / max(counts.sum(), 1.0)
    bars = dict(align="edge", color="lightgrey", edgecolor="grey", linewidth=0.3)
    ax.bar(edges[:-1], shares, width=np.diff(edges), label="base model: token p", **bars)
    for key, style in (("mean_p", "--"), ("median_p", ":")):
        value, name = probe.get(key), key.replace("_", " ")
        if isinstance(value, (int, float)):
            ax.axvline(value, color="k", linestyle=style, linewidth=1, label=f"{name} {value:.3f}")
    ax.set(
        xlabel="p of the target token under the base model",
        ylabel="fraction of response tokens",
        xlim=(0, 1),
    )
    right = ax.twinx()
    grid = np.linspace(1e-4, 1 - 1e-6, 2000)
    ymax = 1.05
    for color, (label, name) in zip(_colors(len(objectives)), objectives):
        w = weight_curve(name, grid, probe)
        if w is None:
            continue
        if np.nanmax(w) > 1.5:
            ymax = 3.0
        style = "--" if parse_objective(name).thresholded else "-"  # dashed: over their family
        right.plot(grid, w, color=color, linewidth=1.4, linestyle=style, label=f"w(p), {label}")
    right.set_ylim(0, ymax)
    right.set_ylabel("weight w(p) on the NLL gradient" + (" (clipped)" if ymax > 1.5 else ""))
    regime = (probe.get("placement") or {}).get("regime")
    title = f"probe: {probe.get('model') or '?'} on {probe.get('data') or '?'}"
    if regime:
        title += f" - {regime}"
    ax.set_title(title)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = right.get_legend_handles_labels()
    return _save(fig, path, h1 + h2, l1 + l2)
