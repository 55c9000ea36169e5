"""Finding the runs and probe reports under the paths a user gives (docs/report.md)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ConfigError
from probsft_megatron.report.files import is_eval_dir, is_probe_report, is_run_dir, read_json
from probsft_megatron.report.records import read_experiment_records
from probsft_megatron.report.runs import read_eval_only, read_run


@dataclass
class Collection:
    """The runs, probe reports and notes found under the input paths."""

    runs: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    work_dirs: list[str] = field(default_factory=list)


# what a report keeps of a probe report as it is
PROBE_FIELDS = "tokens mean_p median_p percentiles histogram placement recommendation".split()


def _probe_entry(path: Path, data: dict) -> dict[str, Any]:
    model = data.get("model") or {}
    dcfg = (data.get("data") or {}).get("config") or {}
    names = ",".join(Path(str(f)).name for f in dcfg.get("train_files") or [])
    source = "figfont" if dcfg.get("source") == "figfont" else names or None
    entry = {
        "path": str(path),
        "key": data.get("key"),
        "model": re.sub(r"-[0-9a-f]{12}$", "", Path(str(model.get("path", ""))).name) or None,
        "data": source,
        **{k: data.get(k) for k in PROBE_FIELDS},
    }
    entry["percentiles"] = entry["percentiles"] or {}
    return entry


def _add_probe(col: Collection, path: Path) -> bool:
    data = read_json(path, col.notes)
    if not is_probe_report(data):
        return False
    key = data.get("key") or str(path.resolve())
    if all((p.get("key") or p["path"]) != key for p in col.probes):
        col.probes.append(_probe_entry(path, data))
    return True


def collect(
    paths: Iterable[str | os.PathLike],
    *,
    probes: Iterable[str | os.PathLike] = (),
    step_states: dict[str, str] | None = None,
    step_logs: dict[str, str] | None = None,
) -> Collection:
    """Read every run and probe under ``paths``; :class:`ConfigError` for a path that does not
    exist or holds nothing a report can use."""
    col = Collection()
    runs: dict[str, dict] = {}  # by resolved folder: a run reached twice counts once

    def add_run(run: dict) -> None:
        runs.setdefault(str(Path(run["path"]).resolve()), run)

    def add_work(work: Path) -> None:
        col.work_dirs.append(str(work))
        records = read_experiment_records(work, col.notes)
        by_dir = {str(Path(k).resolve()): v for k, v in records.items()}
        runs_dir = work / "runs"
        run_dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
        for run_dir in run_dirs:
            add_run(read_run(run_dir, by_dir.get(str(run_dir.resolve())), step_states, step_logs))
        for run_dir, recs in sorted(records.items()):
            if str(Path(run_dir).resolve()) not in runs:  # planned, not started
                add_run(read_run(Path(run_dir), recs, step_states, step_logs))
        for depth in ("report.json", "*/report.json", "*/*/report.json"):
            for path in sorted(work.glob(depth)):
                if path.parts[len(work.parts)] not in ("runs", "experiments", "models"):
                    _add_probe(col, path)

    def add_folder(path: Path, top: bool) -> bool:
        """Read ``path`` as a work directory, run, eval folder or probe; False if none."""
        if (path / "runs").is_dir() or (top and (path / "experiments").is_dir()):
            add_work(path)
        elif is_run_dir(path):
            add_run(read_run(path, None, step_states, step_logs))
            if top and (path / "probe" / "report.json").is_file():
                _add_probe(col, path / "probe" / "report.json")
        elif is_eval_dir(path):
            add_run(read_eval_only(path))
        else:
            return _add_probe(col, path / "report.json")
        return True

    for raw in paths:
        path = Path(raw).absolute()
        if not path.exists():
            raise ConfigError(
                f"{path} does not exist; give an experiment work directory, a "
                "run folder, an eval folder or a probe report"
            )
        if path.is_file():
            if path.name == "summary.json":
                path = path.parent
            elif _add_probe(col, path):
                continue
            else:
                raise ConfigError(
                    f"{path} is a file that is not a probe report; give the folder "
                    "of a run, an experiment or an evaluation instead"
                )
        if not add_folder(path, top=True):
            found = [add_folder(p, top=False) for p in sorted(path.iterdir()) if p.is_dir()]
            if not any(found):
                raise ConfigError(
                    f"{path} holds no run: expected a work directory of probsft launch "
                    "(runs/, experiments/), a training run folder (config.json, "
                    "metrics.jsonl, summary.json), an eval folder (summary.json) or a probe "
                    "report, or a folder of those"
                )
    col.runs = list(runs.values())
    for run in col.runs:  # probes written by `loss.objective: auto`
        if run.get("probe") and run["probe"].get("report"):
            _add_probe(col, Path(run["probe"]["report"]))
    for p in probes:
        if not _add_probe(col, Path(p) / "report.json" if Path(p).is_dir() else Path(p)):
            raise ConfigError(
                f"--probe {p}: not a probe report (the report.json written by "
                "`probsft probe`, or its folder)"
            )
    if not col.runs and not col.probes:
        raise ConfigError(f"no runs found under {', '.join(str(p) for p in paths)}")
    return col
