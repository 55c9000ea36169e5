"""Runs report (`probsft report`): the runs of an experiment or sweep side by side.

Not to be confused with the evaluation's own per-run report (``eval/report.py``): this module
reads many finished, failed or still running runs and compares them, the way the paper's
tables and figures do.

Inputs are folders, recognised by what they hold:

* a work directory of ``probsft launch`` (``WORK/runs/<run>/``, ``WORK/experiments/``): every
  run under ``runs/``, the runs the experiment records name that have not started yet, the
  state of every launched step, and any probe report under ``WORK``;
* a training run folder (``config.json``, ``metrics.jsonl``, ``summary.json``,
  ``checkpoints/``, optionally ``eval/`` and ``probe/``), as ``probsft train`` writes it;
* an evaluation folder written by ``probsft eval --out`` (for instance the base model's):
  a row without training;
* a probe report (``report.json`` of ``probsft probe``, or its folder);
* a folder whose sub-folders are any of the above.

Only files are read (JSON, JSON lines and the YAML step records of NeMo-Run), never private
functions of the training, probe, eval or launcher code, so a report can be built on any
machine that sees the folders. Runs that differ only by ``train.seed`` (and by where they were
written) form one group, shown as the mean with a 95% Student-t interval over seeds.

Outputs (:func:`build_report`): ``report.json`` (everything as data), ``report.md`` (tables with
the figures embedded) and PNG figures: training curves of every run, score against the
convexity parameter ``a`` and against the threshold for sweeps, and the probe's token-p
distribution with the weight curves ``w(p)`` of the compared objectives.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from probsft_megatron.errors import ConfigError
from probsft_megatron.fileio import atomic_write, atomic_write_json, atomic_write_text
from probsft_megatron.objectives import ObjectiveError, parse_objective

FORMAT = "probsft-runs-report"
FORMAT_VERSION = 1
PROBE_FORMAT = "probsft-probe"
LAUNCH_RECORD = "probsft_experiment.json"
"""The record ``probsft launch --executor slurm`` writes into each experiment folder."""
REPORT_DIR = "report"
"""Default output folder inside a work directory (``WORK/report``)."""
METRICS = ("avg@n", "mean_score", "exact", "boxed_rate")
"""Per-task metrics that may be the table's score; ``pass@K`` is accepted too."""
TAIL = 10
"""Final training statistics are the mean over the last ``TAIL`` logged steps."""

# config keys that do not change what a run learns: ignored when grouping seeds
_BOOKKEEPING = {
    "train.seed", "train.output_dir", "train.resume", "train.tensorboard", "train.log_interval",
    "train.save_interval", "train.keep_last", "train.histogram_interval",
}
_FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                  "BOOT_FAIL", "DEADLINE", "PREEMPTED", "UNKNOWN_FAILED"}
_RUNNING_STATES = {"RUNNING", "COMPLETING", "STARTING"}
_QUEUED_STATES = {"PENDING", "SUBMITTED", "QUEUED", "CONFIGURING", "REQUEUED", "UNSUBMITTED"}
STATUSES = ("complete", "trained", "running", "queued", "failed", "not started")
"""Run states: ``complete`` (evaluated), ``trained`` (training finished, no evaluation yet),
``running`` (training started, no ``summary.json`` yet), ``queued`` (a job waits), ``failed``
(a recorded step failed), ``not started`` (only the experiment records know the run)."""


# -- statistics -----------------------------------------------------------------------------

