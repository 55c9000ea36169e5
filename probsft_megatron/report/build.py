"""The report: collect, group, tabulate, draw, and write ``report.json`` and ``report.md``
(atomically) into an output folder checked first (:func:`check_out_dir`)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from probsft_megatron import extras
from probsft_megatron.errors import ConfigError
from probsft_megatron.fileio import atomic_write_json, atomic_write_text
from probsft_megatron.report.collect import Collection, collect
from probsft_megatron.report.figures import plot_curves, plot_probe, plot_sweep
from probsft_megatron.report.files import read_json
from probsft_megatron.report.markdown import render_markdown
from probsft_megatron.report.tables import (
    build_tables,
    check_metric,
    group_runs,
    metric_label,
    status_counts,
)

FORMAT = "probsft-runs-report"
FORMAT_VERSION = 1
REPORT_DIR = "report"
"""Default output folder inside a work directory (``WORK/report``)."""
OUTPUT_NAME = re.compile(r"report\.(json|md)|(curves|sweep-a|sweep-threshold|probe(-\d+)?)\.png")
"""The names of the files a report may write."""


def default_out_dir(paths: list[str | os.PathLike]) -> Path:
    """``<PATH>/report`` for a single folder, else ``./report``."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / REPORT_DIR
    return Path(REPORT_DIR)


def _previous_report(folder: Path) -> dict | None:
    data = read_json(folder / "report.json", [])
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def check_out_dir(out: Path, col: Collection) -> None:
    """Refuse (one :class:`ConfigError` line) an input folder, a run's sub-folder, a folder under
    a work directory's ``runs/``, or one holding report-named files another tool wrote."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it is created if needed)")
    target = out.resolve()
    for run in col.runs:
        folder = Path(run["path"]).resolve()
        what = "a run folder" if run["kind"] == "train" else "an eval folder"
        if target == folder:
            raise ConfigError(f"--out {out} is {what}; choose another folder")
        if folder in target.parents:
            top = folder / target.relative_to(folder).parts[0]
            if top.exists() and _previous_report(top) is None:
                raise ConfigError(
                    f"--out {out} is inside {what} ({folder}), in its {top.name}/; choose a "
                    f"folder of its own, e.g. {folder / REPORT_DIR}"
                )
    for work in col.work_dirs:
        runs = Path(work).resolve() / "runs"
        if target == runs or runs in target.parents:
            raise ConfigError(
                f"--out {out} is under {runs}, where every folder is read as a run; choose "
                f"another folder, e.g. {Path(work) / REPORT_DIR}"
            )
    previous = _previous_report(out)
    ours = {"report.json", "report.md", *(previous.get("files") or [])} if previous else set()
    found = [p.name for p in out.iterdir() if p.is_file()] if out.is_dir() else []
    if foreign := sorted(n for n in found if OUTPUT_NAME.fullmatch(n) and n not in ours):
        raise ConfigError(
            f"--out {out} holds {', '.join(foreign)}, which probsft report did not write "
            "there and would replace; choose another folder"
        )


def build_report(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    metric: str = "avg@n",
    probes: Iterable[str | os.PathLike] = (),
    step_states: dict[str, str] | None = None,
    step_logs: dict[str, str] | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Write report.json, report.md and the figures of the runs under ``paths`` into ``out_dir``
    (default :func:`default_out_dir`) and return the report; ``step_states``/``step_logs``: job
    states and logs by step name (SLURM). Bad input: :class:`ConfigError`, nothing written."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ConfigError("no PATH given; pass an experiment work directory or run folders")
    check_metric(metric)
    col = collect(paths, probes=probes, step_states=step_states, step_logs=step_logs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    check_out_dir(out, col)
    groups = group_runs(col.runs)
    blocks = build_tables(groups, metric)
    notes = list(col.notes)
    for g in groups:
        where = f" ({g['setting']})" if g["setting"] else ""
        notes += [
            f"{g['label']}{where}: the seeds of {task} were evaluated with different "
            "problems or sampling; their mean mixes them"
            for task, d in g.get("details", {}).items()
            if not d["same_sampling"]
        ]
        seeds = [s for s in g["seeds"] if s is not None]
        if len(seeds) != len(set(seeds)):
            notes.append(
                f"group {g['label']} holds runs with the same seed "
                f"({', '.join(g['runs'])}): repeats, not independent seeds"
            )
    if col.runs and not any(b["tasks"] for b in blocks):
        notes.append("no run has an evaluation yet; the table shows statuses only")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, "create the folder", exc) from None
    figs: list[dict] = []
    if figures and importlib.util.find_spec("matplotlib") is None:
        figures = False
        hint = extras.install_hint(extras.OPTIONAL_EXTRAS["report"])
        notes.append(f"no figures: matplotlib is not installed ({hint})")
    try:
        if figures:
            figs = _draw(groups, blocks, col, metric, out)
        order = {
            r["path"]: (i, j) for i, g in enumerate(groups) for j, r in enumerate(g["_members"])
        }
        col.runs.sort(key=lambda r: order.get(r["path"], (len(groups), 0)))  # then the rest
        report = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "inputs": paths,
            "metric": metric,
            "status_counts": status_counts(col.runs),
            "notes": notes,
            "runs": [
                {k: v for k, v in r.items() if k not in ("identity", "config")}
                | {"config": r["config"]}
                for r in col.runs
            ],
            "groups": [{k: v for k, v in g.items() if not k.startswith("_")} for g in groups],
            "tables": blocks,
            "probes": [dict(p) for p in col.probes],
            "figures": figs,
            "files": ["report.json", "report.md", *(f["file"] for f in figs)],
        }
        previous = _previous_report(out)
        atomic_write_text(out / "report.md", render_markdown(report))
        atomic_write_json(out / "report.json", report, default=str)
    except OSError as exc:
        raise _unwritable(out, "write the report", exc) from None
    if previous is not None:
        for stale in set(previous.get("files") or []) - set(report["files"]):
            target = out / Path(str(stale)).name
            if target.suffix == ".png" and target.is_file():
                target.unlink()
    report["out_dir"] = str(out)
    return report


def _unwritable(out: Path, what: str, exc: OSError) -> ConfigError:
    return ConfigError(
        f"--out {out}: cannot {what} ({exc.strerror or exc}); choose a writable folder"
    )


def _draw(
    groups: list[dict], blocks: list[dict], col: Collection, metric: str, out: Path
) -> list[dict]:
    """Every figure that has something to show; their entries for ``report["figures"]``."""
    label = metric_label(metric)
    titles = {
        "curves": "training loss and mean p against step, every run",
        "sweep-a": f"{label} against the convexity a",
        "sweep-threshold": f"{label} against the threshold",
    }
    sweeps = [plot_sweep(groups, blocks, axis, metric, out) for axis in ("a", "threshold")]
    made = [path for path in (plot_curves(groups, out), *sweeps) if path]
    figs = [{"file": p.name, "kind": p.stem, "title": titles[p.stem]} for p in made]
    objectives = list(
        dict.fromkeys((o["label"], o["name"]) for g in groups if (o := g["objective"]))
    )
    for i, probe in enumerate(col.probes):
        name = "probe.png" if len(col.probes) == 1 else f"probe-{i + 1}.png"
        if plot_probe(probe, objectives, out / name):
            what = f"{probe['model']} on {probe['data']}"
            title = f"base model's token p ({what}) with the objectives' w(p)"
            figs.append({"file": name, "kind": "probe", "probe": probe["path"], "title": title})
    return figs
