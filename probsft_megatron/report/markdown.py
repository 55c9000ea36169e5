"""``report.md`` and the comparison tables (what ``probsft report`` prints) as Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probsft_megatron.report.files import EXTRACTED
from probsft_megatron.report.runs import TAIL, TRAINING_STATS
from probsft_megatron.report.tables import metric_label


def _fmt_stat(s: dict | None, pct: bool = True, digits: int = 1) -> str:
    if not s:
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{s['mean'] * scale:.{digits}f}" if pct else _num(s["mean"])
    if s.get("half_width") is not None:
        text += f" ± {s['half_width'] * scale:.{digits}f}" if pct else f" ± {_num(s['half_width'])}"
    return text


def _num(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_tables(report: dict, heading: str = "## ") -> list[str]:
    """The comparison table of each block as markdown lines (objective x task, Avg., status)."""
    groups = {g["id"]: g for g in report["groups"]}
    lines: list[str] = []
    for block in report["tables"]:
        lines += _block_table(block, groups, heading)
    return lines


def _block_table(block: dict, groups: dict, heading: str = "## ") -> list[str]:
    lines = [f"{heading}{block['setting'] or 'all runs'}", ""]
    tasks = block["tasks"]
    cols = ["objective", "seeds", *tasks]
    if len(tasks) > 1:
        cols.append("Avg.")
    cols.append("status")
    lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(cols) - 2) + ["---"]) + "|")
    for gid in block["groups"]:
        g = groups[gid]
        row = [f"`{g['label']}`", f"n={len(g['runs'])}"]
        for t in tasks + (["average"] if len(tasks) > 1 else []):
            s = g["average"] if t == "average" else g["cells"].get(t)
            text = _fmt_stat(s)
            if s and s["n"] < len(g["runs"]):
                text += f" (n={s['n']})"
            if gid in block["best"].get(t, []):
                text = f"**{text}**"
            row.append(text)
        row.append(", ".join(f"{n} {s}" for s, n in g["statuses"].items()))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def render_markdown(report: dict) -> str:
    """``report.md``: summary, the comparison table(s), training statistics, runs, probes
    and the figures."""
    groups = {g["id"]: g for g in report["groups"]}
    metric = report["metric"]
    lines = ["# Runs report", ""]
    counts = report["status_counts"]
    lines.append(
        f"{len(report['runs'])} run(s) in {len(groups)} group(s) from "
        f"{', '.join(f'`{p}`' for p in report['inputs'])}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + "."
    )
    lines += [
        "",
        f"Cells: {metric_label(metric)} as mean ± half-width of the 95% t-interval "
        "over seeds (runs identical but for `train.seed`); a single seed has no interval "
        "(n=1). **Bold**: best in its column within the block. Avg.: the mean over the "
        "block's tasks, per run, then over seeds (only runs evaluated on every task).",
        "",
    ]
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    if report["notes"]:
        lines.append("")
    for block in report["tables"]:
        lines += _block_table(block, groups)
        tasks = block["tasks"]
        # per task details
        detail_rows = []
        for gid in block["groups"]:
            g = groups[gid]
            for t in tasks:
                d = g["details"].get(t)
                if not d:
                    continue
                passes = [k for k in d if k.startswith("pass@")]
                pass_txt = (
                    ", ".join(f"{k} {_fmt_stat(d[k])}" for k in passes if k != "pass@1") or "-"
                )
                samples = (
                    "/".join(str(x) for x in d["problems"])
                    + " x "
                    + "/".join(str(x) for x in d["samples_per_problem"])
                )
                detail_rows.append(
                    [
                        f"`{g['label']}`",
                        t,
                        samples,
                        _fmt_stat(d.get("avg@n")),
                        _fmt_stat(d.get("mean_score")),
                        _fmt_stat(d.get("exact")),
                        pass_txt,
                        _fmt_boxed(d),
                    ]
                )
        if detail_rows:
            lines += [
                "<details><summary>per task: samples, accuracy, score, pass@k, boxed "
                "answers</summary>",
                "",
                "| objective | task | problems x samples | accuracy | score | exact | "
                "pass@k | boxed |",
                "|---|---|---|---:|---:|---:|---|---:|",
            ]
            lines += ["| " + " | ".join(r) + " |" for r in detail_rows]
            lines += ["", "</details>", ""]
    # training statistics
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
            steps = ", ".join(
                dict.fromkeys(
                    f"{s}/{p}" if p else str(s) for s, p in zip(t["steps"], t["planned_steps"])
                )
            )
            stats = [  # the share of kept tokens in percent, the rest as they are
                _fmt_stat(t.get(k), k == "frac_kept") + ("%" if k == "frac_kept" else "")
                for k in TRAINING_STATS
            ]
            lines.append(
                f"| `{g['label']}` | {_md_escape(g['setting']) or '-'} | "
                f"n={len(g['runs'])} | {steps} | " + " | ".join(stats) + " |"
            )
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
                t = g["training"]
                lines.append(
                    f"| `{g['label']}` | {_md_escape(g['setting']) or '-'} | n={len(g['runs'])} "
                    f"| {_fmt_stat(t.get('val_loss'), False)} | "
                    f"{_fmt_stat(t.get('val_nll'), False)} |"
                )
            lines.append("")
    # runs
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
        status = f"**{r['status']}**" + (
            f": {_md_escape(r['status_detail'])}" if r["status_detail"] else ""
        )
        lines.append(
            f"| `{shown}` | {label} | {r['seed'] if r['seed'] is not None else '-'}"
            f" | {r['model'] or '-'} | {r['dataset'] or '-'} | {r['recipe'] or '-'} | "
            f"{status} | {placement} |"
        )
    lines.append("")
    problems = [p for r in report["runs"] for p in r["problems"]]
    if problems:
        lines += ["Problems met while reading (skipped):", ""] + [f"- {p}" for p in problems] + [""]
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
            short = "/".join(Path(p["path"]).parts[-3:])
            lines.append(
                f"| `{short}` | {p['model'] or '-'} | {p['data'] or '-'} | "
                f"{p['tokens']} | {_fmt_num(p.get('mean_p'))} | "
                f"{_fmt_num(p.get('median_p'))} | {_fmt_num(pct20)} | "
                f"{pl.get('regime', '-')} | `{rec.get('objective', '-')}` |"
            )
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


def _fmt_boxed(detail: dict) -> str:
    """The boxed rate; ``(extracted)`` when it counts any extracted answer (old samples)."""
    text = _fmt_stat(detail.get("boxed_rate"))
    if EXTRACTED in detail.get("boxed_basis", []):
        text += f" ({EXTRACTED})"
    return text


def _fmt_num(x: Any) -> str:
    return _num(float(x)) if isinstance(x, (int, float)) else "-"