def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed forms in theta = atan(t/sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, s * c  # sin*cos * (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + total)
    total, term = 0.0, s  # sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value: ``P(|T| <= t) = confidence`` for ``df`` >= 1."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError(f"need df >= 1 and 0 < confidence < 1, got {df}, {confidence}")
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < confidence else (lo, mid)
    return 0.5 * (lo + hi)


def summarize_values(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of ``values`` with a Student-t interval: ``mean``, ``n``, ``std`` (sample),
    ``half_width``, ``low``, ``high``, ``values``. One value has no interval (n=1)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize")
    n = len(vals)
    mean = sum(vals) / n
    out: dict[str, Any] = {"mean": mean, "n": n, "values": vals}
    if n > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, half_width=half, low=mean - half, high=mean + half,
                   confidence=confidence)
    else:
        out.update(std=None, half_width=None, low=None, high=None, confidence=confidence)
    return out


# -- reading files --------------------------------------------------------------------------

def _read_json(path: Path, problems: list[str]) -> Any:
    """JSON of ``path`` or None (a missing file is silent; an unreadable one is noted)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({type(exc).__name__})")
        return None


def _read_jsonl(path: Path, problems: list[str]) -> list[dict]:
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


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_probe_report(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == PROBE_FORMAT


def _is_eval_summary(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and all(
        isinstance(s, dict) and "task" in s and isinstance(s.get("metrics"), dict) for s in data)


def _is_run_dir(path: Path) -> bool:
    if any((path / f).is_file() for f in ("config.json", "metrics.jsonl")):
        return True
    if (path / "checkpoints").is_dir() or (path / "eval" / "summary.json").is_file():
        return True
    summary = path / "summary.json"
    if summary.is_file():
        data = _read_json(summary, [])
        return isinstance(data, dict) and "output_dir" in data
    return False


def _is_eval_dir(path: Path) -> bool:
    if _is_eval_summary(_read_json(path / "summary.json", [])):
        return True
    return any(_is_task_summary(_read_json(p, [])) for p in path.glob("*/summary.json"))


def _is_task_summary(data: Any) -> bool:
    return isinstance(data, dict) and "task" in data and isinstance(data.get("metrics"), dict)


# -- one run --------------------------------------------------------------------------------

def objective_info(trained: Any, label: str | None = None) -> dict[str, Any] | None:
    """What the report needs of an objective: canonical ``name`` (what was trained),
    ``label`` (how the run is called: ``OnlyTopP-K20`` for a run trained with the absolute
    20th-percentile threshold), ``family``, ``a``, ``threshold`` and ``percentile``.

    ``label`` (e.g. the tail of a run folder name) is used only when it names the same
    objective, or the percentile form of the trained absolute threshold."""
    try:
        obj = parse_objective(trained)
    except ObjectiveError:
        return None
    info: dict[str, Any] = {"name": obj.name, "label": obj.name, "family": obj.family,
                            "a": obj.a, "threshold": None, "percentile": None,
                            "prefix": obj.name.rsplit("-", 1)[0] if obj.thresholded else None}
    if obj.family == "p":
        info["a"] = 1.0
    elif obj.family == "nll":
        info["a"] = 0.0
    if obj.threshold is not None:
        info["threshold"] = {"value": obj.threshold.value, "side": obj.threshold.side,
                             "per_batch_percentile": obj.threshold.percentile}
        if obj.threshold.percentile:
            info["percentile"] = obj.threshold.value
    if label:
        try:
            named = parse_objective(label)
        except ObjectiveError:
            named = None
        if named is not None and named.name != obj.name and named.needs_percentile and \
                obj.thresholded and not obj.needs_percentile and \
                named.name.rsplit("-", 1)[0] == info["prefix"]:
            info["label"] = named.name
            info["percentile"] = named.threshold.value
    return info


def _label_from_name(name: str) -> str | None:
    """The objective spelled at the end of a run folder name (``math-qwen2.5-7b-OnlyTopP-K20``)."""
    parts = name.split("-")
    for i in range(len(parts) - 1, -1, -1):
        try:
            return parse_objective("-".join(parts[i:])).name
        except ObjectiveError:
            continue
    return None


_PRESETS: dict[str, dict] | None = None


def _presets() -> dict[str, dict]:
    global _PRESETS
    if _PRESETS is None:  # the preset files themselves (config.py would import megatron)
        from probsft_megatron import resources

        _PRESETS = {}
        for name in resources.names("models"):
            path = resources.find("models", name)
            data = _read_yaml(path) if path is not None else None
            if isinstance(data, dict):
                data.pop("hf_id", None)
                _PRESETS[name] = data
    return _PRESETS


def model_name(config: dict) -> str | None:
    """The model preset whose fields the run's model config matches, else the folder name of
    ``init.checkpoint``, else a size description."""
    model = config.get("model") or {}
    if not isinstance(model, dict) or not model:
        return None
    for name, preset in _presets().items():
        if preset and all(model.get(k) == v or (isinstance(v, (int, float)) and isinstance(
                model.get(k), (int, float)) and math.isclose(model.get(k), v, rel_tol=1e-6))
                for k, v in preset.items()):
            return name
    ckpt = (config.get("init") or {}).get("checkpoint")
    if ckpt:
        return Path(str(ckpt)).name
    return f"{model.get('arch', '?')} {model.get('num_layers', '?')}x{model.get('hidden_size', '?')}"


def dataset_name(config: dict) -> str | None:
    """``figfont``, ``math`` (numina format), ``medical`` (m23k) or the training files' names."""
    data = config.get("data") or {}
    if data.get("source") == "figfont":
        return "figfont"
    fmt = {"numina": "math", "m23k": "medical"}.get(data.get("format"))
    if fmt:
        return fmt
    files = data.get("train_files") or []
    return ",".join(Path(str(f)).name for f in files) or None


def _identity(config: dict) -> str:
    """The config without seed and bookkeeping keys: runs with equal identities are seeds."""
    flat = _flatten(config)
    for key in _BOOKKEEPING:
        flat.pop(key, None)
    for key, value in flat.items():  # a float that went through float32 (1e-5 as 9.99999e-06)
        if isinstance(value, float) and math.isfinite(value):
            flat[key] = float(f"{value:.6g}")
    ckpt = flat.get("init.checkpoint")
    if ckpt:  # the same backbone converted into two work directories
        flat["init.checkpoint"] = Path(str(ckpt)).name
    return json.dumps(flat, sort_keys=True, default=str)


def _tail_stats(history: list[dict]) -> dict[str, float]:
    tail = history[-TAIL:]
    out = {}
    for key in ("loss", "mean_p", "frac_kept", "mean_w", "grad_norm", "tokens_per_s",
                "threshold"):
        vals = [r[key] for r in tail if isinstance(r.get(key), (int, float))
                and math.isfinite(r[key])]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def read_eval(eval_dir: Path, problems: list[str], boxed: bool = True) -> dict[str, dict]:
    """Task -> ``{grader, sampling, metrics}`` of an eval folder. The aggregate
    ``summary.json`` is preferred; per-task ``<task>/summary.json`` files fill in tasks it
    lacks (an evaluation that stopped between tasks). For the math grader the share of
    samples with a boxed answer (``boxed_rate``) is counted from ``samples.jsonl`` when the
    summary does not carry it."""
    tasks: dict[str, dict] = {}
    aggregate = _read_json(eval_dir / "summary.json", problems)
    summaries = list(aggregate) if _is_eval_summary(aggregate) else []
    for path in sorted(eval_dir.glob("*/summary.json")):
        data = _read_json(path, problems)
        if _is_task_summary(data) and data["task"] not in {s["task"] for s in summaries}:
            summaries.append(data)
    for s in summaries:
        metrics = dict(s["metrics"])
        task = str(s["task"])
        if boxed and "boxed_rate" not in metrics and s.get("grader") == "math":
            rate = _boxed_rate(eval_dir / task / "samples.jsonl", problems)
            if rate is not None:
                metrics["boxed_rate"] = rate
        tasks[task] = {"grader": s.get("grader"), "sampling": s.get("sampling"),
                       "metrics": metrics, "model": s.get("model")}
    return tasks


def _boxed_rate(samples: Path, problems: list[str]) -> float | None:
    """Fraction of samples whose extracted answer is not null (math: a ``\\boxed{}`` found)."""
    if not samples.is_file():
        return None
    found = total = 0
    with open(samples, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            extracted = record.get("extracted") if isinstance(record, dict) else None
            if isinstance(extracted, list):
                total += len(extracted)
                found += sum(e is not None for e in extracted)
    return found / total if total else None


def _step_error(log_files: list[Path]) -> str | None:
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
    carry no state here: pass their states to :func:`build_report` (``step_states``)."""
    out: dict[str, dict[str, StepRecord]] = {}
    root = Path(work_dir) / "experiments"
    if not root.is_dir():
        return out
    exp_dirs = [d for d in root.glob("*/*") if d.is_dir()]
    exp_dirs.sort(key=lambda d: (_exp_time(d), str(d)))
    for exp in exp_dirs:  # older first: newer launches of the same run win
        for cfg_file in sorted(exp.glob("*/configs/*_config.yaml")):
            step_dir = cfg_file.parent.parent
            data = _read_yaml(cfg_file)
            if not isinstance(data, dict):
                continue
            record = _step_record(step_dir.name, data)
            if record is None or record.run_dir is None:
                continue
            record.experiment = str(exp)
            ends = sorted(step_dir.glob("nemo_run/*/SUCCESS"), key=lambda p: p.stat().st_mtime)
            if ends:
                info = _read_json(ends[-1], [])
                if isinstance(info, dict):
                    record.state = str(info.get("final_state") or "") or None
                    if record.state in _FAILED_STATES:
                        logs = [Path(r["stderr"]) for reps in (info.get("roles") or {}).values()
                                for r in reps if isinstance(r, dict) and r.get("stderr")]
                        logs += sorted(ends[-1].parent.rglob("stderr.log"))
                        record.error = _step_error(logs)
                        record.log = str(logs[0]) if logs else None
            out.setdefault(str(Path(record.run_dir)), {})[record.kind] = record
        _add_launch_record(exp, out)
    return out


def _add_launch_record(exp: Path, out: dict[str, dict[str, StepRecord]]) -> None:
    """What ``probsft launch --executor slurm`` records in ``probsft_experiment.json``: each
    step's log (``log_dir/log-<job_name>_<job_id>_<restart>.out``, else the batch script's
    ``sbatch_<job_name>_<job_id>.out``) and, when the submission itself failed, its error."""
    launch = _read_json(exp / LAUNCH_RECORD, [])
    if not isinstance(launch, dict) or not isinstance(launch.get("steps"), list):
        return
    run_dirs = {str(name): str(Path(str(summary)).parent.parent)  # RUN/eval/summary.json
                for name, summary in (launch.get("runs") or {}).items()}
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
    starts = sorted(Path(folder).glob(f"log-{job_name}_{job}_*.out"),
                    key=lambda p: (int(p.stem.rsplit("_", 1)[-1])
                                   if p.stem.rsplit("_", 1)[-1].isdigit() else -1, p.name))
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


def _step_record(name: str, data: dict) -> StepRecord | None:
    args = [str(a) for a in data.get("args") or []]
    path = str(data.get("path") or "")

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    def override(key: str) -> str | None:
        found = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
        return found[-1] if found else None

    if path.endswith(".train"):
        env = data.get("env") if isinstance(data.get("env"), dict) else {}
        return StepRecord(name, "train", override("train.output_dir"), recipe=value("--config"),
                          objective=override("loss.objective"),
                          overrides=[a for a in args if "=" in a and not a.startswith("-")],
                          env={str(k): str(v) for k, v in env.items()})
    if args[:1] == ["export"]:
        return StepRecord(name, "export", value("--train-dir"))
    if args[:1] == ["eval"]:
        out = value("--out")
        return StepRecord(name, "eval", str(Path(out).parent) if out else None)
    return None


def _planned_config(record: StepRecord, problems: list[str]) -> dict | None:
    """The config a launched run that wrote none yet will have: its recipe and overrides
    through the public loader (``config.load_config``), as the launcher validated them."""
    import warnings

    from probsft_megatron import resources

    # the step's own config search path (`probsft launch --env PROBSFT_CONFIG_PATH=...`)
    saved = os.environ.get(resources.ENV_VAR)
    if resources.ENV_VAR in record.env:
        os.environ[resources.ENV_VAR] = record.env[resources.ENV_VAR]
    try:
        with warnings.catch_warnings():  # megatron's import-time notes about optional packages
            warnings.simplefilter("ignore")
            from probsft_megatron.config import load_config

        config = load_config(record.recipe, record.overrides).to_dict()
    except Exception as exc:  # a recipe changed or removed since the launch
        problems.append(f"{record.run_dir}: cannot rebuild the config of step {record.name} "
                        f"({type(exc).__name__}: {str(exc)[:160]})")
        return None
    finally:
        if saved is None:
            os.environ.pop(resources.ENV_VAR, None)
        else:
            os.environ[resources.ENV_VAR] = saved
    # training takes the model from the checkpoint it starts from, when there is one
    ckpt = (config.get("init") or {}).get("checkpoint")
    stored = _read_json(Path(ckpt) / "model_config.json", problems) if ckpt else None
    if isinstance(stored, dict) and isinstance(stored.get("model"), dict):
        config["model"] = stored["model"]
    return config


def _state_class(state: str | None) -> str | None:
    if not state:
        return None
    s = state.upper()
    if s in _FAILED_STATES:
        return "failed"
    if s in _RUNNING_STATES:
        return "running"
    if s in _QUEUED_STATES:
        return "queued"
    if s in ("SUCCEEDED", "COMPLETED", "SUCCESS"):
        return "succeeded"
    return None


def read_run(path: str | os.PathLike, records: dict[str, StepRecord] | None = None,
             step_states: dict[str, str] | None = None,
             step_logs: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the report knows about one run folder (see :data:`STATUSES`).

    ``records``: the run's launched steps by kind (from :func:`read_experiment_records`);
    ``step_states``: job states by step name (``train-<run>``, ``export-<run>``,
    ``eval-<run>``), e.g. from SLURM accounting; they take precedence over ``records``;
    ``step_logs``: log files by step name, searched for the error of a failed step."""
    root = Path(path)
    problems: list[str] = []
    records = dict(records or {})
    name = root.name
    config = _read_json(root / "config.json", problems)
    summary = _read_json(root / "summary.json", problems)
    if not isinstance(summary, dict) or "output_dir" not in summary:
        summary = None
    config_source = "config.json" if isinstance(config, dict) else None
    if config_source is None:
        config = None
        # a run that has checkpoints keeps its config in each checkpoint's train_state.json
        for state_file in sorted(root.glob("checkpoints/*/train_state.json"), reverse=True):
            state = _read_json(state_file, problems)
            if isinstance(state, dict) and isinstance(state.get("config"), dict):
                config, config_source = state["config"], str(state_file.relative_to(root))
                break
    if config is None and "train" in records and records["train"].recipe:
        config = _planned_config(records["train"], problems)
        config_source = "experiment record" if config is not None else None
    history = _read_jsonl(root / "metrics.jsonl", problems)
    if not history and summary and isinstance(summary.get("history"), list):
        history = [r for r in summary["history"] if isinstance(r, dict)]
    history = [r for r in history if isinstance(r.get("step"), int)]
    history.sort(key=lambda r: r["step"])

    trained_objective = (summary or {}).get("objective") or \
        ((config or {}).get("loss") or {}).get("objective")
    if trained_objective is None and "train" in records:
        trained_objective = records["train"].objective
    objective = objective_info(trained_objective, _label_from_name(name)) \
        if trained_objective is not None else None
    if trained_objective is not None and objective is None:
        problems.append(f"{root}: objective {trained_objective!r} is not one probsft knows")

    total_steps = (summary or {}).get("total_steps")
    if total_steps is None:
        for state_file in sorted(root.glob("checkpoints/*/train_state.json"), reverse=True):
            state = _read_json(state_file, problems)
            if isinstance(state, dict) and isinstance(state.get("total_steps"), int):
                total_steps = state["total_steps"]
                break
    max_steps = ((config or {}).get("train") or {}).get("max_steps")
    planned = total_steps
    if isinstance(max_steps, int) and max_steps > 0:
        planned = min(max_steps, total_steps) if total_steps else max_steps
    training = None
    if history or summary:
        training = {
            "steps": history[-1]["step"] if history else (summary or {}).get("steps"),
            "planned_steps": planned, "total_steps": total_steps,
            "finished": summary is not None,
            "final": _tail_stats(history), "final_over_steps": min(TAIL, len(history)),
            "last": {k: v for k, v in (history[-1] if history else {}).items()
                     if k != "p_hist"},
        }
    curves = {"step": [r["step"] for r in history],
              "loss": [r.get("loss") for r in history],
              "mean_p": [r.get("mean_p") for r in history]}
    evals = read_eval(root / "eval", problems) if (root / "eval").is_dir() else {}

    probe = None
    probe_report = _read_json(root / "probe" / "report.json", problems)
    evidence = (summary or {}).get("objective_evidence")
    if isinstance(evidence, dict):
        probe = {"source": evidence.get("source"), "placement": evidence.get("placement"),
                 "recommendation": evidence.get("recommendation"),
                 "statistics": evidence.get("statistics")}
    if _is_probe_report(probe_report):
        probe = probe or {}
        probe.update(report=str(root / "probe" / "report.json"),
                     placement=probe_report.get("placement"),
                     recommendation=probe_report.get("recommendation"))

    # -- status -------------------------------------------------------------------------
    states = {kind: rec.state for kind, rec in records.items()}
    for kind in ("train", "export", "eval"):
        if step_states and f"{kind}-{name}" in step_states:
            states[kind] = step_states[f"{kind}-{name}"]
            rec = records.setdefault(kind, StepRecord(f"{kind}-{name}", kind, str(root)))
            log = (step_logs or {}).get(f"{kind}-{name}") or rec.log
            rec.state = states[kind]
            if log and _state_class(rec.state) == "failed":
                rec.log, rec.error = str(log), _step_error([Path(log)])
    classes = {kind: _state_class(s) for kind, s in states.items()}
    exists = root.is_dir() and any(root.iterdir())
    status, detail = None, ""
    failed = [k for k in ("train", "export", "eval") if classes.get(k) == "failed"]
    all_tasks_done = (root / "eval" / "summary.json").is_file()  # written after the last task
    if evals and all_tasks_done:
        status = "complete"
    elif failed:
        kind = failed[0]
        rec = records.get(kind)
        status = "failed"
        detail = f"{kind} step {states[kind].lower()}"
        if kind == "train" and training:
            detail += f" at step {training['steps']}"
        if rec is not None and rec.error:
            detail += f": {rec.error}"
        if evals:
            detail += f" (tasks done: {', '.join(sorted(evals))})"
    elif evals:
        status, detail = "running", f"evaluation under way: {', '.join(sorted(evals))} done"
    elif summary is not None:
        status = "trained"
        later = [k for k in ("eval", "export") if classes.get(k) in ("running", "queued")]
        if later:
            detail = f"{later[0]} step {classes[later[0]]}"
        elif (root / "hf" / "probsft_export.json").is_file():
            detail = "exported, not evaluated"
        else:
            detail = "not evaluated"
    elif training or config_source not in (None, "experiment record"):
        status = "running"
        if classes.get("train") == "succeeded":
            status, detail = "failed", "train step ended without writing summary.json"
        else:
            steps = training["steps"] if training else 0
            of = f" of {planned}" if planned else ""
            detail = (f"step {steps}{of}; no summary.json yet (still training, or stopped "
                      "without a record of it)")
    elif classes.get("train") == "queued":
        status, detail = "queued", "train step queued"
    elif classes.get("train") == "running":
        status, detail = "running", "train step started, nothing written yet"
    else:
        status = "not started"
        detail = "named by the experiment records, no output yet" if records or not exists \
            else "folder holds no run files"

    recipe = records["train"].recipe if "train" in records else None
    return {
        "name": name, "path": str(root), "kind": "train",
        "status": status, "status_detail": detail,
        "objective": objective,
        "seed": ((config or {}).get("train") or {}).get("seed"),
        "model": model_name(config) if config else None,
        "dataset": dataset_name(config) if config else None,
        "recipe": recipe,
        "identity": _identity(config) if config else None,
        "config": config, "config_source": config_source,
        "training": training, "curves": curves, "eval": evals, "probe": probe,
        "steps": {kind: {"state": states.get(kind), "error": rec.error, "log": rec.log,
                         "experiment": rec.experiment} for kind, rec in records.items()},
        "problems": problems,
    }


def read_eval_only(path: str | os.PathLike) -> dict[str, Any]:
    """A bare ``probsft eval --out`` folder (e.g. the base model) as a run without training."""
    root = Path(path)
    problems: list[str] = []
    evals = read_eval(root, problems)
    models = {t["model"] for t in evals.values() if t.get("model")}
    return {
        "name": root.name, "path": str(root), "kind": "eval",
        "status": "complete" if evals else "running",
        "status_detail": "evaluation only" + (f" of {', '.join(sorted(models))}" if models else ""),
        "objective": None, "seed": None, "model": None, "dataset": None, "recipe": None,
        "identity": None, "config": None, "training": None,
        "curves": {"step": [], "loss": [], "mean_p": []}, "eval": evals, "probe": None,
        "steps": {}, "problems": problems,
    }


# -- collecting -----------------------------------------------------------------------------

@dataclass
class Collection:
    """The runs, probe reports and notes found under the input paths."""

    runs: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    work_dirs: list[str] = field(default_factory=list)


def _probe_entry(path: Path, data: dict) -> dict[str, Any]:
    model = data.get("model") or {}
    dcfg = (data.get("data") or {}).get("config") or {}
    source = "figfont" if dcfg.get("source") == "figfont" else \
        ",".join(Path(str(f)).name for f in dcfg.get("train_files") or []) or None
    return {"path": str(path), "key": data.get("key"),
            "model": re.sub(r"-[0-9a-f]{12}$", "", Path(str(model.get("path", ""))).name) or None,
            "data": source,
            "tokens": data.get("tokens"), "mean_p": data.get("mean_p"),
            "median_p": data.get("median_p"), "percentiles": data.get("percentiles") or {},
            "histogram": data.get("histogram"), "placement": data.get("placement"),
            "recommendation": data.get("recommendation")}


def _add_probe(col: Collection, path: Path) -> bool:
    data = _read_json(path, col.notes)
    if not _is_probe_report(data):
        return False
    key = data.get("key") or str(path.resolve())
    if all((p.get("key") or p["path"]) != key for p in col.probes):
        col.probes.append(_probe_entry(path, data))
    return True


def collect(paths: Iterable[str | os.PathLike], *, probes: Iterable[str | os.PathLike] = (),
            step_states: dict[str, str] | None = None,
            step_logs: dict[str, str] | None = None) -> Collection:
    """Find and read every run of ``paths`` (see the module docstring for what a path may be).

    Raises :class:`ConfigError` for a path that does not exist or holds nothing a report
    can use."""
    col = Collection()
    seen: set[str] = set()

    def add_run(run: dict) -> None:
        key = str(Path(run["path"]).resolve())
        if key not in seen:
            seen.add(key)
            col.runs.append(run)

    def add_work(work: Path) -> None:
        col.work_dirs.append(str(work))
        records = read_experiment_records(work)
        by_dir = {str(Path(k).resolve()): v for k, v in records.items()}
        runs_dir = work / "runs"
        for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()) \
                if runs_dir.is_dir() else []:
            add_run(read_run(run_dir, by_dir.get(str(run_dir.resolve())), step_states, step_logs))
        for run_dir, recs in sorted(records.items()):
            if str(Path(run_dir).resolve()) not in seen:  # planned, not started
                add_run(read_run(Path(run_dir), recs, step_states, step_logs))
        for depth in ("report.json", "*/report.json", "*/*/report.json"):
            for path in sorted(work.glob(depth)):
                if path.parts[len(work.parts)] not in ("runs", "experiments", "models"):
                    _add_probe(col, path)

    for raw in paths:
        path = Path(raw).absolute()
        if not path.exists():
            raise ConfigError(f"{path} does not exist; give an experiment work directory, a "
                              "run folder, an eval folder or a probe report")
        if path.is_file():
            if path.name == "summary.json":
                path = path.parent
            elif _add_probe(col, path):
                continue
            else:
                raise ConfigError(f"{path} is a file that is not a probe report; give the folder "
                                  "of a run, an experiment or an evaluation instead")
        if (path / "runs").is_dir() or (path / "experiments").is_dir():
            add_work(path)
        elif _is_run_dir(path):
            add_run(read_run(path, None, step_states, step_logs))
            if (path / "probe" / "report.json").is_file():
                _add_probe(col, path / "probe" / "report.json")
        elif _is_eval_dir(path):
            add_run(read_eval_only(path))
        elif _add_probe(col, path / "report.json"):
            continue
        else:
            found = False
            for child in sorted(p for p in path.iterdir() if p.is_dir()):
                if (child / "runs").is_dir():
                    add_work(child)
                elif _is_run_dir(child):
                    add_run(read_run(child, None, step_states, step_logs))
                elif _is_eval_dir(child):
                    add_run(read_eval_only(child))
                elif not _add_probe(col, child / "report.json"):
                    continue
                found = True
            if not found:
                raise ConfigError(
                    f"{path} holds no run: expected a work directory of probsft launch "
                    "(runs/, experiments/), a training run folder (config.json, "
                    "metrics.jsonl, summary.json), an eval folder (summary.json) or a probe "
                    "report, or a folder of those")
    for run in col.runs:  # probes written by `loss.objective: auto`
        if run.get("probe") and run["probe"].get("report"):
            _add_probe(col, Path(run["probe"]["report"]))
    for p in probes:
        path = Path(p)
        target = path / "report.json" if path.is_dir() else path
        if not _add_probe(col, target):
            raise ConfigError(f"--probe {p}: not a probe report (the report.json written by "
                              "`probsft probe`, or its folder)")
    if not col.runs and not col.probes:
        raise ConfigError(f"no runs found under {', '.join(str(p) for p in paths)}")
    return col


