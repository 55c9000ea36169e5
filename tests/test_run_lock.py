"""One training run per output folder (``probsft_megatron.run_lock``).

* The lock's decisions, on real processes: a live holder on this host refuses (and a reused
  pid does not count as the holder), a dead one is taken over with a warning, a requeued
  SLURM job (the same job id) continues its own lock, a holder on another host is judged by
  its SLURM job's state, a lock file that names no run is refused, and only the holder's own
  lock is released.
* Eight processes started at once on one folder: exactly one gets the lock, on a free folder
  and on one whose holder is gone.
* Two real ``probsft train`` runs started at once into one folder: one trains, the other
  refuses in one line naming the holder (exit 2) and writes nothing; the first finishes, the
  lock is gone, and a resume to a later step is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from probsft_megatron import run_lock
from probsft_megatron.run_lock import LOCK_FILE, Holder, RunLockedError

REPO = Path(__file__).resolve().parents[1]


def _write(folder: Path, holder: Holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(holder.to_json())
    return folder / LOCK_FILE


@pytest.fixture
def live_pid():
    """A real process on this host that lives for the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_lock_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "run"
    me = run_lock.acquire(out)
    data = json.loads((out / LOCK_FILE).read_text())
    assert data["format"] == "probsft-run-lock"
    assert data["host"] == socket.gethostname() and data["pid"] == os.getpid()
    assert data["slurm_job_id"] is None and data["started"] and data["pid_started"]
    # this process is alive: a second acquire (another run in the same process) is refused
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host"):
        run_lock.acquire(out)
    other = replace(me, started="another run")
    run_lock.release(out, other)  # not the holder: nothing happens
    assert (out / LOCK_FILE).is_file()
    run_lock.release(out, me)
    assert not (out / LOCK_FILE).exists()
    run_lock.release(out, me)  # idempotent


def test_live_holder_refuses_in_one_line(tmp_path, live_pid):
    import psutil

    holder = Holder(
        socket.gethostname(),
        live_pid,
        psutil.Process(live_pid).create_time(),
        None,
        "2026-12-07T10:00:00+0000",
        "probsft train --config r",
    )
    lock = _write(tmp_path / "run", holder)
    for check in (run_lock.acquire, run_lock.check_free):
        with pytest.raises(RunLockedError) as err:
            check(tmp_path / "run")
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(
            f"train.output_dir {tmp_path / 'run'} is in use by another training run: "
            f"pid {live_pid} on host {socket.gethostname()}, started 2026-12-07T10:00:00+0000 "
            "(probsft train --config r)"
        )
        assert "choose another train.output_dir" in message
    assert json.loads(lock.read_text())["pid"] == live_pid  # untouched
    # the same pid with another start time is a reused pid: that holder is gone
    reused = replace(holder, pid_started=holder.pid_started - 1000)
    assert run_lock.gone_reason(reused) == (
        "stale",
        f"pid {live_pid} is no longer running on this host",
    )


def test_dead_holder_is_taken_over_with_a_warning(tmp_path, dead_pid, caplog):
    _write(tmp_path / "run", Holder(socket.gethostname(), dead_pid, 1.0, None, "t0", "c"))
    run_lock.check_free(tmp_path / "run")  # a gone holder does not stop the dry run
    with caplog.at_level(logging.WARNING, logger="probsft_megatron.run_lock"):
        me = run_lock.acquire(tmp_path / "run")
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == me.pid
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"took over the lock of {tmp_path / 'run'} from a run that is gone" in warning
    assert f"pid {dead_pid} is no longer running on this host" in warning
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]


