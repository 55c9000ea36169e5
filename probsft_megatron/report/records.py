"""Each run's launched steps (:class:`StepOutcome`) from the launcher's run record
``probsft_experiment.json`` and NeMo-Run's ``SUCCESS`` files: states, a failed step's
``error:`` line, and the config of a run that has written none yet."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probsft_megatron.launchers.jobs import RECORD, ExperimentRecord, state_class
from probsft_megatron.report.files import read_json


def step_error(log_files: list[Path]) -> str | None:
    """The last ``error: ...`` line (or exception line) in a failed step's logs."""
    for path in log_files:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 32768))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        found = [m.group(0) for ln in lines if (m := re.search(r"\berror: .*", ln))]
        found = found or [ln for ln in lines if re.match(r"[A-Za-z_.]*(Error|Exception)\b", ln)]
        if found:
            return found[-1][:300]
    return None


@dataclass
class StepOutcome:
    """How one launched step of a run fared: its state, a failure's error line and log; the
    train step also carries what the run record says the run trains."""

    name: str
    kind: str
    run_dir: str | None
    recipe: str | None = None
    objective: str | None = None
    config: dict[str, Any] | None = None
    state: str | None = None
    error: str | None = None
    experiment: str | None = None
    log: str | None = None


def read_experiment_records(
    work_dir: str | os.PathLike, notes: list[str] | None = None
) -> dict[str, dict[str, StepOutcome]]:
    """Run folder -> step kind -> the newest :class:`StepOutcome` under ``WORK/experiments/``
    (SLURM states come from ``step_states``). A folder without a run record is one note."""
    notes = [] if notes is None else notes
    out: dict[str, dict[str, StepOutcome]] = {}
    exp_dirs = [d for d in (Path(work_dir) / "experiments").glob("*/*") if d.is_dir()]
    for exp in sorted(exp_dirs, key=lambda d: (_exp_time(d), str(d))):  # newer launches win
        try:
            record = ExperimentRecord.load(exp)
            runs = {n: r for n, r in record.runs.items() if isinstance(r.get("config"), dict)}
        except FileNotFoundError:
            runs = None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            notes.append(f"{exp / RECORD} is not a run record ({type(exc).__name__}); skipped")
            continue
        if not runs:
            notes.append(
                f"{exp} predates run records (no {RECORD} with its runs): its steps' states "
                "are not shown; relaunch to get them"
            )
            continue
        for step in record.steps:
            run = runs.get(step.name.removeprefix(f"{step.kind}-"))
            if run is None or step.kind == "convert":  # a conversion serves several runs
                continue
            outcome = StepOutcome(step.name, step.kind, run["run_dir"], experiment=str(exp))
            if step.kind == "train":
                outcome.recipe, outcome.objective = run["recipe"], run["objective"]
                outcome.config = run["config"]
            outcome.log = str(log) if (log := step.log_path()) is not None else None
            _local_end(exp / step.name, outcome)
            if record.status == "failed":
                outcome.state, outcome.error = "FAILED", f"submission failed: {record.error}"
            out.setdefault(str(Path(run["run_dir"])), {})[step.kind] = outcome
    return out


def _local_end(step_dir: Path, outcome: StepOutcome) -> None:
    """A local step's final state from NeMo-Run's ``SUCCESS`` file, a failed one's error."""
    ends = sorted(step_dir.glob("nemo_run/*/SUCCESS"), key=lambda p: p.stat().st_mtime)
    info = read_json(ends[-1], []) if ends else None
    if not isinstance(info, dict):
        return
    outcome.state = str(info.get("final_state") or "") or None
    if state_class(outcome.state) == "failed":
        logs = [
            Path(r["stderr"])
            for reps in (info.get("roles") or {}).values()
            for r in reps
            if isinstance(r, dict) and r.get("stderr")
        ]
        logs += sorted(ends[-1].parent.rglob("stderr.log"))
        outcome.error = step_error(logs)
        outcome.log = str(logs[0]) if logs else None


def _exp_time(exp: Path) -> float:
    if m := re.search(r"_(\d{12,})$", exp.name):  # NeMo-Run's id ends in nanoseconds
        return int(m.group(1)) / 1e9
    try:
        return exp.stat().st_mtime
    except OSError:
        return 0.0


def planned_config(outcome: StepOutcome, problems: list[str]) -> dict | None:
    """The config a launched run will have: the validated one, with the model of the
    checkpoint it starts from once that exists (training takes it from there)."""
    config = dict(outcome.config or {})
    if not config:
        return None
    ckpt = (config.get("init") or {}).get("checkpoint")
    stored = read_json(Path(ckpt) / "model_config.json", problems) if ckpt else None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        config["model"] = stored["model"]
    return config
