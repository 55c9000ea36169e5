"""`probsft report`: comparing runs of an experiment or sweep.

Hand-made folders (fast): a sweep work directory with complete, trained, running, failed and
not-started runs, seeds to group, percentile-named threshold runs, a corrupt metrics line, an
eval-only base model and a probe report; every number of the table is checked against the
values written into the files. Real runs (slow, one session fixture): the local launch chain
on the tiny model (train -> export -> vLLM eval) and two seeds trained with `probsft train`
into the same work directory; the report's numbers are recomputed from the run files.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from probsft_megatron import extras
from probsft_megatron import report as rp
from probsft_megatron.cli import main as cli_main
from probsft_megatron.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    "df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_t_quantile_matches_the_table(df, expected):
    assert rp.t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_interval_of_three_seeds_and_of_one():
    s = rp.summarize_values([0.4, 0.5, 0.6])
    assert s["mean"] == pytest.approx(0.5) and s["std"] == pytest.approx(0.1)
    assert s["half_width"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
    assert s["low"] == pytest.approx(0.5 - s["half_width"]) and s["n"] == 3
    one = rp.summarize_values([0.7])
    assert one["n"] == 1 and one["half_width"] is None and one["mean"] == 0.7


# ------------------------------------------------------------------------ hand-made folders


@pytest.fixture(scope="session")
def base_config() -> dict:
    """A real resolved config (what `probsft train` writes to config.json)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from probsft_megatron.config import load_config
    return load_config("tiny-figfont-cpu", ["train.max_steps=30"]).to_dict()


def _config(base: dict, objective: str, seed: int, out: Path, **sections) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["loss"]["objective"] = objective
    cfg["train"]["seed"] = seed
    cfg["train"]["output_dir"] = str(out)
    for key, value in sections.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def make_run(
    root: Path,
    name: str,
    base: dict,
    objective: str,
    seed: int = 1,
    *,
    steps: int = 30,
    finished: bool = True,
    evals: dict | None = None,
    aggregate: bool = True,
    mean_p0: float = 0.3,
    **config,
) -> Path:
    """A run folder as `probsft train` (+ export + eval) writes it."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(_config(base, objective, seed, d, **config)))
    history = []
    for s in range(1, steps + 1):
        mp = mean_p0 + 0.01 * s + 0.001 * seed
        history.append(
            {
                "step": s,
                "loss": 1.0 - mp,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "mean_p": mp,
                "frac_kept": 0.5 if "OnlyTop" in objective else 1.0,
                "mean_w": mp,
                "response_tokens": 13,
                "tokens_per_s": 1000.0 + s,
                "step_time_s": 1.0,
            }
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if finished:
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "steps": steps,
                    "total_steps": 30,
                    "output_dir": str(d),
                    "objective": objective,
                    "objective_evidence": None,
                    "checkpoint": str(d / "checkpoints" / f"step_{steps:07d}"),
                    "history": history,
                }
            )
        )
    summaries = []
    for task, metrics in (evals or {}).items():
        n = metrics.get("n", 1)
        m = {"problems": 4, "n": n, "pass@k": {"1": metrics["avg@n"]}, **metrics}
        if n > 1:
            m["pass@k"][str(n)] = min(1.0, 2 * metrics["avg@n"])
        s = {
            "task": task,
            "grader": "math" if task == "math500" else "jaro_winkler",
            "sampling": {
                "n": n,
                "temperature": 1.0 if n > 1 else 0.0,
                "top_p": 1.0,
                "max_new_tokens": 8,
                "seed": 0,
            },
            "metrics": m,
            "model": str(d / "hf"),
        }
        (d / "eval" / task).mkdir(parents=True)
        (d / "eval" / task / "summary.json").write_text(json.dumps(s))
        if task == "math500":  # 4 problems x n samples, a third of them without a boxed answer
            rows = [
                {
                    "id": str(i),
                    "extracted": ["1" if (i + j) % 3 else None for j in range(n)],
                    "correct": [False] * n,
                }
                for i in range(4)
            ]
            (d / "eval" / task / "samples.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        summaries.append(s)
    if summaries and aggregate:
        (d / "eval" / "summary.json").write_text(json.dumps(summaries))
    return d


def record_run(
    work: Path,
    run: str,
    recipe: str,
    overrides: list[str],
    state: str | None,
    stderr: str = "",
) -> None:
    """What `probsft launch` writes for one run of a local experiment: its entry and steps in
    the run record (``probsft_experiment.json``, the config validated as the launcher does)
    and, once the train step ended, NeMo-Run's SUCCESS file."""
    from probsft_megatron.config import load_config
    from probsft_megatron.launchers.jobs import RECORD

    exp = work / "experiments" / "sweep-test" / "sweep-test_1796000000000000000"
    path = exp / RECORD
    record = (
        json.loads(path.read_text())
        if path.is_file()
        else {
            "title": "sweep-test",
            "exp_id": exp.name,
            "exp_dir": str(exp),
            "status": "launched",
            "executor": "local",
            "steps": [],
            "runs": {},
        }
    )
    run_dir = work / "runs" / run
    config = load_config(recipe, [*overrides, f"train.output_dir={run_dir}"]).to_dict()
    record["runs"][run] = {
        "name": run,
        "recipe": recipe,
        "objective": config["loss"]["objective"],
        "overrides": overrides,
        "run_dir": str(run_dir),
        "eval_summary": str(run_dir / "eval" / "summary.json"),
        "config": config,
    }
    for kind in ("train", "export", "eval"):
        record["steps"].append(
            {
                "name": f"{kind}-{run}",
                "kind": kind,
                "after": [],
                "job_id": None,
                "job_name": f"{kind}-{run}",
                "log_dir": str(exp / f"{kind}-{run}"),
            }
        )
    exp.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    step = f"train-{run}"
    if state is not None:
        job = exp / step / "nemo_run" / f"{step}-abc"
        (job / step / "0").mkdir(parents=True)
        (job / step / "0" / "stderr.log").write_text(stderr)
        (job / "SUCCESS").write_text(
            json.dumps(
                {
                    "app_id": f"{step}-abc",
                    "final_state": state,
                    "roles": {
                        step: [
                            {
                                "replica_id": 0,
                                "exitcode": 0 if state == "SUCCEEDED" else 1,
                                "stderr": str(job / step / "0" / "stderr.log"),
                            }
                        ]
                    },
                }
            )
        )


