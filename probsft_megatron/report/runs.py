"""One run as the flat dict the report uses (:func:`read_run`; :func:`read_eval_only` for a bare
eval folder): objective, model, data, training, evaluation, status, the seed-grouping identity."""

from __future__ import annotations

import contextlib
import json
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ConfigError
from probsft_megatron.launchers.jobs import state_class
from probsft_megatron.objectives import ObjectiveError, parse_objective
from probsft_megatron.report.files import (
    flatten,
    is_probe_report,
    read_eval,
    read_json,
    read_jsonl,
)
from probsft_megatron.report.records import StepOutcome, planned_config, step_error

TAIL = 10
"""Final training statistics are the mean over the last ``TAIL`` logged steps."""
TRAINING_STATS = ("loss", "mean_p", "frac_kept", "mean_w", "tokens_per_s", "positions_per_token")
STATUSES = ("complete", "trained", "running", "queued", "failed", "not started")
"""Run states, as docs/report.md describes them."""

BOOKKEEPING = {  # config keys that do not change what a run learns: ignored when grouping seeds
    *("train.seed", "train.output_dir", "train.resume", "train.tensorboard"),
    *("train.log_interval", "train.save_interval", "train.keep_last", "train.histogram_interval"),
}


def objective_info(trained: Any, name: str) -> dict[str, Any] | None:
    """An objective's ``name``, ``label``, ``family``, ``a``, ``threshold``, ``percentile`` and
    ``prefix``; labelled by the folder ``name``'s percentile form of its threshold (``-K20``)."""
    try:
        obj = parse_objective(trained)
    except ObjectiveError:
        return None
    th = obj.threshold
    info: dict[str, Any] = {
        "name": obj.name,
        "label": obj.name,
        "family": obj.family,
        "a": {"p": 1.0, "nll": 0.0}.get(obj.family, obj.a),
        "threshold": None
        if th is None
        else {"value": th.value, "side": th.side, "per_batch_percentile": th.percentile},
        "percentile": th.value if th is not None and th.percentile else None,
        "prefix": obj.name.rsplit("-", 1)[0] if obj.thresholded else None,
    }
    parts = name.split("-")
    for i in range(len(parts) - 1, -1, -1):  # the shortest objective name ending the folder's
        with contextlib.suppress(ObjectiveError):
            named = parse_objective("-".join(parts[i:]))
            if named.needs_percentile and obj.thresholded and not obj.needs_percentile:
                if named.name.rsplit("-", 1)[0] == info["prefix"]:
                    info["label"], info["percentile"] = named.name, named.threshold.value
            break
    return info


@cache
def _presets() -> dict[str, dict]:
    """The model presets' own keys (``configs/models/<name>.yaml``), by name."""
    from probsft_megatron.config import list_presets, load_preset

    out = {}
    for name in list_presets():
        with contextlib.suppress(ConfigError):  # an unreadable preset names no run
            out[name] = load_preset(name)
    return out


def model_name(config: dict) -> str | None:
    """The matching model preset, else ``init.checkpoint``'s folder name, else a size."""
    model = config.get("model") or {}
    if not isinstance(model, dict) or not model:
        return None
    for name, preset in _presets().items():
        if preset and all(_same(model.get(k), v) for k, v in preset.items()):
            return name
    if ckpt := (config.get("init") or {}).get("checkpoint"):
        return Path(str(ckpt)).name
    size = f"{model.get('num_layers', '?')}x{model.get('hidden_size', '?')}"
    return f"{model.get('arch', '?')} {size}"


def _same(value: Any, preset: Any) -> bool:
    """Equal, or numbers equal to 1e-6 (a preset value that went through float32)."""
    numbers = all(isinstance(v, (int, float)) for v in (value, preset))
    return value == preset or (numbers and math.isclose(value, preset, rel_tol=1e-6))


def dataset_name(config: dict) -> str | None:
    """``figfont``, ``math`` (numina), ``medical`` (m23k) or the training files' names."""
    data = config.get("data") or {}
    if data.get("source") == "figfont":
        return "figfont"
    files = ",".join(Path(str(f)).name for f in data.get("train_files") or [])
    return {"numina": "math", "m23k": "medical"}.get(data.get("format")) or files or None


