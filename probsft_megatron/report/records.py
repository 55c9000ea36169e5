"""What the launcher recorded about each step: NeMo-Run's step folders and the SLURM record.

``probsft launch`` writes, per experiment, ``WORK/experiments/<title>/<id>/``: one folder per
step with NeMo-Run's command record (``configs/<step>_config.yaml``) and, once a local job
has ended, ``nemo_run/<job>/SUCCESS`` (its final state and log paths); with
``--executor slurm`` also ``probsft_experiment.json`` (each step's SLURM job and log folder,
and a failed submission's error). From these come a run's launched steps
(:class:`StepRecord`), their states, the ``error:`` line of a failed step's log, and the
config of a run that has not written one yet (its recipe and overrides).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from probsft_megatron.report.files import read_json, read_yaml

LAUNCH_RECORD = "probsft_experiment.json"
"""The record ``probsft launch --executor slurm`` writes into each experiment folder."""

FAILED_STATES = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "UNKNOWN_FAILED",
}
RUNNING_STATES = {"RUNNING", "COMPLETING", "STARTING"}
QUEUED_STATES = {"PENDING", "SUBMITTED", "QUEUED", "CONFIGURING", "REQUEUED", "UNSUBMITTED"}
SUCCEEDED_STATES = {"SUCCEEDED", "COMPLETED", "SUCCESS"}


def state_class(state: str | None) -> str | None:
    """A job state (NeMo-Run's or SLURM's) as ``failed``, ``running``, ``queued``,
    ``succeeded`` or None (unknown)."""
    if not state:
        return None
    s = state.upper()
    if s in FAILED_STATES:
        return "failed"
    if s in RUNNING_STATES:
        return "running"
    if s in QUEUED_STATES:
        return "queued"
    if s in SUCCEEDED_STATES:
        return "succeeded"
    return None


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
        for ln in reversed(lines):
            m = re.search(r"\berror: .*", ln)
            if m:
                return m.group(0)[:300]
        for ln in reversed(lines):
            if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*", ln):
                return ln[:300]
    return None


@dataclass
class StepRecord:
    """One launched step of an experiment, as its NeMo-Run record tells it."""

    name: str
    kind: str
    run_dir: str | None
    recipe: str | None = None
    objective: str | None = None
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    state: str | None = None
    error: str | None = None
    experiment: str | None = None
    log: str | None = None


def read_experiment_records(work_dir: str | os.PathLike) -> dict[str, dict[str, StepRecord]]:
    """Run folder -> step kind -> the newest :class:`StepRecord` of the experiments under
    ``WORK/experiments/<title>/<id>/``.

    Each step folder holds NeMo-Run's ``configs/<step>_config.yaml`` (the command) and, once
    a local job has ended, ``nemo_run/<job>/SUCCESS`` (JSON with ``final_state``). SLURM jobs
    carry no state here: pass their states to
    :func:`~probsft_megatron.report.build_report` (``step_states``)."""
    out: dict[str, dict[str, StepRecord]] = {}
    root = Path(work_dir) / "experiments"
    if not root.is_dir():
        return out
    exp_dirs = [d for d in root.glob("*/*") if d.is_dir()]
    exp_dirs.sort(key=lambda d: (_exp_time(d), str(d)))
    for exp in exp_dirs:  # older first: newer launches of the same run win
        for cfg_file in sorted(exp.glob("*/configs/*_config.yaml")):
            step_dir = cfg_file.parent.parent
            data = read_yaml(cfg_file)
            if not isinstance(data, dict):
                continue
            record = _step_record(step_dir.name, data)
            if record is None or record.run_dir is None:
                continue
            record.experiment = str(exp)
            ends = sorted(step_dir.glob("nemo_run/*/SUCCESS"), key=lambda p: p.stat().st_mtime)
            if ends:
                info = read_json(ends[-1], [])
                if isinstance(info, dict):
                    record.state = str(info.get("final_state") or "") or None
                    if record.state in FAILED_STATES:
                        logs = [
                            Path(r["stderr"])
                            for reps in (info.get("roles") or {}).values()
                            for r in reps
                            if isinstance(r, dict) and r.get("stderr")
                        ]
                        logs += sorted(ends[-1].parent.rglob("stderr.log"))
                        record.error = step_error(logs)
                        record.log = str(logs[0]) if logs else None
            out.setdefault(str(Path(record.run_dir)), {})[record.kind] = record
        _add_launch_record(exp, out)
    return out


def _add_launch_record(exp: Path, out: dict[str, dict[str, StepRecord]]) -> None:
    """What ``probsft launch --executor slurm`` records in ``probsft_experiment.json``: each
    step's log (``log_dir/log-<job_name>_<job_id>_<restart>.out``, else the batch script's
    ``sbatch_<job_name>_<job_id>.out``) and, when the submission itself failed, its error."""
    launch = read_json(exp / LAUNCH_RECORD, [])
    if not isinstance(launch, dict) or not isinstance(launch.get("steps"), list):
        return
    run_dirs = {
        str(name): str(Path(str(summary)).parent.parent)  # RUN/eval/summary.json
        for name, summary in (launch.get("runs") or {}).items()
    }
    for step in launch["steps"]:
        if not isinstance(step, dict):
            continue
        kind, name = str(step.get("kind")), str(step.get("name"))
        run = next((r for r in run_dirs if name == f"{kind}-{r}"), None)
        if run is None:
            continue
        runs = out.setdefault(str(Path(run_dirs[run])), {})
        record = runs.get(kind) or StepRecord(name, kind, run_dirs[run])
        record.experiment = str(exp)
        log = _launch_log(step)
        if log is not None:
            record.log = str(log)
        if launch.get("status") == "failed":
            record.state, record.error = "FAILED", f"submission failed: {launch.get('error')}"
        runs[kind] = record


def _launch_log(step: dict) -> Path | None:
    job, job_name, folder = step.get("job_id"), step.get("job_name"), step.get("log_dir")
    if not (job and job_name and folder):
        return None
    starts = sorted(
        Path(folder).glob(f"log-{job_name}_{job}_*.out"),
        key=lambda p: (
            int(p.stem.rsplit("_", 1)[-1]) if p.stem.rsplit("_", 1)[-1].isdigit() else -1,
            p.name,
        ),
    )
    if starts:
        return starts[-1]
    batch = Path(folder) / f"sbatch_{job_name}_{job}.out"
    return batch if batch.is_file() else None


def _exp_time(exp: Path) -> float:
    m = re.search(r"_(\d{12,})$", exp.name)
    if m:
        return int(m.group(1)) / 1e9
    try:
        return exp.stat().st_mtime
    except OSError:
        return 0.0


def _unquoted(arg: str) -> str:
    """A SLURM step's argument as the job received it (they are shell-quoted there)."""
    if arg[:1] in ("'", '"'):
        try:
            words = shlex.split(arg)
        except ValueError:
            return arg
        if len(words) == 1:
            return words[0]
    return arg