FIG = {
    "original": [(0.40, 0.60, 0.20), (0.50, 0.70, 0.30)],  # (figfont avg@n, score, math)
    "p": [(0.55, 0.80, 0.10), (0.65, 0.90, 0.10)],
}
SWEEP_A = {"GeneralFamily-0.5": 0.52, "GeneralFamily-2": 0.70, "GeneralFamily-8": 0.30}
THRESH = {"OnlyTopP-K20": ("OnlyTopP-0.5858", 0.45), "OnlyTopP-K50": ("OnlyTopP-0.9936", 0.35)}


def _evals(fig: float, score: float, math_acc: float) -> dict:
    return {
        "figfont": {"avg@n": fig, "mean_score": score, "exact": fig / 2},
        "math500": {"avg@n": math_acc, "n": 4},
    }


@pytest.fixture
def sweep_work(tmp_path, base_config) -> Path:
    """WORK/runs/... of a sweep in every state, with experiment records and a probe."""
    work = tmp_path / "work"
    runs = work / "runs"
    for obj, rows in FIG.items():
        for seed, row in enumerate(rows, start=1):
            make_run(
                runs,
                f"figfont-tiny-llama-{obj}-s{seed}",
                base_config,
                obj,
                seed,
                evals=_evals(*row),
            )
    for obj, fig in SWEEP_A.items():
        make_run(
            runs,
            f"figfont-tiny-llama-{obj}",
            base_config,
            obj,
            1,
            evals=_evals(fig, fig + 0.1, 0.2),
        )
    for label, (trained, fig) in THRESH.items():
        make_run(
            runs,
            f"figfont-tiny-llama-{label}",
            base_config,
            trained,
            1,
            evals=_evals(fig, fig, 0.1),
        )
    # trained, not evaluated; running (cut last line); failed (record + log); not started
    make_run(runs, "figfont-tiny-llama-GeneralFamily-1", base_config, "GeneralFamily-1", 1)
    running = make_run(
        runs,
        "figfont-tiny-llama-GeneralFamily-4",
        base_config,
        "GeneralFamily-4",
        1,
        steps=5,
        finished=False,
    )
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')
    make_run(
        runs,
        "figfont-tiny-llama-GeneralFamily-6",
        base_config,
        "GeneralFamily-6",
        1,
        steps=2,
        finished=False,
    )
    for name, state, err in (
        (
            "GeneralFamily-6",
            "FAILED",
            "Traceback (most recent call last):\n  ...\nerror: CUDA out of "
            "memory; lower train.micro_batch_size\n",
        ),
        ("GeneralFamily-10", None, ""),
    ):
        record_run(
            work,
            f"figfont-tiny-llama-{name}",
            "tiny-figfont-cpu",
            [f"loss.objective={name}", "train.max_steps=30", "train.seed=1"],
            state,
            err,
        )
    # a corrupt line in the middle of a finished run's metrics
    bad = runs / "figfont-tiny-llama-GeneralFamily-8" / "metrics.jsonl"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    # the probe of the base model, found under WORK
    counts = [0] * 100
    for i, c in ((5, 30), (50, 20), (95, 10), (99, 40)):
        counts[i] = c
    (work / "probe").mkdir()
    (work / "probe" / "report.json").write_text(
        json.dumps(
            {
                "format": "probsft-probe",
                "key": "k1",
                "model": {"path": "/m/tiny-base"},
                "data": {"config": {"source": "figfont", "train_files": []}},
                "tokens": 100,
                "mean_p": 0.62,
                "median_p": 0.9,
                "percentiles": {str(k): k / 100 for k in range(101)},
                "histogram": {"range": [0.0, 1.0], "bins": 100, "counts": counts},
                "placement": {"regime": "intermediate"},
                "recommendation": {"objective": "original"},
            }
        )
    )
    return work


