"""``report.md`` and the comparison tables (what ``probsft report`` prints) as Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probsft_megatron.report.files import EXTRACTED
from probsft_megatron.report.runs import TAIL, TRAINING_STATS
from probsft_megatron.report.tables import cell, columns, metric_label


def _fmt_stat(s: dict | None, pct: bool = True) -> str:
    """``mean ± half-width`` in percent (``pct``) or as :func:`_num`; ``-`` for none."""
    if not s:
        return "-"
    shown = [s["mean"], s.get("half_width")]
    return " ± ".join(f"{x * 100.0:.1f}" if pct else _num(x) for x in shown if x is not None)


def _num(x: Any) -> str:
    """4 significant digits, scientific outside [1e-3, 1e5); ``-`` for a non-number."""
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def counts_text(counts: dict[str, int]) -> str:
    """``3 complete, 1 failed``."""
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def format_tables(report: dict, heading: str = "## ") -> list[str]:
    """The comparison table of each block as markdown lines (objective x task, Avg., status)."""
    groups = {g["id"]: g for g in report["groups"]}
    return [line for block in report["tables"] for line in _block_table(block, groups, heading)]


def _block_table(block: dict, groups: dict, heading: str = "## ") -> list[str]:
    tasks, cols = block["tasks"], columns(block["tasks"])
    names = ["objective", "seeds", *tasks, *["Avg."] * (len(cols) - len(tasks)), "status"]
    lines = [f"{heading}{block['setting'] or 'all runs'}", "", _row(map(_md_escape, names))]
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(names) - 2) + ["---"]) + "|")
    for gid in block["groups"]:
        g = groups[gid]
        row = [f"`{g['label']}`", f"n={len(g['runs'])}"]
        for col in cols:
            s = cell(g, col)
            text = _fmt_stat(s) + (f" (n={s['n']})" if s and s["n"] < len(g["runs"]) else "")
            row.append(f"**{text}**" if gid in block["best"].get(col, []) else text)
        lines.append(_row([*row, counts_text(g["statuses"])]))
    return [*lines, ""]


def render_markdown(report: dict) -> str:
    """``report.md``: summary, comparison tables, training statistics, runs, probes, figures."""
    groups = {g["id"]: g for g in report["groups"]}
    inputs = ", ".join(f"`{p}`" for p in report["inputs"])
    lines = [
        "# Runs report",
        "",
        f"{len(report['runs'])} run(s) in {len(groups)} group(s) from {inputs}: "
        f"{counts_text(report['status_counts'])}.",
        "",
        f"Cells: {metric_label(report['metric'])} as mean ± half-width of the 95% t-interval "
        "over seeds (runs identical but for `train.seed`); a single seed has no interval "
        "(n=1). **Bold**: best in its column within the block. Avg.: the mean over the "
        "block's tasks, per run, then over seeds (only runs evaluated on every task).",
        "",
    ]
    if report["notes"]:
        lines += [*(f"- note: {note}" for note in report["notes"]), ""]
    for block in report["tables"]:
        lines += _block_table(block, groups)
        detail_rows = []
        for g in (groups[gid] for gid in block["groups"]):
            for t, d in g["details"].items():
                samples = " x ".join(
                    "/".join(map(str, d[k])) for k in ("problems", "samples_per_problem")
                )
                boxed = _fmt_stat(d.get("boxed_rate"))
                if EXTRACTED in d.get("boxed_basis", []):  # any extracted answer (old samples)
                    boxed += f" ({EXTRACTED})"
                stats = [_fmt_stat(d.get(k)) for k in ("avg@n", "mean_score", "exact")]
                passes = [
                    f"{k} {_fmt_stat(d[k])}" for k in d if k.startswith("pass@") and k != "pass@1"
                ]
                detail_rows.append(
                    [f"`{g['label']}`", t, samples, *stats, ", ".join(passes) or "-", boxed]
                )
        if detail_rows:
            lines += [
                "<details><summary>per task: samples, accuracy, score, pass@k, boxed "
                "answers</summary>",
                "",
                "| objective | task | problems x samples | accuracy | score | exact | "
                "pass@k | boxed |",
                "|---|---|---|---:|---:|---:|---|---:|",
                *map(_row, detail_rows),
                "",
                "</details>",
                "",
            ]
    trained = [g for g in report["groups"] if g["training"].get("steps")]
    if trained:
        lines += [
            "## Training",
            "",
            f"Final statistics: mean over the last {TAIL} logged steps of each run, then "
            "over seeds. The loss is each run's own objective, so only mean p compares "
            "across objectives.",
            "",
            "| objective | setting | seeds | steps | loss | mean p | kept tokens | "
            "mean w | tokens/s | positions/token |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for g in trained:
            t = g["training"]
            steps = dict.fromkeys(
                f"{s}/{p}" if p else str(s) for s, p in zip(t["steps"], t["planned_steps"])
            )
            stats = [  # the share of kept tokens in percent, the rest as they are
                _fmt_stat(t.get(k), k == "frac_kept") + ("%" if k == "frac_kept" else "")
                for k in TRAINING_STATS
            ]
            lines.append(_row([*_group_cells(g), ", ".join(steps), *stats]))
        lines.append("")
        validated = [g for g in trained if "val_loss" in g["training"]]
        if validated:
            lines += [
                "Validation on `data.val_files` (the newest of each run, then over seeds): the "
                "loss is each run's own objective, the NLL is the same measure for every run.",
                "",
                "| objective | setting | seeds | val loss | val NLL |",
                "|---|---|---|---:|---:|",
            ]
            for g in validated:
                stats = [_fmt_stat(g["training"].get(k), False) for k in ("val_loss", "val_nll")]
                lines.append(_row([*_group_cells(g), *stats]))
            lines.append("")
    lines += [
        "## Runs",
        "",
        "| run | objective | seed | model | data | recipe | status | probe placement |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    names = [r["name"] for r in report["runs"]]
    for r in report["runs"]:
        shown = r["name"]
        if names.count(shown) > 1:  # the same run name in several work directories
            parent = Path(r["path"]).parent
            shown = f"{(parent.parent if parent.name == 'runs' else parent).name}/{shown}"
        obj = r["objective"]
        label = obj["label"] if obj else "-"
        if obj and obj["label"] != obj["name"]:
            label += f" (trained as `{obj['name']}`)"
        placement = "-"
        if r["probe"] and r["probe"].get("placement"):
            pl, rec = r["probe"]["placement"], r["probe"].get("recommendation") or {}
            placement = f"{pl.get('regime')} -> {rec.get('objective', '?')}"
        status = f"**{r['status']}**"
        if r["status_detail"]:
            status += f": {_md_escape(r['status_detail'])}"
        seed = str(r["seed"]) if r["seed"] is not None else "-"
        cells = [r["model"] or "-", r["dataset"] or "-", r["recipe"] or "-", status, placement]
        lines.append(_row([f"`{shown}`", label, seed, *cells]))
    lines.append("")
    problems = [p for r in report["runs"] for p in r["problems"]]
    if problems:
        lines += ["Problems met while reading (skipped):", "", *(f"- {p}" for p in problems), ""]
    if report["probes"]:
        lines += [
            "## Probe of the base model",
            "",
            "| probe | model | data | tokens | mean p | median p | 20th pct | placement | "
            "recommended |",
            "|---|---|---|---:|---:|---:|---:|---|---|",
        ]
        for p in report["probes"]:
            pl, rec = p.get("placement") or {}, p.get("recommendation") or {}
            pct20 = (p.get("percentiles") or {}).get("20")
            nums = [_num(x) for x in (p.get("mean_p"), p.get("median_p"), pct20)]
            short = "/".join(Path(p["path"]).parts[-3:])
            ends = [pl.get("regime", "-"), f"`{rec.get('objective', '-')}`"]
            cells = [p["model"] or "-", p["data"] or "-", str(p["tokens"]), *nums, *ends]
            lines.append(_row([f"`{short}`", *cells]))
        lines.append("")
    if report["figures"]:
        lines += ["## Figures", ""]
        for fig in report["figures"]:
            lines += [f"**{fig['title']}**", "", f"![{fig['title']}]({fig['file']})", ""]
    lines += [
        "---",
        f"`report.json` holds every number above. Made by `probsft report` on {report['created']}.",
    ]
    return "\n".join(lines) + "\n"


def _group_cells(g: dict) -> list[str]:
    """A group's objective, setting and seeds cells of the training tables."""
    return [f"`{g['label']}`", _md_escape(g["setting"]) or "-", f"n={len(g['runs'])}"]
