"""The main job under test: ``python -m probsft_megatron.demo`` end to end at size ``smoke``.

The demo's whole pipeline runs as a user runs it (every stage its own process): convert the
embedded SmolLM2-135M-Instruct to Megatron, export it to Hugging Face, probe it, fine-tune it
with NLL and with -p (2 steps each), export both, evaluate all three with vLLM on CPU and
write the report. A change that breaks any stage or the way the stages fit together fails
here. The numbers of a 2-step run mean nothing, so the test asserts what holds at any size:
finite losses that fall, every stage and report row present, exact-match scores that are
what the per-sample files say; then a rerun reuses every stage and reproduces its own report
(:func:`probsft_megatron.demo.compare`), and a doctored reference is caught (negative
control). The bad-input tests are fast: a wrong ``--out`` is refused before any stage.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from probsft_megatron import demo

STAGES = [
    "convert",
    "export-base",
    "probe",
    "train-original",
    "export-original",
    "train-p",
    "export-p",
    "eval-base",
    "eval-original",
    "eval-p",
]


def _demo(out: Path, *extra: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "probsft_megatron.demo", "--size", "smoke", "--out", str(out)]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, smollm2_hf) -> Path:
    """One smoke-size demo (SmolLM2's Hugging Face copy comes from the session fixture, so
    the convert stage converts and does not de-quantize)."""
    out = tmp_path_factory.mktemp("demo") / "smoke"
    proc = _demo(out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "[demo] finished" in proc.stdout
    return out


@pytest.mark.slow
def test_smoke_demo_runs_every_stage_and_reports(smoke):
    report = json.loads((smoke / "report.json").read_text())
    assert list(report["stage_seconds"]) == STAGES
    assert report["settings"]["size"] == "smoke"
    n_train = report["settings"]["train_examples"]
    n_test = report["settings"]["test_examples"]

    # the base model was exported beside its model dir, not inside it
    model_dir, hf_base = smoke / "smollm2-megatron", smoke / "smollm2-hf"
    assert (model_dir / "model_config.json").is_file() and (hf_base / "config.json").is_file()
    assert not hf_base.is_relative_to(model_dir)

    # training: every step finite, the loss falls and mean p rises over the run
    for obj in demo.OBJECTIVES:
        summary = json.loads((smoke / "runs" / obj / "summary.json").read_text())
        history = summary["history"]
        assert summary["objective"] == obj
        assert len(history) == summary["steps"] == n_train // 16 == report["final"][obj]["step"]
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["mean_p"]) for h in history)
        assert history[-1]["loss"] < history[0]["loss"], history
        assert history[-1]["mean_p"] > history[0]["mean_p"], history
        assert report["final"][obj]["loss"] == history[-1]["loss"]
        assert (smoke / "runs" / obj / "hf" / "config.json").is_file()

    # evaluation: the report's scores are what the per-sample files say
    for name in ("base", *demo.OBJECTIVES):
        (samples_file,) = (smoke / "eval" / name).glob("*/samples.jsonl")
        rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert len(rows) == n_test
        correct = [bool(r["correct"][0]) for r in rows]
        assert report["correct"][name] == correct
        assert 0.0 <= report["accuracy"][name] == sum(correct) / n_test <= 1.0
        assert all(len(r["completions"]) == 1 and r["completions"][0] for r in rows)
    probe = report["probe"]
    assert 0.0 < probe["mean_p"] < 1.0 and 0.0 < probe["median_p"] <= 1.0
    assert probe["placement"]["regime"] in ("model-strong", "model-weak", "intermediate")

    md = (smoke / "report.md").read_text()
    assert "| base | - | - | - |" in md
    for obj in demo.OBJECTIVES:
        last = report["final"][obj]
        assert f"| {obj} | {last['step']} | {last['loss']:.4f} |" in md
    assert "## Reproducing this report" in md and "| **total** |" in md
    assert (smoke / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(smoke.glob(".*")), "temporary files left behind"


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_reproduces_its_report(smoke, tmp_path):
    """A rerun with the same settings starts no stage again and, compared with the first
    run's report, reproduces it; a reference that differs beyond the tolerances is reported
    (exit 1) with what differs."""
    reference = tmp_path / "reference.json"
    reference.write_text((smoke / "report.json").read_text())
    proc = _demo(smoke, "--compare", str(reference), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for stage in STAGES:
        assert f"[demo] {stage}: reusing" in proc.stdout
    assert f"reproduces {reference}" in proc.stdout

    report = json.loads(reference.read_text())
    assert demo.compare(report, report) == []
    doctored = copy.deepcopy(report)
    doctored["final"]["p"]["loss"] += 2 * demo.TOLERANCE["loss"]
    flips = demo.TOLERANCE["flipped_answers"] + 1
    doctored["correct"]["original"] = [True] * flips + [False] * (
        len(doctored["correct"]["original"]) - flips
    )
    report["correct"]["original"] = [not c for c in doctored["correct"]["original"]]
    problems = demo.compare(report, doctored)
    assert len(problems) == 2, problems
    assert problems[0].startswith("p final loss") and "original: " in problems[1]
    doctored = copy.deepcopy(report)
    doctored["final"]["p"]["loss"] += 0.5 * demo.TOLERANCE["loss"]
    assert demo.compare(report, doctored) == []


def _refused(capsys, argv: list[str]) -> str:
    assert demo.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_out_is_refused_before_any_stage(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    err = _refused(capsys, ["--size", "smoke", "--out", str(notes)])
    assert "holds other files, not a demo folder" in err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]

    (tmp_path / "file").write_text("x")
    err = _refused(capsys, ["--out", str(tmp_path / "file")])
    assert "is a file, not a folder" in err

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    settings = {"size": "smoke", "lr": 2e-5, "seed": 0, **demo.SIZES["smoke"]}
    (earlier / demo.SETTINGS_FILE).write_text(json.dumps(settings))
    err = _refused(capsys, ["--size", "full", "--out", str(earlier)])
    assert "holds a demo made with other settings (size smoke -> full" in err
    assert sorted(p.name for p in earlier.iterdir()) == [demo.SETTINGS_FILE]

    err = _refused(capsys, ["--out", str(tmp_path / "new"), "--compare", str(notes / "todo.txt")])
    assert "cannot be read as JSON" in err and not (tmp_path / "new").exists()
    err = _refused(capsys, ["--out", str(tmp_path / "new"), "--test-examples", "0"])
    assert "--test-examples 0 must be at least 1" in err