def _by_name(report: dict) -> dict:
    return {r["name"].replace("figfont-tiny-llama-", ""): r for r in report["runs"]}


def _group(report: dict, label: str) -> dict:
    (g,) = [g for g in report["groups"] if g["label"] == label]
    return g


def test_sweep_report_tables_statuses_and_figures(sweep_work, tmp_path):
    base = tmp_path / "base-eval"  # the base model's `probsft eval --out` folder
    (base / "figfont").mkdir(parents=True)
    (base / "figfont" / "summary.json").write_text(
        json.dumps(
            {
                "task": "figfont",
                "grader": "jaro_winkler",
                "metrics": {"problems": 4, "n": 1, "avg@n": 0.05},
            }
        )
    )
    out = tmp_path / "out"
    report = rp.build_report([sweep_work, base], out)
    runs = _by_name(report)

    # every run is listed with its state; nothing is dropped
    status = {k: r["status"] for k, r in runs.items()}
    assert status == {
        **{f"{o}-s{s}": "complete" for o in FIG for s in (1, 2)},
        **dict.fromkeys([*SWEEP_A, *THRESH], "complete"),
        "GeneralFamily-1": "trained",
        "GeneralFamily-4": "running",
        "GeneralFamily-6": "failed",
        "GeneralFamily-10": "not started",
        "base-eval": "complete",
    }
    assert runs["GeneralFamily-4"]["status_detail"].startswith("step 5 of 30")
    assert runs["GeneralFamily-6"]["status_detail"] == (
        "train step failed at step 2: error: CUDA out of memory; lower train.micro_batch_size"
    )
    assert runs["GeneralFamily-10"]["config_source"] == "experiment record"
    assert runs["GeneralFamily-10"]["recipe"] == "tiny-figfont-cpu"
    assert runs["GeneralFamily-1"]["status_detail"] == "not evaluated"
    assert any("line 4 is not JSON" in p for p in runs["GeneralFamily-8"]["problems"])

    # seeds grouped; cells recomputed from what was written
    orig = _group(report, "original")
    assert orig["runs"] == ["figfont-tiny-llama-original-s1", "figfont-tiny-llama-original-s2"]
    assert orig["seeds"] == [1, 2]
    cell = orig["cells"]["figfont"]
    assert cell["mean"] == pytest.approx(0.45) and cell["n"] == 2
    assert cell["half_width"] == pytest.approx(
        12.7062 * np.std([0.4, 0.5], ddof=1) / math.sqrt(2), rel=1e-4
    )
    assert orig["average"]["values"] == pytest.approx([(0.4 + 0.2) / 2, (0.5 + 0.3) / 2])
    boxed = np.mean([(i + j) % 3 != 0 for i in range(4) for j in range(4)])  # as written
    assert orig["details"]["math500"]["boxed_rate"]["mean"] == pytest.approx(boxed)
    assert orig["details"]["figfont"]["mean_score"]["mean"] == pytest.approx(0.65)
    assert orig["details"]["math500"]["pass@4"]["mean"] == pytest.approx(0.5)
    # training: mean over the last TAIL logged steps, then over seeds
    tails = [np.mean([0.3 + 0.01 * s + 0.001 * seed for s in range(21, 31)]) for seed in (1, 2)]
    assert orig["training"]["mean_p"]["mean"] == pytest.approx(np.mean(tails))
    # percentile-named runs keep their label and know their percentile
    k20 = _group(report, "OnlyTopP-K20")
    assert k20["objective"]["name"] == "OnlyTopP-0.5858" and k20["objective"]["percentile"] == 20

    (block,) = [b for b in report["tables"] if b["tasks"] == ["figfont", "math500"]]
    assert block["best"]["figfont"] == [_group(report, "GeneralFamily-2")["id"]]
    assert block["best"]["math500"] == [orig["id"]]
    p_avg = np.mean([(0.55 + 0.1) / 2, (0.65 + 0.1) / 2])
    assert _group(report, "p")["average"]["mean"] == pytest.approx(p_avg)
    assert block["best"]["average"] == [_group(report, "GeneralFamily-2")["id"]]
    # the base model is a row of its own, first in its block
    assert report["groups"][0]["label"] == "base-eval" and report["groups"][0]["kind"] == "eval"

    md = (out / "report.md").read_text()
    assert "| `original` | n=2 | 45.0 ± 63.5 | **25.0 ± 63.5** | 35.0 ± 63.5 |" in md
    assert "| `GeneralFamily-2` | n=1 | **70.0** | 20.0 | **45.0** | 1 complete |" in md
    for name in runs:
        assert name in md
    for fig in ("curves.png", "sweep-a.png", "sweep-threshold.png", "probe.png"):
        assert (out / fig).read_bytes()[:8] == PNG and f"]({fig})" in md
    data = json.loads((out / "report.json").read_text())
    assert data["format"] == rp.FORMAT and data["tables"] == json.loads(
        json.dumps(report["tables"])
    )
    assert {f["kind"] for f in data["figures"]} == {"curves", "sweep-a", "sweep-threshold", "probe"}


