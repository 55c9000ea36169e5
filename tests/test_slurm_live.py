"""`probsft launch --executor slurm` against a live two-node SLURM cluster.

The cluster is the project's own (``scripts/slurm_cluster.sh start``: slurmctld, two slurmd
``n1`` and ``n2`` on this machine, slurmdbd with mariadb for ``sacct``); ``.ci/run`` starts
it before the tests, and the fixture below starts it when it is not running. The tests skip,
with the reason, where it cannot run (not root, no SLURM and no apt-get, a start that fails).

What they prove, each through the real command line and SLURM's own accounting:
* rendered sbatch scripts (CPU profile, ``exclusive: true``, the warning signal) pass
  ``sbatch --test-only``, and the renderings that used to break (``--exclusive=False``, a GPU
  request on a CPU partition) are refused by the same check;
* the whole chain convert -> train (2 nodes x 1 process, torchrun across the nodes) ->
  export -> eval runs through NeMo-Run's SlurmExecutor: every job COMPLETED in ``sacct``,
  each started after the job it waits for ended, the training log shows both nodes' ranks in
  a world of size 2 and no traceback, and the eval summary recomputes from its samples;
* a failing train step: export and eval never run, the command and ``status`` exit non-zero
  and name the failed step with its log tail, ``logs`` prints it;
* ``cancel`` ends a queued experiment; a submission that sbatch refuses prints sbatch's own
  message on one line and marks the experiment failed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
RECORD = "probsft_experiment.json"
TINY = [
    "launch",
    "--dataset",
    "figfont",
    "--model",
    "tiny-llama",
    "--objective",
    "p",
    "--executor",
    "slurm",
    "--profile",
    "local-cpu",
]
TRAIN_SET = ["train.max_steps=2", "train.tensorboard=false", "train.save_interval=2"]

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def cluster() -> None:
    """The local two-node cluster, running; skips with the reason when it cannot run."""
    if os.geteuid() != 0:
        pytest.skip(
            "the live SLURM tests need root: scripts/slurm_cluster.sh installs and "
            "starts munge, mariadb, slurmdbd, slurmctld and two slurmd"
        )
    if shutil.which("sinfo") is None and shutil.which("apt-get") is None:
        pytest.skip("no SLURM client commands and no apt-get to install them")
    try:
        proc = subprocess.run(
            ["bash", str(SCRIPT), "start"],
            capture_output=True,
            text=True,
            timeout=900,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/slurm_cluster.sh start did not finish within 15 minutes")
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"scripts/slurm_cluster.sh start failed (rc={proc.returncode}): {last}")


def _env() -> dict[str, str]:
    return dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false"
    )


def _probsft(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "probsft_megatron.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _exp_dir(proc: subprocess.CompletedProcess) -> Path:
    match = re.search(r"experiment record and logs: (\S+)", proc.stdout)
    assert match, (proc.stdout + proc.stderr)[-4000:]
    return Path(match.group(1))


def _sacct(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Job id -> sacct's fields of the job allocation (accounting, not the launcher's view)."""
    fields = ["JobIDRaw", "JobName", "State", "Start", "End", "NodeList", "ExitCode"]
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [dict(zip(fields, line.split("|"), strict=True)) for line in proc.stdout.splitlines()]
    return {r["JobIDRaw"]: r for r in rows}


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _record(exp_dir: Path) -> dict:
    return json.loads((exp_dir / RECORD).read_text())


def _log(step: dict) -> Path:
    (path,) = Path(step["log_dir"]).glob(f"log-{step['job_name']}_{step['job_id']}_*.out")
    return path


