"""Training that survives signals, NaNs and dead ranks (module ``probsft_megatron.stopping``).

Real runs of ``probsft train`` (tiny Llama, SmolLM2's tokenizer, figlet data, gloo on CPU):

* a stop signal on one rank of two stops both after the same step with one checkpoint and
  exit 75, through ``probsft train --nproc 2`` (the training agent) and through plain
  ``torchrun -m probsft_megatron.train``; Ctrl-C twice stops at once (130) and leaves no
  process behind; after three interruptions the resumed run ends with a checkpoint
  bit-identical (weights and optimizer state) to an uninterrupted run, and the same losses;
* a NaN injected into one rank's loss (or gradient) stops every rank at that step with one
  error line naming the step and the rank; nothing of that step is saved, and the previous
  checkpoint resumes;
* a rank killed (SIGKILL) or frozen (SIGSTOP) by its pid: the other exits with one line
  within ``train.dist_timeout_s`` (plus start-up of its exit).

Plus the pure parts: the agent's exit-code mapping, the short reason of a failed collective,
the launcher's quoting of step arguments.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probsft_megatron.manifest import step_folders

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "--config",
    "tiny-figfont-cpu",
    "train.tensorboard=false",
    "train.histogram_interval=0",
    "train.save_interval=100",
    "train.keep_last=10",
]
PROBSFT = [sys.executable, "-m", "probsft_megatron.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


# ---------------------------------------------------------------- helpers
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBSFT_TEST_", "SLURM_"))}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)


class Job:
    """A training command in its own session, its output in a log file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env or _env(),
                start_new_session=True,
                cwd=REPO,
            )

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill_session()

    def kill_session(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def session_processes(self) -> list[int]:
        import psutil

        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.info["pid"]) == self.proc.pid:
                    out.append(p.info["pid"])
            except (ProcessLookupError, PermissionError):
                pass
        return out

    def worker(self, rank: int):
        """The training process of ``rank`` (a child of the agent)."""
        import psutil

        deadline = time.time() + 120
        while time.time() < deadline:
            for child in psutil.Process(self.proc.pid).children():
                try:
                    if child.environ().get("RANK") == str(rank):
                        return child
                except psutil.Error:
                    continue
            time.sleep(0.2)
        raise AssertionError(f"no worker of rank {rank}:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for(cond, job: Job, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert job.proc.poll() is None, f"ended before {what}:\n{job.text()[-4000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[int]:
    return [s for s, _ in step_folders(out / "checkpoints")]


def _flat_state(ckpt: Path, tmp: Path) -> dict:
    """Every tensor and value of a checkpoint's torch_dist folder (model and optimizer)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "weights"), str(flat))
    return torch.load(flat, weights_only=False)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}/")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}{i}/")
    else:
        yield prefix, tree


def _assert_identical(a: dict, b: dict) -> int:
    """Bit-identical leaves (tensors by value and dtype); returns the number of tensors."""
    import torch

    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys()
    tensors = 0
    for key, x in la.items():
        y = lb[key]
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y), key
            tensors += 1
        else:
            assert x == y or (x != x and y != y), (key, x, y)  # NaN-safe
    return tensors


def _train_cmd(out: Path, *extra: str, nproc: int = 2, fault: str | None = None) -> list[str]:
    """``probsft train --nproc N``, or with ``fault`` injected by tests/mp/fault_worker.py
    (which runs the same agent and entry point)."""
    if fault is None:
        head = [*PROBSFT, "train"]
    else:
        head = [sys.executable, str(REPO / "tests" / "mp" / "fault_worker.py"), fault]
    return [*head, "--nproc", str(nproc), *BASE, f"train.output_dir={out}", *extra]


# ---------------------------------------------------------------- pure parts
def test_second_ctrl_c_handler_imports_nothing():
    """The agent's handlers find psutil already imported: a second Ctrl-C that arrived while
    the first handler was importing it once met a half-initialized module (AttributeError,
    exit 1 instead of 130, seen in a fresh-clone CI run). Checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from probsft_megatron.launchers.agent import SignalRelay\n"
        "assert 'psutil' not in sys.modules, 'imported before install'\n"
        "relay = SignalRelay(forward=False).install()\n"
        "print('psutil' in sys.modules)\n"
        "relay.restore()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_agent_exit_codes():
    from types import SimpleNamespace as F

    from probsft_megatron.launchers.agent import quiet_code

    def fails(*codes):
        return {r: F(exitcode=c) for r, c in enumerate(codes)}

    assert quiet_code(fails(75, 75), False) == 75
    assert quiet_code(fails(75, -signal.SIGTERM), False) == 75  # the agent's own clean-up
    assert quiet_code(fails(2, 75), False) == 2
    assert quiet_code(fails(2, -signal.SIGTERM), False) == 2
    assert quiet_code(fails(-signal.SIGINT, 130), True) == 130
    assert quiet_code(fails(-signal.SIGKILL, 75), True) == 130
    for crash in ((1,), (75, 1), (-signal.SIGKILL,), (-signal.SIGSEGV, 75), (-signal.SIGTERM,)):
        assert quiet_code(fails(*crash), False) is None, crash  # torchrun's report stays


def test_collective_failures_are_recognized_and_shortened():
    from probsft_megatron.stopping import collective_reason, is_collective_failure

    timeout = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc"
        ":78] Timed out waiting 20000ms for recv operation to complete"
    )
    reset = RuntimeError(
        "[/__w/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:25513: "
        "Connection reset by peer. This is typically caused by a remote worker "
        "hanging or bugs in the application. GLHF!"
    )
    assert is_collective_failure(timeout) and is_collective_failure(reset)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("gloo"))
    assert collective_reason(timeout) == (
        "Timed out waiting 20000ms for recv operation to complete"
    )
    assert collective_reason(reset) == "Read error [127.0.0.1]:25513: Connection reset by peer"


def test_dist_timeout_is_validated():
    from probsft_megatron.config import load_config
    from probsft_megatron.errors import ConfigError

    assert load_config("tiny-figfont-cpu", []).train.dist_timeout_s == 600
    assert load_config("tiny-figfont-cpu", ["train.dist_timeout_s=15"]).train.dist_timeout_s == 15
    with pytest.raises(ConfigError, match=r"train\.dist_timeout_s must be > 0"):
        load_config("tiny-figfont-cpu", ["train.dist_timeout_s=0"])


def test_step_arguments_are_quoted_for_slurm_only(tmp_path):
    """A local step gets its argv as is (no shell; ``[...]`` used to arrive as ``'...'``);
    a SLURM step's words are shell-quoted for the batch script, the agent's are not."""
    from probsft_megatron.launchers.experiment import (
        AGENT_MODULE,
        Step,
        local_executor,
        step_command,
    )
    from probsft_megatron.launchers.slurm import agent_args, load_profile, slurm_executor

    step = Step(
        "train-x",
        "train",
        "probsft_megatron.train",
        ["--config", "r", "data.train_files=[/d/a b.jsonl]"],
    )
    module, args = step_command(step, local_executor(step.kind, 2))
    assert module == AGENT_MODULE
    assert args == [
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--tee",
        "3",
        "-m",
        "probsft_megatron.train",
        "--config",
        "r",
        "data.train_files=[/d/a b.jsonl]",
    ]
    profile = load_profile("local-cpu")
    executor = slurm_executor(profile, "train", job_dir=str(tmp_path), nodes=2, nproc_per_node=1)
    module, args = step_command(step, executor, agent_args(profile, 2, 1))
    assert " ".join(args).endswith(
        "--node-rank $SLURM_NODEID --tee 3 -m probsft_megatron.train "
        "--config r 'data.train_files=[/d/a b.jsonl]'"
    )
    assert "$head_node_ip:${PROBSFT_RDZV_PORT}" in args and "$SLURM_JOB_ID" in args


# ---------------------------------------------------------------- signals, resume
@pytest.mark.multirank
@pytest.mark.slow
def test_signals_stop_all_ranks_at_one_step_and_resume_bit_exact(tmp_path):
    """SIGUSR1 to rank 1 (the agent), SIGTERM to rank 0 (plain torchrun), Ctrl-C twice, then
    the end: final checkpoint bit-identical to an uninterrupted run."""
    extra = ["train.max_steps=8"]
    ref = tmp_path / "ref"
    job = Job(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "-m",
            "probsft_megatron.train",
            *BASE,
            f"train.output_dir={ref}",
            *extra,
        ],
        tmp_path / "ref.log",
    )
    assert job.wait() == 0, job.text()[-4000:]
    assert _steps(ref) == [8]

    out = tmp_path / "run"
    # 1. SIGUSR1 to rank 1 only, through `probsft train --nproc 2`
    job = Job(_train_cmd(out, *extra), tmp_path / "run1.log")
    _wait_for(lambda: _steps_logged(out) >= 2, job, "two logged steps")
    job.worker(1).send_signal(signal.SIGUSR1)
    assert job.wait() == 75, job.text()[-4000:]
    (k1,) = _steps(out)
    assert 3 <= k1 < 8
    assert sorted(p.name for p in (out / "checkpoints" / f"step_{k1:07d}" / "rng").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]  # one checkpoint, both ranks, the same step
    assert sorted(_metrics(out)) == list(range(1, k1 + 1))
    assert _events(out)[-1] | {"time": None} == {
        "event": "interrupted",
        "time": None,
        "step": k1,
        "by": "SIGUSR1 on rank 1",
        "checkpoint": str(out / "checkpoints" / f"step_{k1:07d}"),
    }
    text = job.text()
    assert f"interrupted at step {k1} (SIGUSR1 on rank 1); checkpoint " in text
    assert "resume with the same command" in text and "Traceback" not in text
    assert not (out / "summary.json").exists()  # not finished

    # 2. SIGTERM to rank 0 only, under plain torchrun: the workers behave the same
    job = Job(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "-m",
            "probsft_megatron.train",
            *BASE,
            f"train.output_dir={out}",
            *extra,
        ],
        tmp_path / "run2.log",
    )
    _wait_for(lambda: _steps_logged(out) >= k1 + 1, job, f"step {k1 + 1}")
    job.worker(0).send_signal(signal.SIGTERM)
    assert job.wait() != 0
    k2 = _steps(out)[-1]
    assert k2 > k1 and _events(out)[-1]["by"] == "SIGTERM on rank 0"
    assert len(re.findall(r"exitcode\s*:\s*75 ", job.text())) >= 1, job.text()[-3000:]

    # 3. Ctrl-C twice (SIGINT to the command, as a terminal sends it): stops at once
    job = Job(_train_cmd(out, *extra), tmp_path / "run3.log")
    _wait_for(lambda: _events(out)[-1]["event"] == "resumed", job, "the resume")
    os.kill(job.proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.kill(job.proc.pid, signal.SIGINT)
    assert job.proc.wait(timeout=120) == 130, job.text()[-4000:]
    time.sleep(6)  # the agent kills the workers at once, and again 5 s later
    assert job.session_processes() == [], "processes left behind after a second Ctrl-C"
    job.kill_session()
    text = job.text()
    assert "second interrupt: stopped at once" in text and "Traceback" not in text
    assert "error:" not in text and "failed (exitcode" not in text  # no lost-rank noise
    k3 = _steps(out)[-1]
    assert k3 >= k2

    # 4. to the end
    job = Job(_train_cmd(out, *extra), tmp_path / "run4.log")
    assert job.wait() == 0, job.text()[-4000:]
    assert _steps(out)[-1] == 8 and (out / "summary.json").is_file()
    events = [e["event"] for e in _events(out)]
    assert events[:3] == ["interrupted", "resumed", "interrupted"] and events[-1] == "resumed"
    tensors = _assert_identical(
        _flat_state(out / "checkpoints" / "step_0000008", tmp_path),
        _flat_state(ref / "checkpoints" / "step_0000008", tmp_path),
    )
    assert tensors >= 10
    want, got = _metrics(ref), _metrics(out)
    assert sorted(got) == list(range(1, 9))
    assert [got[s]["loss"] for s in got] == [want[s]["loss"] for s in got]
    assert [got[s]["grad_norm"] for s in got] == [want[s]["grad_norm"] for s in got]
    print(
        f"interrupted at steps {k1}, {k2}, {k3}; final checkpoint: {tensors} tensors "
        "bit-identical to the uninterrupted run"
    )


# ---------------------------------------------------------------- non-finite values
@pytest.mark.multirank
@pytest.mark.slow
def test_nonfinite_loss_stops_every_rank_before_saving(tmp_path):
    import torch

    out = tmp_path / "run"
    extra = ["train.max_steps=6", "train.save_interval=2"]
    job = Job(_train_cmd(out, *extra, fault="loss@3:1"), tmp_path / "nan.log")
    assert job.wait() == 2
    text = job.text()
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-4000:]
    ckpt = out / "checkpoints" / "step_0000002"
    assert errors[0].startswith(
        "error: non-finite loss at step 3 on rank 1; the run stopped "
        f"without logging or saving that step, and the newest "
        f"checkpoint, {ckpt}, is from before it"
    )
    assert _steps(out) == [2] and sorted(_metrics(out)) == [1, 2]
    assert not list((out / "checkpoints").glob(".*partial"))
    assert _events(out)[-1]["event"] == "non_finite"
    state = _flat_state(ckpt, tmp_path)
    floats = [v for _, v in _leaves(state) if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(bool(torch.isfinite(v).all()) for v in floats)

    # the previous checkpoint resumes (the injection is gone: step 3 is finite)
    job = Job(
        _train_cmd(out, "train.max_steps=3", "train.save_interval=2"), tmp_path / "resume.log"
    )
    assert job.wait() == 0, job.text()[-4000:]
    assert _steps(out) == [2, 3] and math.isfinite(_metrics(out)[3]["loss"])


@pytest.mark.slow
def test_nonfinite_gradient_names_the_rank(tmp_path):
    out = tmp_path / "run"
    job = Job(
        _train_cmd(out, "train.max_steps=4", "train.save_interval=2", nproc=1, fault="grad@2:0"),
        tmp_path / "grad.log",
    )
    assert job.wait() == 2
    (error,) = [ln for ln in job.text().splitlines() if ln.startswith("error:")]
    assert error.startswith(
        "error: non-finite gradients at step 2 on rank 0 (finite loss; "
        "gradient norm nan); the run stopped without logging or saving "
        "that step, and no checkpoint was written"
    ), error
    assert _steps(out) == [] and sorted(_metrics(out)) == [1]


# ---------------------------------------------------------------- dead ranks
@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_rank_ends_the_other_within_the_timeout(tmp_path, how):
    """Two ranks started directly (no agent that would clean up): rank 1 is killed (its
    connections close) or frozen (nothing closes: the timeout decides) by its pid."""
    from conftest import _free_port

    timeout_s = 15
    out = tmp_path / "run"
    env = _env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"
    )
    cmd = [
        sys.executable,
        "-m",
        "probsft_megatron.train",
        *BASE,
        f"train.output_dir={out}",
        "train.max_steps=40",
        "train.epochs=3",  # 42 steps: the run outlives the kill
        "train.save_interval=2",
        f"train.dist_timeout_s={timeout_s}",
    ]
    ranks = [
        Job(cmd, tmp_path / f"rank{r}.log", env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in (0, 1)
    ]
    try:
        _wait_for(lambda: 2 in _steps(out), ranks[0], "the step-2 checkpoint")
        os.kill(ranks[1].proc.pid, getattr(signal, how))
        start = time.monotonic()
        rc = ranks[0].proc.wait(timeout=timeout_s + 120)
        elapsed = time.monotonic() - start
    finally:
        for job in ranks:
            job.kill_session()
    text = ranks[0].text()
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text[-4000:]
    error = errors[0][errors[0].index("error:") :]
    assert re.match(r"error: rank 0 lost contact with the other ranks during step \d+: ", error)
    newest = out / "checkpoints" / f"step_{_steps(out)[-1]:07d}"
    assert error.endswith(
        f"stopped answering (a collective waits train.dist_timeout_s="
        f"{timeout_s} s); the newest checkpoint is {newest}; run the same "
        "command to resume once every rank can run"
    ), error
    if how == "SIGSTOP":
        assert f"Timed out waiting {timeout_s * 1000}ms" in error
        assert elapsed < timeout_s + 30, elapsed
    else:
        assert re.search(r"Connection (closed|reset) by peer", error), error
        assert elapsed < timeout_s, elapsed
    print(f"{how}: rank 0 exited {elapsed:.1f} s after rank 1 was stopped")