def test_only_seed_differences_group(tmp_path, base_config):
    """A different learning rate is another group (and says so); a different seed is not."""
    runs = tmp_path / "runs"
    make_run(runs, "a-s1", base_config, "p", 1, evals={"figfont": {"avg@n": 0.5}})
    make_run(runs, "a-s2", base_config, "p", 2, evals={"figfont": {"avg@n": 0.7}})
    make_run(runs, "b-s1", base_config, "p", 1, evals={"figfont": {"avg@n": 0.1}}, optim__lr=1e-4)
    report = rp.build_report(
        [runs / "a-s1", runs / "a-s2", runs / "b-s1"], tmp_path / "out", figures=False
    )
    groups = sorted((g["setting"], g["runs"]) for g in report["groups"])
    assert groups == [("optim.lr=0.0001", ["b-s1"]), ("optim.lr=0.001", ["a-s1", "a-s2"])]
    assert len(report["tables"]) == 2 and report["figures"] == []


def test_step_states_from_the_caller_and_partial_eval(tmp_path, base_config):
    """Job states passed in (SLURM accounting) decide over files; an eval that stopped
    between tasks is not complete; different eval settings across seeds are noted."""
    runs = tmp_path / "runs"
    make_run(runs, "x-p", base_config, "p", 1)
    make_run(
        runs,
        "x-original",
        base_config,
        "original",
        1,
        evals={"figfont": {"avg@n": 0.5}, "math500": {"avg@n": 0.1}},
        aggregate=False,
    )
    make_run(runs, "y-s1", base_config, "GeneralFamily-2", 1, evals={"figfont": {"avg@n": 0.5}})
    make_run(
        runs, "y-s2", base_config, "GeneralFamily-2", 2, evals={"figfont": {"avg@n": 0.5, "n": 4}}
    )
    log = tmp_path / "log-eval.out"
    log.write_text(
        "Processed prompts: 50%\nerror: vLLM ran out of KV cache; lower --n\n"
        "slurmstepd: *** JOB 12 CANCELLED DUE TO TIME LIMIT ***\n"
    )
    report = rp.build_report(
        [runs],
        tmp_path / "out",
        figures=False,
        step_states={"eval-x-p": "TIMEOUT", "train-x-p": "COMPLETED"},
        step_logs={"eval-x-p": str(log)},
    )
    runs_by = {r["name"]: r for r in report["runs"]}
    assert runs_by["x-p"]["status"] == "failed"
    assert (
        runs_by["x-p"]["status_detail"]
        == "eval step timeout: error: vLLM ran out of KV cache; lower --n"
    )
    assert runs_by["x-p"]["steps"]["train"]["state"] == "COMPLETED"
    assert runs_by["x-original"]["status"] == "running"
    assert sorted(runs_by["x-original"]["eval"]) == ["figfont", "math500"]
    assert any(
        "GeneralFamily-2" in n and "different problems or sampling" in n for n in report["notes"]
    )