# ---------------------------------------------------------------- rendered scripts, sbatch
def test_sbatch_accepts_the_rendered_scripts(cluster, tmp_path):
    profile = tmp_path / "cpu.yaml"
    shipped = (REPO / "configs" / "clusters" / "local-cpu.yaml").read_text()
    profile.write_text(shipped + "exclusive: true\ncpus_per_task: 1\nsignal: USR1@60\n")
    proc = _probsft(
        [
            *TINY[:-2],
            "--profile",
            str(profile),
            "--work-dir",
            str(tmp_path / "w"),
            "--set",
            *TRAIN_SET,
            "--dryrun",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = sorted((tmp_path / "w" / "experiments").rglob("*_sbatch.sh"))
    assert [s.name.split("-")[0] for s in scripts] == ["eval", "export", "train"]
    for script in scripts:
        text = script.read_text()
        assert "--gpus-per-node" not in text and "#SBATCH --exclusive\n" in text
        assert ("#SBATCH --signal=USR1@60" in text) == script.name.startswith("train")
        check = subprocess.run(
            ["sbatch", "--test-only", str(script)], capture_output=True, text=True
        )
        assert check.returncode == 0, f"{script.name}: {check.stderr}"
        assert "to start at" in check.stderr
    train = scripts[-1].read_text()
    # the renderings of the old profile code, refused by the same check
    for bad, message in (
        ("#SBATCH --exclusive=False", "Invalid --exclusive specification"),
        ("#SBATCH --gpus-per-node=1", "Invalid generic resource"),
    ):
        broken = tmp_path / "broken.sh"
        broken.write_text(train.replace("#SBATCH --exclusive\n", bad + "\n"))
        check = subprocess.run(
            ["sbatch", "--test-only", str(broken)], capture_output=True, text=True
        )
        assert check.returncode != 0 and message in check.stderr, check.stderr


def test_rejected_submission_is_one_line_and_marked_failed(cluster, tmp_path):
    profile = tmp_path / "nopart.yaml"
    profile.write_text(
        (REPO / "configs" / "clusters" / "local-cpu.yaml")
        .read_text()
        .replace("partition: cpu", "partition: no-such-partition")
    )
    proc = _probsft(
        [
            *TINY[:-2],
            "--profile",
            str(profile),
            "--work-dir",
            str(tmp_path / "w"),
            "--set",
            *TRAIN_SET,
        ],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "sbatch refused the job of step train-figfont-tiny-llama-p" in err[0]
    assert "invalid partition specified: no-such-partition" in err[0]
    (record_path,) = (tmp_path / "w" / "experiments").rglob(RECORD)
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed" and "invalid partition" in record["error"]
    assert all(s["job_id"] is None for s in record["steps"])
    status = _probsft(["launch", "status", str(record_path.parent)], tmp_path)
    assert status.returncode == 1 and "submission failed: sbatch: error" in status.stdout


# ---------------------------------------------------------------- the whole chain
@pytest.fixture(scope="module")
def hf_backbone(tmp_path_factory, smollm2_hf) -> Path:
    """A random Hugging Face Llama with the tiny-llama preset's shape and SmolLM2's tokenizer."""
    from mp.tiny_hf import tiny_hf_checkpoint

    tokenizer = smollm2_hf
    out = tiny_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "tiny-llama",
        "deepseek",
        seed=3,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    )
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy2(f, out / f.name)
    return out


@pytest.mark.slow
def test_whole_chain_on_two_nodes(cluster, hf_backbone, tmp_path):
    from probsft_megatron.eval.graders import grade_jaro_winkler

    work = tmp_path / "work"
    start = time.perf_counter()
    proc = _probsft(
        [
            *TINY,
            "--hf",
            str(hf_backbone),
            "--work-dir",
            str(work),
            "--set",
            *TRAIN_SET,
            "--eval-args",
            "--limit 2 --max-new-tokens 4",
        ],
        tmp_path,
        timeout=1800,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    exp_dir = _exp_dir(proc)
    steps = _record(exp_dir)["steps"]
    assert [s["kind"] for s in steps] == ["convert", "train", "export", "eval"]
    # the progress display saw every job end
    for s in steps:
        assert re.search(rf"{re.escape(s['name'])}\s+job\s+{s['job_id']}\s+COMPLETED", output)

    acct = _sacct([s["job_id"] for s in steps])
    by_name = {s["name"]: s for s in steps}
    for s in steps:
        row = acct[s["job_id"]]
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", row
        assert row["JobName"] == f"probsft-{s['name']}"
        for dep in s["after"]:
            assert _time(row["Start"]) >= _time(acct[by_name[dep]["job_id"]]["End"]), (s, dep)
    train = next(s for s in steps if s["kind"] == "train")
    assert acct[train["job_id"]]["NodeList"] == "n[1-2]"

    # torchrun on both nodes (srun task i runs on the job's node i: n1, n2), one world of 2
    log = _log(train).read_text()
    ranks = dict(re.findall(r"^(\d+): .*\] +global_ranks=\[(\d+)\]", log, re.M))
    sizes = set(re.findall(r"^\d+: .*\] +global_world_sizes=\[(\d+)\]", log, re.M))
    assert sorted(ranks) == ["0", "1"] and sorted(ranks.values()) == ["0", "1"], log[-3000:]
    assert sizes == {"2"}
    assert "Traceback" not in log and "frame #" not in log, log[-3000:]

    run_dir = work / "runs" / "figfont-tiny-llama-p"
    assert (work / "models" / "tiny-llama" / "model_config.json").is_file()
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
    export = json.loads((run_dir / "hf" / "probsft_export.json").read_text())
    assert export["step"] == 2 and export["checkpoint"].endswith("step_0000002")
    assert (run_dir / "hf" / "config.json").is_file()
    (summary,) = json.loads((run_dir / "eval" / "summary.json").read_text())
    samples = [
        json.loads(line)
        for line in (run_dir / "eval" / "figfont" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == summary["metrics"]["problems"] == 2
    scores = [grade_jaro_winkler(s["completions"][0], s["reference"]).score for s in samples]
    assert [s["scores"][0] for s in samples] == pytest.approx(scores)
    assert summary["metrics"]["mean_score"] == pytest.approx(sum(scores) / 2)
    assert summary["metrics"]["exact"] == pytest.approx(
        sum(s["completions"][0] == s["reference"] for s in samples) / 2
    )
    assert f"figfont-tiny-llama-p: ok {run_dir / 'eval' / 'summary.json'}" in proc.stdout
    assert f"report: probsft report {work} (writes {work / 'report' / 'report.md'}" in proc.stdout
    print(f"live chain: {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- failure, status, logs, cancel
@pytest.mark.slow
def test_failed_train_step_stops_the_chain(cluster, tmp_path):
    work = tmp_path / "work"
    missing = tmp_path / "no-such-train.jsonl"
    proc = _probsft(
        [
            *TINY,
            "--work-dir",
            str(work),
            "--set",
            *TRAIN_SET,
            "data.source=file",
            f"data.train_files=[{missing}]",
        ],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    exp_dir = _exp_dir(proc)
    steps = {s["kind"]: s for s in _record(exp_dir)["steps"]}
    acct = _sacct([s["job_id"] for s in steps.values()])
    assert acct[steps["train"]["job_id"]]["State"] == "FAILED"
    for kind in ("export", "eval"):  # cancelled by SLURM before they ever started
        row = acct[steps[kind]["job_id"]]
        assert row["State"] == "CANCELLED" and row["Start"] in ("None", "Unknown"), row
        assert not list(Path(steps[kind]["log_dir"]).glob("log-*.out"))
    assert not (work / "runs" / "figfont-tiny-llama-p" / "hf").exists()
    assert f"data.train_files: {missing} does not exist" in proc.stdout  # the log tail
    assert "error: experiment figfont-tiny-llama-p" in proc.stderr

    status = _probsft(["launch", "status", str(exp_dir)], tmp_path)
    assert status.returncode == 1
    assert re.search(r"step train-figfont-tiny-llama-p \(job \d+\) ended FAILED", status.stdout)
    assert f"data.train_files: {missing} does not exist" in status.stdout
    assert (
        "never ran (cancelled while waiting for their turn): export-figfont-tiny-llama-p, "
        "eval-figfont-tiny-llama-p" in status.stdout
    )
    # the runs report of the work directory, built with the jobs' states
    # (the run that failed before writing anything is grouped by the objective its launch
    # record names)
    assert re.search(r"^\| `p` \| n=1 \| 1 failed \|$", status.stdout, re.M), status.stdout[-2000:]
    assert f"report: {work / 'report' / 'report.md'}" in status.stdout
    assert (work / "report" / "report.json").is_file()
    row = next(ln for ln in status.stdout.splitlines() if ln.startswith("train-"))
    assert str(_log(steps["train"])) in row and " FAILED " in row
    logs = _probsft(
        [
            "launch",
            "logs",
            "figfont-tiny-llama-p",
            "train",
            "--work-dir",
            str(work),
            "--lines",
            "5",
        ],
        tmp_path,
    )
    head, *rows = logs.stdout.splitlines()
    assert logs.returncode == 0 and head.startswith(f"==> {steps['train']['name']} (job ")
    assert rows == _log(steps["train"]).read_text().splitlines()[-5:]
    logs = _probsft(["launch", "logs", str(exp_dir), "train", "--lines", "1000"], tmp_path)
    assert f"data.train_files: {missing} does not exist" in logs.stdout


def test_cancel_a_queued_experiment(cluster, tmp_path):
    work = tmp_path / "work"
    proc = _probsft([*TINY, "--work-dir", str(work), "--set", *TRAIN_SET, "--detach"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp_dir = _exp_dir(proc)
    ids = [s["job_id"] for s in _record(exp_dir)["steps"]]
    cancel = _probsft(["launch", "cancel", str(exp_dir)], tmp_path)
    assert cancel.returncode == 0 and f"cancelled jobs {', '.join(ids)}" in cancel.stdout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = {r["State"].split()[0] for r in _sacct(ids).values()}
        if states == {"CANCELLED"}:
            break
        time.sleep(1)
    assert states == {"CANCELLED"}
    status = _probsft(["launch", "status", str(exp_dir)], tmp_path)
    rows = [
        ln for ln in status.stdout.splitlines() if ln.startswith(("train-", "export-", "eval-"))
    ]
    assert status.returncode == 1 and [r.split()[2] for r in rows] == ["CANCELLED"] * 3
    again = _probsft(["launch", "cancel", str(exp_dir)], tmp_path)
    assert again.returncode == 0 and "no job left to cancel" in again.stdout


# ---------------------------------------------------------------- preemption: signal, requeue
def _train_args(exp_dir: Path) -> list[str]:
    """The training arguments of the experiment's train job (from its sbatch script)."""
    (script,) = exp_dir.glob("train-*_sbatch.sh")
    (srun,) = [ln for ln in script.read_text().splitlines() if ln.startswith("srun ")]
    return shlex.split(srun.partition(" -m probsft_megatron.train ")[2])


@pytest.mark.slow
def test_signalled_train_job_requeues_and_resumes_bit_exact(cluster, tmp_path):
    """`scancel --signal=USR1` (what the profile's warning signal sends before the time
    limit) to a running 2-node train job: training finishes its step, saves, exits 75; the
    batch script requeues the job, which resumes from that checkpoint and ends with weights
    and optimizer state bit-identical to an uninterrupted run of the same command."""
    from test_resilience import _assert_identical, _flat_state

    steps_n = 12
    work = tmp_path / "work"
    sets = [
        f"train.max_steps={steps_n}",
        "train.tensorboard=false",
        "train.save_interval=100",
        "train.histogram_interval=0",
    ]
    start = time.perf_counter()
    proc = _probsft([*TINY, "--work-dir", str(work), "--set", *sets, "--detach"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp_dir = _exp_dir(proc)
    steps = {s["kind"]: s for s in _record(exp_dir)["steps"]}
    job = steps["train"]["job_id"]
    run_dir = work / "runs" / "figfont-tiny-llama-p"
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            state = _sacct([job]).get(job, {}).get("State", "")
            assert state in ("", "PENDING", "RUNNING"), f"train job {state} before step 2"
            assert time.monotonic() < deadline, "train job logged no 2 steps in 600 s"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)

        # the reference while the job waits to be requeued: the same training command on
        # this machine, 2 processes, uninterrupted
        ref = tmp_path / "ref"
        args = [
            a if not a.startswith("train.output_dir=") else f"train.output_dir={ref}"
            for a in _train_args(exp_dir)
        ]
        done = _probsft(["train", "--nproc", "2", *args], tmp_path, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

        deadline = time.monotonic() + 600
        while (state := _sacct([job])[job]["State"].split()[0]) != "COMPLETED":
            assert state in ("PENDING", "RUNNING", "REQUEUED"), state
            assert time.monotonic() < deadline, f"train job still {state} after 600 s"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", *(s["job_id"] for s in steps.values())], capture_output=True)
    elapsed = time.perf_counter() - start

    # the first run stopped on the signal with a checkpoint and requeued its job
    log_dir = Path(steps["train"]["log_dir"])
    first, second = (log_dir / f"log-{steps['train']['job_name']}_{job}_{r}.out" for r in (0, 1))
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["interrupted", "resumed"], events
    k = events[0]["step"]
    assert 2 <= k < steps_n and events[0]["by"] == "SIGUSR1 on ranks 0, 1"
    assert events[1]["step"] == k
    text = first.read_text()
    assert f"interrupted at step {k} (SIGUSR1 on ranks 0, 1)" in text, text[-3000:]
    assert "resume with the same command" in text and "Traceback" not in text
    batch = (log_dir / f"sbatch_{steps['train']['job_name']}_{job}.out").read_text()
    assert f"requeueing job {job}" in batch and "job exited with code 75" in batch
    text = second.read_text()
    assert "resumed from" in text and "Traceback" not in text, text[-3000:]
    history = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert history == ["REQUEUED", "COMPLETED"], history

    # nothing lost but the interrupted step's time: the end is the uninterrupted run's
    last = f"step_{steps_n:07d}"
    tensors = _assert_identical(
        _flat_state(run_dir / "checkpoints" / last, tmp_path),
        _flat_state(ref / "checkpoints" / last, tmp_path),
    )
    assert tensors >= 10
    got, want = (
        {
            json.loads(ln)["step"]: json.loads(ln)
            for ln in (d / "metrics.jsonl").read_text().splitlines()
        }
        for d in (run_dir, ref)
    )
    assert sorted(got) == sorted(want) == list(range(1, steps_n + 1))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    print(
        f"live requeue: interrupted at step {k}, resumed, {tensors} tensors bit-identical; "
        f"{elapsed:.0f} s"
    )


@pytest.mark.slow
def test_train_job_launched_twice_one_refuses(cluster, tmp_path):
    """The same train job submitted twice (sbatch, one output folder, both running at once
    on the oversubscribed partition): one trains to the end, the other exits 2 at once with
    one line naming the first's SLURM job; SLURM's own view of the holder's job (squeue)
    is what the lock reads for a holder on another host."""
    from probsft_megatron import run_lock

    out = tmp_path / "run"
    train = [
        sys.executable,
        "-m",
        "probsft_megatron.cli",
        "train",
        "--config",
        "tiny-figfont-cpu",
        f"train.output_dir={out}",
        "train.max_steps=8",
        "train.tensorboard=false",
        "train.histogram_interval=0",
    ]
    command = " ".join(shlex.quote(a) for a in train)
    jobs = []
    for name in ("first", "second"):
        proc = subprocess.run(
            [
                "sbatch",
                "--parsable",
                f"--job-name=lock-{name}",
                "--nodes=1",
                "--ntasks=1",
                "--oversubscribe",
                f"--output={tmp_path / name}.out",
                f"--chdir={REPO}",
                f"--wrap={command}",
            ],
            capture_output=True,
            text=True,
            env=_env(),
            check=True,
        )
        jobs.append(proc.stdout.strip().split(";")[0])
    try:
        deadline = time.monotonic() + 600
        seen_running = False
        while True:
            states = {j: _sacct([j]).get(j, {}).get("State", "").split(" ")[0] for j in jobs}
            running = [j for j, s in states.items() if s == "RUNNING"]
            if running and not seen_running and (out / "run.lock").is_file():
                holder = run_lock.parse((out / "run.lock").read_text())
                if holder is not None and holder.slurm_job_id in running:
                    assert run_lock.slurm_job_state(holder.slurm_job_id) == "RUNNING"
                    seen_running = True
            if all(s in run_lock.SLURM_ENDED for s in states.values() if s) and all(
                states.values()
            ):
                break
            assert time.monotonic() < deadline, f"jobs not done after 600 s: {states}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)
    rows = _sacct(jobs)
    done = {rows[j]["JobName"].removeprefix("lock-"): rows[j] for j in jobs}
    by_state = sorted((r["State"].split(" ")[0], r["ExitCode"]) for r in done.values())
    assert by_state == [("COMPLETED", "0:0"), ("FAILED", "2:0")], done
    winner = next(j for j in jobs if rows[j]["State"].startswith("COMPLETED"))
    loser = next(j for j in jobs if j != winner)
    loser_log = (tmp_path / f"{rows[loser]['JobName'].removeprefix('lock-')}.out").read_text()
    errors = [ln for ln in loser_log.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in loser_log, loser_log[-3000:]
    assert "is in use by another training run: pid " in errors[0], errors[0]
    assert f", SLURM job {winner}, started " in errors[0], errors[0]
    assert "train:" not in loser_log  # it trained no step
    metrics = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == list(range(1, 9))  # one writer
    assert (out / "summary.json").is_file() and not (out / "run.lock").exists()
    assert run_lock.slurm_job_state(winner) in run_lock.SLURM_ENDED
    assert seen_running, "the lock's holder was never seen running"
    print(f"job {loser} refused while job {winner} trained; {errors[0]}")