# -- groups and tables ----------------------------------------------------------------------

def _objective_order(info: dict | None) -> tuple:
    if info is None:
        return (-1, "", 0.0)
    fam = info["family"]
    if fam == "nll":
        return (0, "", 0.0)
    if fam == "p":
        return (1, "", 0.0)
    if fam == "general":
        return (2, "", info["a"])
    x = info["percentile"] if info["percentile"] is not None else info["threshold"]["value"]
    return (3, info["prefix"] or "", float(x))


def group_runs(runs: list[dict]) -> list[dict]:
    """Groups of runs that differ only by seed (equal config identities), in table order.

    Each group: ``id``, ``label`` (objective label, plus the distinguishing setting),
    ``objective``, ``setting`` (the config differences to other groups, objective aside),
    ``runs`` (names), ``seeds``."""
    groups: dict[str, dict] = {}
    for run in runs:
        key = run["identity"] or f"run:{run['path']}"
        g = groups.setdefault(key, {"identity": run["identity"], "members": []})
        g["members"].append(run)
    # which config keys vary between groups (the objective is shown on its own)
    flats = {k: _flatten(json.loads(g["identity"])) if g["identity"] else None
             for k, g in groups.items()}
    keys = sorted({k for f in flats.values() if f for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str)
                                       for f in flats.values() if f}) > 1]
    varying = [k for k in varying if k != "loss.objective"]
    out = []
    for key, g in groups.items():
        first = g["members"][0]
        flat = flats[key]
        setting_parts: list[str] = []
        if flat:
            for prefix, field_name in (("model.", "model"), ("data.", "dataset")):
                keys_here = [k for k in varying if k.startswith(prefix) and k != "data.seed"]
                if not keys_here:
                    continue
                names = {gg["members"][0][field_name] for gg in groups.values()
                         if gg["identity"]}
                if len(names) > 1:  # the preset / dataset name tells the settings apart
                    setting_parts.append(first[field_name] or "?")
                else:
                    setting_parts += [f"{k}={_short(flat.get(k))}" for k in keys_here]
            for k in varying:
                if not k.startswith(("model.", "data.")) or k == "data.seed":
                    setting_parts.append(f"{k}={_short(flat.get(k))}")
        setting = ", ".join(setting_parts)
        obj = first["objective"]
        label = obj["label"] if obj else first["name"]
        members = sorted(g["members"], key=lambda r: (r["seed"] is None, r["seed"] or 0,
                                                      r["name"]))
        out.append({"id": "", "label": label, "objective": obj, "setting": setting,
                    "model": first["model"], "dataset": first["dataset"],
                    "kind": first["kind"], "runs": [r["name"] for r in members],
                    "seeds": [r["seed"] for r in members], "_members": members})
    out.sort(key=lambda g: (g["setting"], g["kind"] != "eval", _objective_order(g["objective"]),
                            g["label"]))
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
    elif isinstance(value, list) and value and all(isinstance(v, str) and "/" in v
                                                   for v in value):
        value = [Path(v).name for v in value]
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _metric_value(task: dict, metric: str) -> float | None:
    m = task["metrics"]
    if metric.startswith("pass@"):
        v = (m.get("pass@k") or {}).get(metric[5:])
    else:
        v = m.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _aggregate_group(g: dict, metric: str, tasks: list[str]) -> None:
    """Per-task statistics over the group's seeds, the average column, and training stats."""
    members = g["_members"]
    cells: dict[str, dict] = {}
    details: dict[str, dict] = {}
    for task in tasks:
        have = [r for r in members if task in r["eval"]]
        if not have:
            continue
        vals = [v for v in (_metric_value(r["eval"][task], metric) for r in have) if v is not None]
        if vals:
            cells[task] = summarize_values(vals)
        d: dict[str, Any] = {}
        names = ("avg@n", "mean_score", "exact", "boxed_rate")
        ks = sorted({k for r in have for k in (r["eval"][task]["metrics"].get("pass@k") or {})},
                    key=lambda k: int(k) if str(k).isdigit() else 0)
        for name in [*names, *[f"pass@{k}" for k in ks]]:
            vs = [v for v in (_metric_value(r["eval"][task], name) for r in have) if v is not None]
            if vs:
                d[name] = summarize_values(vs)
        samples = {(r["eval"][task]["metrics"].get("problems"), r["eval"][task]["metrics"].get("n"))
                   for r in have}
        d["problems"] = sorted({s[0] for s in samples if s[0] is not None})
        d["samples_per_problem"] = sorted({s[1] for s in samples if s[1] is not None})
        sampling = {json.dumps(r["eval"][task].get("sampling"), sort_keys=True) for r in have}
        d["same_sampling"] = len(sampling) == 1 and len(samples) == 1
        details[task] = d
    # average over the block's tasks, per run, then over seeds
    per_run = []
    for r in members:
        vals = [_metric_value(r["eval"][t], metric) if t in r["eval"] else None for t in tasks]
        if tasks and all(v is not None for v in vals):
            per_run.append(sum(vals) / len(vals))
    g["cells"] = cells
    g["details"] = details
    g["average"] = summarize_values(per_run) if per_run and len(tasks) > 1 else None
    g["evaluated"] = sum(1 for r in members if r["eval"])
    train_stats: dict[str, Any] = {}
    for key in ("loss", "mean_p", "frac_kept", "mean_w", "tokens_per_s"):
        vs = [r["training"]["final"][key] for r in members
              if r["training"] and key in r["training"]["final"]]
        if vs:
            train_stats[key] = summarize_values(vs)
    steps = [r["training"]["steps"] for r in members if r["training"]]
    planned = [r["training"]["planned_steps"] for r in members if r["training"]]
    train_stats["steps"] = steps
    train_stats["planned_steps"] = planned
    g["training"] = train_stats
    g["statuses"] = {s: sum(r["status"] == s for r in members) for s in STATUSES
                     if any(r["status"] == s for r in members)}


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
        for col in [*tasks, "average"]:
            vals = [(g["cells"].get(col) if col != "average" else g["average"], g["id"])
                    for g in members]
            vals = [(s["mean"], gid) for s, gid in vals if s]
            if len(vals) > 1:
                top = max(v for v, _ in vals)
                best[col] = [gid for v, gid in vals if math.isclose(v, top, rel_tol=1e-12,
                                                                   abs_tol=1e-15)]
        out.append({"setting": setting, "tasks": tasks, "groups": [g["id"] for g in members],
                    "best": best})
    return out