def test_weight_curves():
    p = np.array([0.1, 0.4, 0.6, 0.9])
    assert rp.weight_curve("original", p) == pytest.approx([1, 1, 1, 1])
    assert rp.weight_curve("GeneralFamily-2", p) == pytest.approx(p**2)
    assert rp.weight_curve("OnlyTopP-0.5", p) == pytest.approx([0, 0, 0.6, 0.9])
    assert rp.weight_curve("OnlyBottomLogP-0.5", p) == pytest.approx([1, 1, 0, 0])
    # a per-batch percentile is drawn at the probe's percentile
    probe = {"percentiles": {"50": 0.5, "20": 0.2, "21": 0.3}}
    assert rp.weight_curve("OnlyTopP-K50", p, probe) == pytest.approx([0, 0, 0.6, 0.9])
    assert rp.weight_curve("OnlyTopP-K20.5", np.array([0.24, 0.26]), probe) == pytest.approx(
        [0, 0.26]
    )
    assert rp.weight_curve("OnlyTopP-K20", p, None) is None


def test_rebuild_removes_only_its_own_stale_figures(sweep_work, tmp_path):
    out = tmp_path / "out"
    rp.build_report([sweep_work], out)
    assert (out / "sweep-a.png").is_file()
    (out / "notes.txt").write_text("mine")
    rp.build_report([sweep_work / "runs" / "figfont-tiny-llama-p-s1"], out)
    assert not (out / "sweep-a.png").exists() and not (out / "probe.png").exists()
    assert (out / "curves.png").is_file() and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_prints_the_table(sweep_work, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert (
        cli_main(
            [
                "report",
                str(sweep_work / "runs" / "figfont-tiny-llama-p-s1"),
                str(sweep_work / "runs" / "figfont-tiny-llama-p-s2"),
                "--out",
                str(out),
                "--metric",
                "mean_score",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| `p` | n=2 | 85.0 ± 63.5 | - | - | 2 complete |" in text
    assert f"report: {out}/report.md" in text
    assert (out / "report.json").is_file()


def test_default_out_dir_is_inside_the_work_dir(sweep_work):
    assert rp.default_out_dir([sweep_work]) == sweep_work / "report"
    assert rp.default_out_dir([sweep_work, sweep_work]) == Path("report")


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent/work"], "/nonexistent/work does not exist"),
        (["EMPTY"], "holds no run"),
        (["RUN", "--metric", "accuracy"], "--metric 'accuracy' is not a task metric"),
        (["RUN", "--probe", "RUN"], "not a probe report"),
        (["RUN", "--out", "RUN"], "is a run folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, base_config, capsys, args, message):
    (tmp_path / "empty").mkdir()
    run = make_run(tmp_path, "r", base_config, "p", 1)
    out = tmp_path / "out"
    argv = [
        str(run) if a == "RUN" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args
    ]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in run.iterdir())
    assert cli_main(["report", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in run.iterdir()) == before


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


PROBE = {"format": "probsft-probe", "key": "k", "model": {"path": "/m/base"}, "tokens": 1}


@pytest.mark.parametrize(
    "out,message",
    [
        ("FILE", "is a file; give a folder"),
        ("FILE/sub", "cannot create the folder"),
        ("RUN/eval", "is inside a run folder"),
        ("RUN/eval/figfont", "is inside a run folder"),
        ("PROBE", "holds probe.png, report.json, which probsft report did not write"),
        ("WORK/runs", "where every folder is read as a run"),
        ("WORK/runs/cmp", "where every folder is read as a run"),
        ("/sys/probsft-report-test", "cannot create the folder"),
    ],
)
def test_unusable_out_is_one_line_and_touches_nothing(tmp_path, base_config, capsys, out, message):
    """An --out that cannot be written, or where the report would overwrite or mix with a
    run's, a probe's or a work directory's files: exit 2, one line, every file as before."""
    if out.startswith("/sys") and not os.path.ismount("/sys"):
        pytest.skip("no read-only /sys mount on this machine")
    work = tmp_path / "work"
    run = make_run(work / "runs", "r", base_config, "p", 1, evals={"figfont": {"avg@n": 0.5}})
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "report.json").write_text(json.dumps(PROBE))
    (probe / "probe.png").write_bytes(PNG)
    (tmp_path / "file").write_text("mine")
    where = {"FILE": tmp_path / "file", "RUN": run, "PROBE": probe, "WORK": work}
    head, _, rest = out.partition("/")
    target = where[head] / rest if head in where else Path(out)
    before = _tree(tmp_path)
    assert cli_main(["report", str(work), "--probe", str(probe), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert _tree(tmp_path) == before
    assert not (work / "runs" / "cmp").exists() and not Path("/sys/probsft-report-test").exists()


def test_out_may_be_a_new_folder_inside_a_run_or_an_earlier_report(tmp_path, base_config):
    """What stays allowed: the default RUN/report (again and again), a new folder of its own
    inside a run, and an earlier report's folder (its own files are replaced)."""
    run = make_run(tmp_path, "r", base_config, "p", 1, evals={"figfont": {"avg@n": 0.5}})
    for _ in range(2):
        report = rp.build_report([run], figures=False)
        assert report["out_dir"] == str(run / "report")
    assert rp.build_report([run], run / "cmp", figures=False)["runs"][0]["status"] == "complete"
    (run / "report" / "curves.png").write_bytes(PNG)  # not listed by the earlier report
    with pytest.raises(ConfigError, match="holds curves.png"):
        rp.build_report([run], run / "report")


def test_library_error_type(tmp_path):
    with pytest.raises(ConfigError, match="no PATH given"):
        rp.build_report([], tmp_path / "out")


def test_without_matplotlib_the_tables_still_come(tmp_path, base_config, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    run = make_run(tmp_path, "r", base_config, "p", 1, evals={"figfont": {"avg@n": 0.5}})
    report = rp.build_report([run], tmp_path / "out")
    assert report["figures"] == [] and not list((tmp_path / "out").glob("*.png"))
    hint = "no figures: matplotlib is not installed (pip install 'probsft-megatron[train]')"
    assert hint in report["notes"]
    assert "| `p` | n=1 | 50.0 | 1 complete |" in (tmp_path / "out" / "report.md").read_text()
    # the command is not refused for it (matplotlib's extra is optional for `report`)
    assert "matplotlib" in extras.EXTRA_MODULES[extras.OPTIONAL_EXTRAS["report"]]
    assert extras.missing_module("report") is None
    assert cli_main(["report", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert f"note: {hint}" in capsys.readouterr().out
    assert (tmp_path / "cli" / "report.json").is_file()


def _math_run(
    root: Path, name: str, base: dict, seed: int, samples: list[dict], lr: float = 1e-3, **metrics
) -> Path:
    evals = {"math500": {"avg@n": 0.25, **metrics}}
    run = make_run(root, name, base, "p", seed, evals=evals, optim__lr=lr)
    path = run / "eval" / "math500" / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in samples))
    return run


def test_boxed_rate_from_the_summary_then_the_sources_then_extracted(tmp_path, base_config):
    """math: the eval summary's `boxed` metric when present; else samples whose `source` is
    "boxed" (an answer statement does not count); samples without `source` (older evals):
    any extracted answer, labelled as such."""
    rows = [
        {"extracted": ["1", "2"], "source": ["boxed", "statement"], "correct": [1, 0]},
        {"extracted": ["3", None], "source": ["boxed", None], "correct": [0, 0]},
    ]
    old_rows = [{k: v for k, v in r.items() if k != "source"} for r in rows]
    runs = tmp_path / "runs"
    summary = _math_run(runs, "summary", base_config, 1, rows, boxed=0.75)
    sources = _math_run(runs, "sources", base_config, 2, rows)
    older = _math_run(tmp_path / "older", "older", base_config, 1, old_rows, lr=1e-4)
    report = rp.build_report([summary, sources, older], tmp_path / "out", figures=False)
    by = {r["name"]: r["eval"]["math500"] for r in report["runs"]}
    assert by["summary"]["metrics"]["boxed_rate"] == 0.75
    assert by["sources"]["metrics"]["boxed_rate"] == 0.5  # 2 of 4 sources are "boxed"
    assert by["older"]["metrics"]["boxed_rate"] == 0.75  # 3 of 4 extracted
    assert [by[n]["boxed_basis"] for n in ("summary", "sources", "older")] == [
        "boxed",
        "boxed",
        "extracted",
    ]
    details = {g["runs"][0]: g["details"]["math500"] for g in report["groups"]}
    assert details["summary"]["boxed_rate"]["values"] == [0.75, 0.5]  # seeds 1 and 2
    assert details["summary"]["boxed_basis"] == ["boxed"]
    assert details["older"]["boxed_basis"] == ["extracted"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 62.5 ± 158.8 |" in md and "| 75.0 (extracted) |" in md
    # a figfont task has no boxed rate, whatever its samples hold
    fig = make_run(tmp_path, "fig", base_config, "p", 1, evals={"figfont": {"avg@n": 0.5}})
    assert "boxed_rate" not in rp.read_run(fig)["eval"]["figfont"]["metrics"]


def test_not_started_run_joins_its_seeds(tmp_path, base_config):
    """The config of a run that has not started is the one its run record holds, with the
    model of the checkpoint it starts from (float32-rounded values included), so it lands
    in its seed group; an experiment folder without a run record is one note."""
    model = dict(
        base_config["model"], rms_norm_eps=float(np.float32(1e-5)), max_position_embeddings=4096
    )  # the converted backbone's, not the preset's
    backbone = tmp_path / "work" / "models" / "tiny-llama"
    backbone.mkdir(parents=True)
    (backbone / "model_config.json").write_text(json.dumps({"model": model}))
    work = tmp_path / "work"
    make_run(
        work / "runs",
        "p-s1",
        dict(base_config, model=model),
        "p",
        1,
        evals={"figfont": {"avg@n": 0.5}},
        init__checkpoint=str(backbone),
    )
    overrides = ["loss.objective=p", "train.max_steps=30", "train.seed=2"]
    record_run(work, "p-s2", "tiny-figfont-cpu", [*overrides, f"init.checkpoint={backbone}"], None)
    old = work / "experiments" / "t" / "t_1795000000000000000"
    (old / "train-x" / "configs").mkdir(parents=True)  # NeMo-Run's files, no run record
    report = rp.build_report([work], tmp_path / "out", figures=False)
    (group,) = report["groups"]
    assert group["runs"] == ["p-s1", "p-s2"] and group["seeds"] == [1, 2]
    assert group["statuses"] == {"complete": 1, "not started": 1}
    (note,) = [n for n in report["notes"] if "predates run records" in n]
    assert note.startswith(f"{old} predates run records")
    # negative control: without the checkpoint's model the planned run is a group of its own
    (backbone / "model_config.json").unlink()
    report = rp.build_report([work], tmp_path / "out2", figures=False)
    assert len(report["groups"]) == 2


def test_slurm_launch_record_gives_logs_and_submission_errors(tmp_path):
    """`probsft_experiment.json` (SLURM launches): the caller passes job states only; the
    failed step's error comes from its srun log; a failed submission fails its runs."""
    work = tmp_path / "work"
    exps = work / "experiments" / "t"
    for exp_id, status, run, error in (
        ("t_1796000000000000001", "submitted", "r1", None),
        (
            "t_1796000000000000002",
            "failed",
            "r2",
            "sbatch: error: invalid partition specified: gpu",
        ),
    ):
        exp = exps / exp_id
        logs = exp / f"train-{run}"
        logs.mkdir(parents=True)
        steps = [
            {
                "name": f"{kind}-{run}",
                "kind": kind,
                "after": [],
                "job_id": job,
                "job_name": f"probsft-{kind}-{run}",
                "log_dir": str(exp / f"{kind}-{run}"),
            }
            for kind, job in (("train", "40"), ("export", "41"), ("eval", "42"))
        ]
        (exp / "probsft_experiment.json").write_text(
            json.dumps(
                {
                    "title": "t",
                    "exp_id": exp_id,
                    "exp_dir": str(exp),
                    "status": status,
                    "steps": steps,
                    "runs": {
                        run: {
                            "run_dir": str(work / "runs" / run),
                            "recipe": "tiny-figfont-cpu",
                            "objective": "original",
                            "config": {"train": {"max_steps": 3}},
                        }
                    },
                    "error": error,
                }
            )
        )
    (exps / "t_1796000000000000001" / "train-r1" / "log-probsft-train-r1_40_0.out").write_text(
        "[default0]:error: training file /data/train.jsonl does not exist (data.train_files)\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    )
    report = rp.build_report(
        [work],
        tmp_path / "out",
        figures=False,
        step_states={"train-r1": "FAILED", "export-r1": "CANCELLED"},
    )
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["r1"]["status"] == "failed"
    assert runs["r1"]["status_detail"] == (
        "train step failed: error: training file "
        "/data/train.jsonl does not exist (data.train_files)"
    )
    assert runs["r2"]["status"] == "failed"
    assert runs["r2"]["status_detail"] == (
        "train step failed: submission failed: sbatch: error: invalid partition specified: gpu"
    )


# ------------------------------------------------------------------------ real tiny runs


@pytest.fixture(scope="session")
def real_work(tmp_path_factory, smollm2_hf) -> Path:
    """The local launch chain (train 3 steps -> export -> vLLM eval of 4 items) for
    `original`, and two seeds of `p` trained with `probsft train` into the same work
    directory, all three at once (single processes, ~2-3 minutes on 2 cores)."""
    tokenizer = smollm2_hf
    root = tmp_path_factory.mktemp("report-real")
    work = root / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = ["train.max_steps=3", "train.tensorboard=false", f"init.tokenizer={tokenizer}"]
    cli = [sys.executable, "-m", "probsft_megatron.cli"]
    procs = [
        subprocess.Popen(
            [
                *cli,
                "launch",
                "--dataset",
                "figfont",
                "--model",
                "tiny-llama",
                "--objective",
                "original",
                "--nproc",
                "1",
                "--work-dir",
                str(work),
                "--set",
                *common,
                "--eval-args",
                "--limit 4 --max-new-tokens 4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=root,
        )
    ]
    for seed in (1, 2):
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "train",
                    "--config",
                    "tiny-figfont-cpu",
                    "loss.objective=p",
                    *common,
                    f"train.seed={seed}",
                    f"train.output_dir={work / 'runs' / f'figfont-p-s{seed}'}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=root,
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    return work


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_report_of_real_runs(real_work, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "probsft_megatron.cli", "report", str(real_work), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"figfont-tiny-llama-original", "figfont-p-s1", "figfont-p-s2"}
    launched = runs["figfont-tiny-llama-original"]
    assert launched["status"] == "complete" and launched["recipe"] == "tiny-figfont-cpu"
    assert {k: s["state"] for k, s in launched["steps"].items()} == {
        "train": "SUCCEEDED",
        "export": "SUCCEEDED",
        "eval": "SUCCEEDED",
    }
    assert runs["figfont-p-s1"]["status"] == "trained"
    assert runs["figfont-p-s1"]["model"] == "tiny-llama"

    # the two seeds of p are one group; its statistics recompute from metrics.jsonl
    (pg,) = [g for g in report["groups"] if g["label"] == "p"]
    assert pg["runs"] == ["figfont-p-s1", "figfont-p-s2"] and pg["seeds"] == [1, 2]
    tails = [
        np.mean([h["mean_p"] for h in _jsonl(real_work / "runs" / n / "metrics.jsonl")])
        for n in pg["runs"]
    ]
    assert pg["training"]["mean_p"]["mean"] == pytest.approx(np.mean(tails), rel=1e-12)
    assert pg["training"]["mean_p"]["half_width"] == pytest.approx(
        rp.t_quantile(0.95, 1) * np.std(tails, ddof=1) / math.sqrt(2), rel=1e-9
    )
    assert pg["training"]["steps"] == [3, 3] and pg["cells"] == {}

    # the launched run's cell recomputes from its samples
    (og,) = [g for g in report["groups"] if g["label"] == "original"]
    samples = _jsonl(
        real_work / "runs" / "figfont-tiny-llama-original" / "eval" / "figfont" / "samples.jsonl"
    )
    assert len(samples) == 4
    acc = np.mean([np.mean(s["correct"]) for s in samples])
    score = np.mean([np.mean(s["scores"]) for s in samples])
    assert og["cells"]["figfont"]["mean"] == pytest.approx(acc)
    assert og["details"]["figfont"]["mean_score"]["mean"] == pytest.approx(score)
    assert og["details"]["figfont"]["problems"] == [4]

    md = (out / "report.md").read_text()
    assert f"| `original` | n=1 | {100 * acc:.1f} | 1 complete |" in md
    assert "| `p` | n=2 |" in md and "**trained**: not evaluated" in md
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert "report: " in proc.stdout