def identity(config: dict) -> str:
    """The config without seed and bookkeeping keys: runs with equal identities are seeds."""
    flat = {k: v for k, v in flatten(config).items() if k not in BOOKKEEPING}
    for key, value in flat.items():  # a float that went through float32 (1e-5 as 9.99999e-06)
        if isinstance(value, float) and math.isfinite(value):
            flat[key] = float(f"{value:.6g}")
    if ckpt := flat.get("init.checkpoint"):  # the same backbone converted into two work dirs
        flat["init.checkpoint"] = Path(str(ckpt)).name
    return json.dumps(flat, sort_keys=True, default=str)


def _tail_stats(history: list[dict]) -> dict[str, float]:
    tail = history[-TAIL:]
    out = {}
    for key in (*TRAINING_STATS, "grad_norm", "threshold"):
        vals = [v for r in tail if isinstance(v := r.get(key), (int, float)) and math.isfinite(v)]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def _last_validation(history: list[dict]) -> dict[str, Any] | None:
    """The newest ``val_*`` keys of ``metrics.jsonl`` with their step; None without any."""
    for r in reversed(history):
        if isinstance(r.get("val_loss"), (int, float)):
            return {"step": r["step"], **{k: v for k, v in r.items() if k.startswith("val_")}}
    return None


def _train_state(root: Path, key: str, kind: type, problems: list[str]) -> tuple[Any, str | None]:
    """``key`` of the newest checkpoint's train_state.json holding a ``kind``, and that file."""
    for state_file in sorted(root.glob("checkpoints/*/train_state.json"), reverse=True):
        state = read_json(state_file, problems)
        if isinstance(state, dict) and isinstance(state.get(key), kind):
            return state[key], str(state_file.relative_to(root))
    return None, None