def test_slurm_holders(tmp_path, monkeypatch, live_pid, caplog):
    """Another host's holder is judged by its SLURM job; a requeued job (same id) continues
    its own lock; without SLURM there is nothing to ask, and the message says what to
    delete once that run is known to be gone."""
    far = Holder("node-elsewhere", 4242, 1.0, "8812", "t0", "c")
    states = {"8812": "RUNNING"}
    monkeypatch.setattr(run_lock, "slurm_job_state", lambda job: states.get(job))
    _write(tmp_path / "a", far)
    with pytest.raises(RunLockedError, match=r"SLURM job 8812.*\(or scancel 8812\)"):
        run_lock.acquire(tmp_path / "a")
    states["8812"] = "PENDING"  # requeued, waiting: still that job's folder
    with pytest.raises(RunLockedError):
        run_lock.acquire(tmp_path / "a")
    for ended in ("COMPLETED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "ENDED"):
        states["8812"] = ended
        assert run_lock.gone_reason(far) == ("stale", f"SLURM job 8812 has ended ({ended})")
    with caplog.at_level(logging.INFO, logger="probsft_megatron.run_lock"):
        run_lock.acquire(tmp_path / "a")
    assert "SLURM job 8812 has ended (ENDED)" in caplog.text

    # the requeued job itself: same id, its old process gone
    monkeypatch.setenv("SLURM_JOB_ID", "9001")
    _write(tmp_path / "b", replace(far, slurm_job_id="9001"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="probsft_megatron.run_lock"):
        me = run_lock.acquire(tmp_path / "b")
    assert me.slurm_job_id == "9001"
    assert "it is this SLURM job (9001), requeued" in caplog.text
    assert "took over" not in caplog.text  # its own run: not a warning
    # the same job id but a live process on this host: another run inside the same job
    import psutil

    inside = Holder(
        socket.gethostname(), live_pid, psutil.Process(live_pid).create_time(), "9001", "t", ""
    )
    _write(tmp_path / "c", inside)
    with pytest.raises(RunLockedError):
        run_lock.acquire(tmp_path / "c")

    # another host, no SLURM: cannot be checked from here
    _write(tmp_path / "d", replace(far, slurm_job_id=None))
    with pytest.raises(RunLockedError) as err:
        run_lock.acquire(tmp_path / "d")
    assert f"if that run is gone, delete {tmp_path / 'd' / LOCK_FILE}" in str(err.value)


def test_lock_that_names_no_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text("garbage")
    with pytest.raises(RunLockedError) as err:
        run_lock.acquire(tmp_path / "run")
    assert "has a lock file that names no run" in str(err.value)
    assert f"delete {tmp_path / 'run' / LOCK_FILE}" in str(err.value)


RACE = textwrap.dedent(
    """
    import sys, time
    from probsft_megatron import run_lock
    out, start = sys.argv[1], float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    try:
        run_lock.acquire(out)
        print("WON", flush=True)
        time.sleep(3)  # hold it while the others decide
    except run_lock.RunLockedError:
        print("REFUSED", flush=True)
    """
)


@pytest.mark.parametrize("gone", [False, True], ids=["free", "holder-gone"])
def test_eight_processes_at_once_one_gets_the_lock(tmp_path, gone, dead_pid):
    import time

    out = tmp_path / "run"
    if gone:
        _write(out, Holder(socket.gethostname(), dead_pid, 1.0, None, "t0", "c"))
    start = time.time() + 4  # after every interpreter has started
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(out), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for _ in range(8)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    verdicts = [o.strip() for o, _ in results]
    assert sorted(verdicts) == ["REFUSED"] * 7 + ["WON"], results
    assert not [p for p in out.iterdir() if p.name != LOCK_FILE]  # no mutex or aside left


# ---------------------------------------------------------------- two real runs
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBSFT_TEST_", "SLURM_"))}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


BASE = [
    "--config",
    "tiny-figfont-cpu",
    "train.tensorboard=false",
    "train.histogram_interval=0",
    "train.save_interval=100",
    "train.keep_last=10",
]


@pytest.mark.slow
def test_two_runs_into_one_folder_one_refuses_and_the_other_resumes_bit_exact(tmp_path):
    from test_resilience import _assert_identical, _flat_state, _metrics

    probsft = [sys.executable, "-m", "probsft_megatron.cli", "train", *BASE]
    out, ref = tmp_path / "run", tmp_path / "ref"
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "ref.log"]
    commands = [
        [*probsft, f"train.output_dir={out}", "train.max_steps=3"],
        [*probsft, f"train.output_dir={out}", "train.max_steps=3"],
        [*probsft, f"train.output_dir={ref}", "train.max_steps=6"],  # the reference, meanwhile
    ]
    procs = []
    for log, command in zip(logs, commands):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
            )
    *codes, ref_code = [p.wait(timeout=600) for p in procs]
    *texts, ref_text = [log.read_text() for log in logs]
    assert ref_code == 0, ref_text[-4000:]
    assert sorted(codes) == [0, 2], texts
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    errors = [line for line in texts[loser].splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in texts[loser], texts[loser]
    assert errors[0].startswith(
        f"error: train.output_dir {out} is in use by another training run: "
        f"pid {procs[winner].pid} on host {socket.gethostname()}, started "
    ), errors[0]
    assert "train:" not in texts[loser]  # it never trained a step
    assert sorted(_metrics(out)) == [1, 2, 3]  # one writer: each step once
    assert (out / "summary.json").is_file() and not (out / LOCK_FILE).exists()

    # the first run resumes to step 6 exactly as the uninterrupted 6-step run
    proc = subprocess.run(
        [*probsft, f"train.output_dir={out}", "train.max_steps=6"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the resume line counts to the run's end (train.max_steps), not to the data's steps
    assert f"resumed from {out / 'checkpoints' / 'step_0000003'} (step 3/6)" in proc.stderr
    assert "training 6 steps (train.max_steps=6; the schedule spans all 14)" in ref_text
    tensors = _assert_identical(
        _flat_state(out / "checkpoints" / "step_0000006", tmp_path),
        _flat_state(ref / "checkpoints" / "step_0000006", tmp_path),
    )
    assert tensors >= 10
    want, got = _metrics(ref), _metrics(out)
    assert sorted(got) == list(range(1, 7))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    print(f"second run refused; resumed run bit-identical to the reference ({tensors} tensors)")