def _step_record(name: str, data: dict) -> StepRecord | None:
    args = [_unquoted(str(a)) for a in data.get("args") or []]
    path = str(data.get("path") or "")
    if "-m" in args[:-1] and args[args.index("-m") + 1].endswith(".train"):
        # the train step runs under the training agent: its own torchrun options, then
        # ``-m probsft_megatron.train`` and the training arguments
        at = args.index("-m")
        path, args = args[at + 1], args[at + 2 :]

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    def override(key: str) -> str | None:
        found = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
        return found[-1] if found else None

    if path.endswith(".train"):
        env = data.get("env") if isinstance(data.get("env"), dict) else {}
        return StepRecord(
            name,
            "train",
            override("train.output_dir"),
            recipe=value("--config"),
            objective=override("loss.objective"),
            overrides=[a for a in args if "=" in a and not a.startswith("-")],
            env={str(k): str(v) for k, v in env.items()},
        )
    if args[:1] == ["export"]:
        return StepRecord(name, "export", value("--train-dir"))
    if args[:1] == ["eval"]:
        out = value("--out")
        return StepRecord(name, "eval", str(Path(out).parent) if out else None)
    return None


def planned_config(record: StepRecord, problems: list[str]) -> dict | None:
    """The config a launched run that wrote none yet will have: its recipe and overrides
    through the public loader (``config.load_config``), as the launcher validated them."""
    from probsft_megatron import resources
    from probsft_megatron.config import load_config

    # the step's own config search path (`probsft launch --env PROBSFT_CONFIG_PATH=...`)
    saved = os.environ.get(resources.ENV_VAR)
    if resources.ENV_VAR in record.env:
        os.environ[resources.ENV_VAR] = record.env[resources.ENV_VAR]
    try:
        config = load_config(record.recipe, record.overrides).to_dict()
    except Exception as exc:  # a recipe changed or removed since the launch
        problems.append(
            f"{record.run_dir}: cannot rebuild the config of step {record.name} "
            f"({type(exc).__name__}: {str(exc)[:160]})"
        )
        return None
    finally:
        if saved is None:
            os.environ.pop(resources.ENV_VAR, None)
        else:
            os.environ[resources.ENV_VAR] = saved
    # training takes the model from the checkpoint it starts from, when there is one
    ckpt = (config.get("init") or {}).get("checkpoint")
    stored = read_json(Path(ckpt) / "model_config.json", problems) if ckpt else None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        config["model"] = stored["model"]
    return config