def read_run(
    path: str | os.PathLike,
    records: dict[str, StepOutcome] | None = None,
    step_states: dict[str, str] | None = None,
    step_logs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the report knows about one run folder. ``records``: its launched steps by
    kind; ``step_states`` (by step name, e.g. ``train-<run>``, from SLURM) override them;
    ``step_logs``: log files by step name, searched for a failed step's error."""
    root, problems = Path(path), []
    records = dict(records or {})
    name, train = root.name, records.get("train")
    config, config_source = read_json(root / "config.json", problems), "config.json"
    summary = read_json(root / "summary.json", problems)
    if not isinstance(summary, dict) or "output_dir" not in summary:
        summary = None
    if not isinstance(config, dict):  # a run with checkpoints: in their train_state.json
        config, config_source = _train_state(root, "config", dict, problems)
    if config is None and train and train.config:
        config = planned_config(train, problems)
        config_source = "experiment record" if config is not None else None
    done, cfg = summary or {}, config or {}
    history = read_jsonl(root / "metrics.jsonl", problems)
    if not history and isinstance(done.get("history"), list):
        history = [r for r in done["history"] if isinstance(r, dict)]
    history = [r for r in history if isinstance(r.get("step"), int)]
    history.sort(key=lambda r: r["step"])

    trained = done.get("objective") or (cfg.get("loss") or {}).get("objective")
    if trained is None and train:
        trained = train.objective
    objective = objective_info(trained, name) if trained is not None else None
    if trained is not None and objective is None:
        problems.append(f"{root}: objective {trained!r} is not one probsft knows")

    total_steps = done.get("total_steps")
    if total_steps is None:
        total_steps, _ = _train_state(root, "total_steps", int, problems)
    max_steps = (cfg.get("train") or {}).get("max_steps")
    planned = total_steps
    if isinstance(max_steps, int) and max_steps > 0:
        planned = min(max_steps, total_steps) if total_steps else max_steps
    training = None
    if history or summary:
        training = {
            "steps": history[-1]["step"] if history else done.get("steps"),
            "planned_steps": planned,
            "total_steps": total_steps,
            "finished": summary is not None,
            "final": _tail_stats(history),
            "final_over_steps": min(TAIL, len(history)),
            "last": {k: v for k, v in (history[-1] if history else {}).items() if k != "p_hist"},
            "validation": _last_validation(history),
        }
    evals = read_eval(root / "eval", problems) if (root / "eval").is_dir() else {}

    probe_report = read_json(root / "probe" / "report.json", problems)
    evidence = done.get("objective_evidence")
    keys = ("source", "placement", "recommendation", "statistics")
    probe = {k: evidence.get(k) for k in keys} if isinstance(evidence, dict) else None
    if is_probe_report(probe_report):
        probe = probe or {}
        probe.update(
            report=str(root / "probe" / "report.json"),
            placement=probe_report.get("placement"),
            recommendation=probe_report.get("recommendation"),
        )

    for kind in ("train", "export", "eval"):  # the caller's job states decide over records
        step = f"{kind}-{name}"
        if step in (step_states or {}):
            rec = records.setdefault(kind, StepOutcome(step, kind, str(root)))
            rec.state, log = step_states[step], (step_logs or {}).get(step) or rec.log
            if log and state_class(rec.state) == "failed":
                rec.log, rec.error = str(log), step_error([Path(log)])
    run = {
        "name": name,
        "path": str(root),
        "kind": "train",
        "status": None,
        "status_detail": None,
        "objective": objective,
        "seed": (cfg.get("train") or {}).get("seed"),
        "model": model_name(config) if config else None,
        "dataset": dataset_name(config) if config else None,
        "recipe": train.recipe if train else None,
        "identity": identity(config) if config else None,
        "config": config,
        "config_source": config_source,
        "training": training,
        "curves": {key: [r.get(key) for r in history] for key in ("step", "loss", "mean_p")},
        "eval": evals,
        "probe": probe,
        "steps": {
            kind: {k: getattr(rec, k) for k in ("state", "error", "log", "experiment")}
            for kind, rec in records.items()
        },
        "problems": problems,
    }
    run["status"], run["status_detail"] = _status(run, records, planned)
    return run


def _status(run: dict, records: dict[str, StepOutcome], planned: int | None) -> tuple[str, str]:
    """``(status, detail)`` of a run: its files first, then its steps' states."""
    root, training, evals = Path(run["path"]), run["training"], run["eval"]
    classes = {kind: state_class(rec.state) for kind, rec in records.items()}
    failed = [k for k in ("train", "export", "eval") if classes.get(k) == "failed"]
    if evals and (root / "eval" / "summary.json").is_file():  # written after the last task
        return "complete", ""
    if failed:
        rec = records[failed[0]]
        detail = f"{rec.kind} step {rec.state.lower()}"
        if rec.kind == "train" and training:
            detail += f" at step {training['steps']}"
        if rec.error:
            detail += f": {rec.error}"
        if evals:
            detail += f" (tasks done: {', '.join(sorted(evals))})"
        return "failed", detail
    if evals:
        return "running", f"evaluation under way: {', '.join(sorted(evals))} done"
    if training and training["finished"]:
        later = [k for k in ("eval", "export") if classes.get(k) in ("running", "queued")]
        if later:
            return "trained", f"{later[0]} step {classes[later[0]]}"
        exported = (root / "hf" / "probsft_export.json").is_file()
        return "trained", "exported, not evaluated" if exported else "not evaluated"
    if training or run["config_source"] not in (None, "experiment record"):
        if classes.get("train") == "succeeded":
            return "failed", "train step ended without writing summary.json"
        of = f" of {planned}" if planned else ""
        return "running", (
            f"step {training['steps'] if training else 0}{of}; no summary.json yet (still "
            "training, or stopped without a record of it)"
        )
    if classes.get("train") == "queued":
        return "queued", "train step queued"
    if classes.get("train") == "running":
        return "running", "train step started, nothing written yet"
    if records or not (root.is_dir() and any(root.iterdir())):
        return "not started", "named by the experiment records, no output yet"
    return "not started", "folder holds no run files"


def read_eval_only(path: str | os.PathLike) -> dict[str, Any]:
    """A bare ``probsft eval --out`` folder (e.g. the base model) as a run without training."""
    root, problems = Path(path), []
    evals = read_eval(root, problems)
    models = {t["model"] for t in evals.values() if t.get("model")}
    return {
        "name": root.name,
        "path": str(root),
        "kind": "eval",
        "status": "complete" if evals else "running",
        "status_detail": "evaluation only" + (f" of {', '.join(sorted(models))}" if models else ""),
        **dict.fromkeys("objective seed model dataset recipe identity config training".split()),
        "curves": {"step": [], "loss": [], "mean_p": []},
        "eval": evals,
        "probe": None,
        "steps": {},
        "problems": problems,
    }