# -- figures --------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                          bbox_inches="tight"))
    finally:
        plt.close(fig)


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def plot_curves(groups: list[dict], path: Path) -> Path | None:
    """Loss and mean p against step for every run; a group's seeds share a colour."""
    trained = [g for g in groups if any(r["curves"]["step"] for r in g["_members"])]
    if not trained:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    few = max(len(r["curves"]["step"]) for g in trained for r in g["_members"]) < 8
    for color, g in zip(_colors(len(trained)), trained):
        label = g["label"] + (f" ({g['setting']})" if g["setting"] else "")
        for i, r in enumerate(g["_members"]):
            c = r["curves"]
            for ax, key in zip(axes, ("loss", "mean_p")):
                pts = [(s, v) for s, v in zip(c["step"], c[key]) if isinstance(v, (int, float))]
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.85, linewidth=1.2,
                            marker="o" if few else None, markersize=3,
                            label=label if i == 0 else None)
    axes[0].set(xlabel="step", ylabel="training loss (each run's own objective)",
                title="loss")
    axes[1].set(xlabel="step", ylabel="mean p of response tokens", title="mean p",
                ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="group (seeds share a colour)", ncol=1 + len(labels) // 25)
    fig.tight_layout()
    return _save(fig, path)


def _panel_columns(block: dict) -> list[str]:
    cols = list(block["tasks"])
    if len(cols) > 1:
        cols.append("average")
    return cols


def _stat(g: dict, col: str) -> dict | None:
    return g["average"] if col == "average" else g["cells"].get(col)


def _errorbar(ax, xs, stats, **kw):
    ys = [100 * s["mean"] for s in stats]
    err = [100 * (s["half_width"] or 0.0) for s in stats]
    ax.errorbar(xs, ys, yerr=err if any(err) else None, capsize=3, **kw)


def plot_sweep(groups: list[dict], blocks: list[dict], axis: str, metric: str,
               path: Path) -> Path | None:
    """Score against ``a`` (``axis="a"``, GeneralFamily runs; ``p`` is a = 1 and NLL the
    dashed line at a = 0) or against the threshold (``axis="threshold"``: the percentile
    when the runs are named by one, else the absolute threshold), one panel per task."""
    by_id = {g["id"]: g for g in groups}
    series: list[tuple[dict, str, list[tuple[float, dict, dict]]]] = []
    refs: list[tuple[dict, str, str, dict]] = []  # (block, column, label, group)
    for block in blocks:
        members = [by_id[i] for i in block["groups"]]
        cols = _panel_columns(block)
        if axis == "a":
            pts = [(g["objective"]["a"], g) for g in members if g["objective"]
                   and g["objective"]["family"] == "general"]
            if len(pts) < 2:
                continue
            for col in cols:
                line = [(x, g, _stat(g, col)) for x, g in sorted(pts, key=lambda t: t[0])
                        if _stat(g, col)]
                if line:
                    series.append((block, col, line))
                for g in members:
                    if g["objective"] and g["objective"]["family"] in ("nll", "p") and _stat(g, col):
                        refs.append((block, col, g["label"], g))
        else:
            fams: dict[tuple, list] = {}
            for g in members:
                o = g["objective"]
                if not o or o["threshold"] is None:
                    continue
                pct = o["percentile"] is not None
                x = o["percentile"] if pct else o["threshold"]["value"]
                fams.setdefault((o["prefix"], pct), []).append((x, g))
            fams = {k: v for k, v in fams.items() if len(v) >= 2}
            if not fams:
                continue
            for col in cols:
                for (prefix, pct), pts in sorted(fams.items()):
                    line = [(x, g, _stat(g, col)) for x, g in sorted(pts, key=lambda t: t[0])
                            if _stat(g, col)]
                    if line:
                        series.append((block, col, line))
                for g in members:
                    if g["objective"] and g["objective"]["family"] in ("nll", "p") and _stat(g, col):
                        refs.append((block, col, g["label"], g))
    if not series:
        return None
    cols = list(dict.fromkeys(col for _, col, _ in series))
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(4.6 * len(cols), 3.8), squeeze=False)
    axes = axes[0]
    settings = list(dict.fromkeys(b["setting"] for b, _, _ in series))
    colors = dict(zip(settings, _colors(max(len(settings), 1))))
    markers = ["o", "s", "^", "v", "D", "P"]
    for ax, col in zip(axes, cols):
        fam_idx: dict[str, int] = {}
        for block, c, line in series:
            if c != col:
                continue
            xs = [x for x, _, _ in line]
            stats = [s for _, _, s in line]
            name = line[0][1]["objective"]["prefix"] if axis != "a" else "GeneralFamily-a"
            fam = fam_idx.setdefault(name, len(fam_idx))
            label = ", ".join(t for t in (name if axis != "a" else "", block["setting"]) if t) \
                or "GeneralFamily-a"
            _errorbar(ax, xs, stats, color=colors[block["setting"]], marker=markers[fam % 6],
                      label=label)
        for block, c, label, g in refs:
            if c != col:
                continue
            s = _stat(g, col)
            color = colors.get(block["setting"], "k")
            where = f", {block['setting']}" if block["setting"] else ""
            seeds = f", n={s['n']}" if s["n"] > 1 else ""
            if axis == "a" and g["objective"]["family"] == "p":
                _errorbar(ax, [1.0], [s], marker="*", markersize=12, color=color,
                          linestyle="none", label=f"p (a = 1{seeds}){where}")
            else:
                nll = g["objective"]["family"] == "nll"
                what = ("NLL, a = 0" if axis == "a" else "NLL") if nll else "no threshold"
                ax.axhline(100 * s["mean"], color=color, linestyle="--" if nll else ":",
                           linewidth=1, label=f"{label} ({what}{seeds}){where}")
                if s.get("half_width"):  # the seed interval as a band
                    ax.axhspan(100 * s["low"], 100 * s["high"], color=color, alpha=0.08,
                               linewidth=0)
        if axis == "a":
            xs_all = [x for b, c, line in series if c == col for x, _, _ in line]
            if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
                ax.set_xscale("log")
            ax.set_xlabel("convexity a of (1 - p^a) / a")
        else:
            pct = any(line[0][1]["objective"]["percentile"] is not None
                      for _, c, line in series if c == col)
            ax.set_xlabel("threshold: percentile of the base model's token p" if pct
                          else "threshold q (absolute p)")
        ax.set_ylabel(_metric_label(metric))
        ax.set_title(col)
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes[:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def weight_curve(objective: str, p, probe: dict | None = None):
    """``w(p)`` of an objective on the probabilities ``p`` (numpy), thresholds applied.

    A per-batch percentile threshold (``OnlyTopP-K20`` trained as such) is drawn at the
    probe's percentile, the value it takes on average over the base model's tokens."""
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
            if str(lo) in pct and str(hi) in pct:
                q = pct[str(lo)] + (pct[str(hi)] - pct[str(lo)]) * (k - lo)
            else:
                return None
        w = w * obj.keep_mask(ce, q).to(w.dtype)
    return w.numpy()


def plot_probe(probe: dict, objectives: list[tuple[str, str]], path: Path) -> Path | None:
    """The base model's token-p histogram (fraction of response tokens per bin) with the
    weight curves ``w(p)`` of ``objectives`` (pairs of label and trained name) over it."""
    import numpy as np

    hist = probe.get("histogram") or {}
    counts = np.asarray(hist.get("counts") or [], dtype=float)
    if counts.size == 0:
        return None
    plt = _plt()
    lo, hi = (hist.get("range") or [0.0, 1.0])[:2]
    edges = np.linspace(lo, hi, counts.size + 1)
    fig, ax = plt.subplots(figsize=(9, 4.4))
    ax.bar(edges[:-1], counts / max(counts.sum(), 1.0), width=np.diff(edges), align="edge",
           color="lightgrey", edgecolor="grey", linewidth=0.3, label="base model: token p")
    for value, name, style in ((probe.get("mean_p"), "mean p", "--"),
                               (probe.get("median_p"), "median p", ":")):
        if isinstance(value, (int, float)):
            ax.axvline(value, color="k", linestyle=style, linewidth=1, label=f"{name} {value:.3f}")
    ax.set(xlabel="p of the target token under the base model",
           ylabel="fraction of response tokens", xlim=(0, 1))
    right = ax.twinx()
    grid = np.linspace(1e-4, 1 - 1e-6, 2000)
    ymax = 1.05
    drawn = []
    for color, (label, name) in zip(_colors(len(objectives)), objectives):
        w = weight_curve(name, grid, probe)
        if w is None:
            continue
        if np.nanmax(w) > 1.5:
            ymax = 3.0
        thresholded = parse_objective(name).thresholded  # dashed: they overlay their family
        right.plot(grid, w, color=color, linewidth=1.4, linestyle="--" if thresholded else "-",
                   label=f"w(p), {label}")
        drawn.append(label)
    right.set_ylim(0, ymax)
    right.set_ylabel("weight w(p) on the NLL gradient" + (" (clipped)" if ymax > 1.5 else ""))
    regime = (probe.get("placement") or {}).get("regime")
    title = f"probe: {probe.get('model') or '?'} on {probe.get('data') or '?'}"
    if regime:
        title += f" - {regime}"
    ax.set_title(title)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = right.get_legend_handles_labels()
    fig.legend(h1 + h2, l1 + l2, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -- markdown -------------------------------------------------------------------------------

def _metric_label(metric: str) -> str:
    return {"avg@n": "accuracy (avg@n, %)", "mean_score": "score (mean, %)",
            "exact": "exact match (%)", "boxed_rate": "boxed answers (%)"}.get(
        metric, f"{metric} (%)")


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
    lines.append(f"{len(report['runs'])} run(s) in {len(groups)} group(s) from "
                 f"{', '.join(f'`{p}`' for p in report['inputs'])}: "
                 + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".")
    lines += ["", f"Cells: {_metric_label(metric)} as mean ± half-width of the 95% t-interval "
              "over seeds (runs identical but for `train.seed`); a single seed has no interval "
              "(n=1). **Bold**: best in its column within the block. Avg.: the mean over the "
              "block's tasks, per run, then over seeds (only runs evaluated on every task).", ""]
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
                pass_txt = ", ".join(f"{k} {_fmt_stat(d[k])}" for k in passes
                                     if k != "pass@1") or "-"
                samples = "/".join(str(x) for x in d["problems"]) + " x " + \
                    "/".join(str(x) for x in d["samples_per_problem"])
                detail_rows.append([f"`{g['label']}`", t, samples, _fmt_stat(d.get("avg@n")),
                                    _fmt_stat(d.get("mean_score")), _fmt_stat(d.get("exact")),
                                    pass_txt, _fmt_stat(d.get("boxed_rate"))])
        if detail_rows:
            lines += ["<details><summary>per task: samples, accuracy, score, pass@k, boxed "
                      "answers</summary>", "",
                      "| objective | task | problems x samples | accuracy | score | exact | "
                      "pass@k | boxed |", "|---|---|---|---:|---:|---:|---|---:|"]
            lines += ["| " + " | ".join(r) + " |" for r in detail_rows]
            lines += ["", "</details>", ""]
    # training statistics
    trained = [g for g in report["groups"] if g["training"].get("steps")]
    if trained:
        lines += ["## Training", "",
                  f"Final statistics: mean over the last {TAIL} logged steps of each run, then "
                  "over seeds. The loss is each run's own objective, so only mean p compares "
                  "across objectives.", "",
                  "| objective | setting | seeds | steps | loss | mean p | kept tokens | "
                  "mean w | tokens/s |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for g in trained:
            t = g["training"]
            steps = ", ".join(dict.fromkeys(f"{s}/{p}" if p else str(s)
                                            for s, p in zip(t["steps"], t["planned_steps"])))
            lines.append(f"| `{g['label']}` | {_md_escape(g['setting']) or '-'} | "
                         f"n={len(g['runs'])} | {steps} | {_fmt_stat(t.get('loss'), False)} | "
                         f"{_fmt_stat(t.get('mean_p'), False)} | "
                         f"{_fmt_stat(t.get('frac_kept'), True)}% | "
                         f"{_fmt_stat(t.get('mean_w'), False)} | "
                         f"{_fmt_stat(t.get('tokens_per_s'), False)} |")
        lines.append("")
    # runs
    lines += ["## Runs", "", "| run | objective | seed | model | data | recipe | status | "
              "probe placement |", "|---|---|---:|---|---|---|---|---|"]
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
        status = f"**{r['status']}**" + (f": {_md_escape(r['status_detail'])}"
                                         if r["status_detail"] else "")
        lines.append(f"| `{shown}` | {label} | {r['seed'] if r['seed'] is not None else '-'}"
                     f" | {r['model'] or '-'} | {r['dataset'] or '-'} | {r['recipe'] or '-'} | "
                     f"{status} | {placement} |")
    lines.append("")
    problems = [p for r in report["runs"] for p in r["problems"]]
    if problems:
        lines += ["Problems met while reading (skipped):", ""] + [f"- {p}" for p in problems] + [""]
    if report["probes"]:
        lines += ["## Probe of the base model", "",
                  "| probe | model | data | tokens | mean p | median p | 20th pct | placement | "
                  "recommended |", "|---|---|---|---:|---:|---:|---:|---|---|"]
        for p in report["probes"]:
            pl, rec = p.get("placement") or {}, p.get("recommendation") or {}
            pct20 = (p.get("percentiles") or {}).get("20")
            short = "/".join(Path(p["path"]).parts[-3:])
            lines.append(f"| `{short}` | {p['model'] or '-'} | {p['data'] or '-'} | "
                         f"{p['tokens']} | {_fmt_num(p.get('mean_p'))} | "
                         f"{_fmt_num(p.get('median_p'))} | {_fmt_num(pct20)} | "
                         f"{pl.get('regime', '-')} | `{rec.get('objective', '-')}` |")
        lines.append("")
    if report["figures"]:
        lines += ["## Figures", ""]
        for fig in report["figures"]:
            lines += [f"**{fig['title']}**", "", f"![{fig['title']}]({fig['file']})", ""]
    lines += ["---", f"`report.json` holds every number above. Made by `probsft report` on "
              f"{report['created']}."]
    return "\n".join(lines) + "\n"


def _fmt_num(x: Any) -> str:
    return _num(float(x)) if isinstance(x, (int, float)) else "-"


# -- the report -----------------------------------------------------------------------------

def default_out_dir(paths: list[str | os.PathLike]) -> Path:
    """``<PATH>/report`` for a single folder, else ``./report``."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return Path(paths[0]) / REPORT_DIR
    return Path(REPORT_DIR)


def _check_metric(metric: str) -> None:
    if metric in METRICS or re.fullmatch(r"pass@\d+", metric):
        return
    raise ConfigError(f"--metric {metric!r} is not a task metric; use one of "
                      f"{', '.join(METRICS)} or pass@K (e.g. pass@4)")


def build_report(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                 *, metric: str = "avg@n", probes: Iterable[str | os.PathLike] = (),
                 step_states: dict[str, str] | None = None,
                 step_logs: dict[str, str] | None = None,
                 figures: bool = True) -> dict[str, Any]:
    """Compare the runs under ``paths`` and write ``report.json``, ``report.md`` and the
    figures into ``out_dir`` (default: :func:`default_out_dir`). Returns the report dict.

    ``metric``: the per-task number of the table (``avg@n`` accuracy, ``mean_score``,
    ``exact``, ``boxed_rate`` or ``pass@K``); ``probes``: extra probe reports (e.g. the one a
    sweep's thresholds came from); ``step_states``: job states by step name
    (``train-<run>``, ...) that the caller knows, e.g. from SLURM accounting, and
    ``step_logs`` their log files (the last ``error:`` line of a failed step's log is shown
    with its state). Every file is
    written under a temporary name and renamed; files of an earlier report in ``out_dir``
    that this one does not write again are removed, nothing else there is touched.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ConfigError("no PATH given; pass an experiment work directory or run folders")
    _check_metric(metric)
    col = collect(paths, probes=probes, step_states=step_states, step_logs=step_logs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths)
    out_res = out.resolve()
    for run in col.runs:
        if Path(run["path"]).resolve() == out_res:
            raise ConfigError(f"--out {out} is a run folder; choose another folder")
    groups = group_runs(col.runs)
    blocks = build_tables(groups, metric)
    notes = list(col.notes)
    for g in groups:
        for task, d in g.get("details", {}).items():
            if not d["same_sampling"]:
                notes.append(f"{g['label']}{' (' + g['setting'] + ')' if g['setting'] else ''}: "
                             f"the seeds of {task} were evaluated with different problems or "
                             "sampling; their mean mixes them")
        if len([s for s in g["seeds"] if s is not None]) != len(set(s for s in g["seeds"]
                                                                   if s is not None)):
            notes.append(f"group {g['label']} holds runs with the same seed "
                         f"({', '.join(g['runs'])}): repeats, not independent seeds")
    if col.runs and not any(b["tasks"] for b in blocks):
        notes.append("no run has an evaluation yet; the table shows statuses only")

    out.mkdir(parents=True, exist_ok=True)
    figs: list[dict] = []
    if figures and importlib.util.find_spec("matplotlib") is None:
        figures = False
        notes.append("no figures: matplotlib is not installed (pip install "
                     "'probsft-megatron[train]')")
    if figures:
        made = plot_curves(groups, out / "curves.png")
        if made:
            figs.append({"file": "curves.png", "kind": "curves",
                         "title": "training loss and mean p against step, every run"})
        made = plot_sweep(groups, blocks, "a", metric, out / "sweep-a.png")
        if made:
            figs.append({"file": "sweep-a.png", "kind": "sweep-a",
                         "title": f"{_metric_label(metric)} against the convexity a"})
        made = plot_sweep(groups, blocks, "threshold", metric, out / "sweep-threshold.png")
        if made:
            figs.append({"file": "sweep-threshold.png", "kind": "sweep-threshold",
                         "title": f"{_metric_label(metric)} against the threshold"})
        objectives = []
        for g in groups:
            o = g["objective"]
            if o and (o["label"], o["name"]) not in objectives:
                objectives.append((o["label"], o["name"]))
        for i, probe in enumerate(col.probes):
            name = "probe.png" if len(col.probes) == 1 else f"probe-{i + 1}.png"
            if plot_probe(probe, objectives, out / name):
                figs.append({"file": name, "kind": "probe", "probe": probe["path"],
                             "title": f"base model's token p ({probe['model']} on "
                                      f"{probe['data']}) with the objectives' w(p)"})
    order = {r["path"]: (i, j) for i, g in enumerate(groups) for j, r in enumerate(g["_members"])}
    col.runs.sort(key=lambda r: order.get(r["path"], (len(groups), 0)))
    status_counts = {s: sum(r["status"] == s for r in col.runs) for s in STATUSES
                     if any(r["status"] == s for r in col.runs)}
    report = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": paths, "metric": metric, "status_counts": status_counts,
        "notes": notes,
        "runs": [{k: v for k, v in r.items() if k not in ("identity", "config")}
                 | {"config": r["config"]} for r in col.runs],
        "groups": [{k: v for k, v in g.items() if not k.startswith("_")} for g in groups],
        "tables": blocks,
        "probes": [{k: v for k, v in p.items()} for p in col.probes],
        "figures": figs,
    }
    files = ["report.json", "report.md", *(f["file"] for f in figs)]
    report["files"] = files
    previous = _read_json(out / "report.json", [])
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_json(out / "report.json", report, default=str)
    if isinstance(previous, dict) and previous.get("format") == FORMAT:
        for stale in set(previous.get("files") or []) - set(files):
            target = out / Path(str(stale)).name
            if target.suffix == ".png" and target.is_file():
                target.unlink()
    report["out_dir"] = str(out)
    return report
