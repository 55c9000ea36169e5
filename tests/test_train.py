"""`probsft train` end to end on CPU: learning under TP=2 and PP=2, the fused loss head
matching the unfused one, exact resume after a kill, and a checkpoint interrupted mid-write
leaving the previous one usable.

The model is the tiny Llama-style preset with SmolLM2's real tokenizer, trained on the
figlet-font task generated offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probsft_megatron.checkpoint import CRASH_ENV, complete_checkpoints, latest_checkpoint

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

BASE = [
    "--config",
    "tiny-figfont-cpu",
    "data.num_samples=160",
    "data.max_length=384",
    "train.tensorboard=false",
    "train.histogram_interval=0",
]


def _cmd(nproc: int, out: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "probsft_megatron.train",
        *BASE,
        f"train.output_dir={out}",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    """The caller's environment as a user would have it (no warning filters, default log
    level): the runs check that megatron's own warnings stay out of the output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PROBSFT_LOG_LEVEL")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def _run(
    nproc: int, out: Path, extra: list[str], timeout: int = 600, expect_ok: bool = True, **env
) -> int:
    """Run a training job in its own session; output goes to a log file, not a pipe.

    megatron's checkpoint writer starts a multiprocessing manager that outlives a crashed
    parent and would keep a pipe open; the whole session is killed once the job is done.
    """
    log = out.parent / f"{out.name}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            _cmd(nproc, out, extra),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(**env),
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            _kill_session(proc)
    if expect_ok and rc != 0:
        pytest.fail(f"training failed (rc={rc}):\n{log.read_text()[-5000:]}")
    return rc


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor_model_parallel_size=2"], ["parallel.pipeline_model_parallel_size=2"]],
    ids=["tp2", "pp2"],
)
def test_loss_falls_over_30_steps(tmp_path, layout):
    out = tmp_path / "run"
    _run(2, out, [*layout, "train.max_steps=30", "train.save_interval=0"])
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 31))
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(26, 31)) / 5
    print(f"{layout[0]}: mean loss steps 1-5 = {first:.3f}, steps 26-30 = {last:.3f}")
    assert last < first - 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and Path(summary["checkpoint"]).name == "step_0000030"
    # throughput counts real tokens; every sequence slot is reported apart
    for record in summary["history"]:
        assert 0 < record["tokens"] < 4 * 384  # global batch 4, max length 384: some padding
        assert record["tokens_per_s"] < record["padded_tokens_per_s"]
    # quiet by default: megatron's Transformer Engine / Apex notes are not shown
    log = (out.parent / f"{out.name}.log").read_text()
    assert "Apex" not in log and "UserWarning" not in log, log[-3000:]


def test_fused_head_trains_like_unfused(tmp_path):
    """`loss.implementation=fused` (weight gradient into DDP's buffer) at TP=2 + SP with the
    distributed optimizer and a global percentile follows the unfused run step for step:
    loss, gradient norm and mean p."""
    extra = [
        "parallel.tensor_model_parallel_size=2",
        "parallel.sequence_parallel=true",
        "loss.objective=OnlyTopP-K50",
        "train.max_steps=6",
        "train.save_interval=0",
    ]
    runs = {}
    for impl in ("unfused", "fused"):
        out = tmp_path / impl
        _run(2, out, [*extra, f"loss.implementation={impl}", "loss.chunk_size=96"])
        runs[impl] = [
            json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
        ]
    assert (
        [r["step"] for r in runs["fused"]]
        == [r["step"] for r in runs["unfused"]]
        == list(range(1, 7))
    )
    worst = {
        key: max(abs(f[key] - u[key]) / abs(u[key]) for f, u in zip(runs["fused"], runs["unfused"]))
        for key in ("loss", "grad_norm", "mean_p")
    }
    print(
        "fused vs unfused, 6 steps, largest relative difference:",
        {k: f"{v:.1e}" for k, v in worst.items()},
    )
    assert all(v < 1e-5 for v in worst.values()), worst
    assert runs["unfused"][-1]["loss"] < runs["unfused"][0]["loss"]


def test_kill_and_resume_is_bit_exact(tmp_path):
    """DP=2 with the distributed optimizer: SIGKILL after the step-4 checkpoint, resume."""
    extra = ["train.max_steps=8", "train.save_interval=4", "optim.use_distributed_optimizer=true"]
    ref = tmp_path / "uninterrupted"
    _run(2, ref, extra)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(2, out, extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.time() + 600
    try:
        while not (out / "checkpoints" / "step_0000004" / "train_state.json").exists():
            assert proc.poll() is None, "the run ended before its step-4 checkpoint"
            assert time.time() < deadline, "no step-4 checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        _kill_session(proc)  # SIGKILL to every process of the job
    assert latest_checkpoint(out / "checkpoints").name == "step_0000004"

    _run(2, out, extra)  # resumes from step 4
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == want[step], (step, got[step], want[step])  # bit-exact on CPU
    print("resumed losses 5-8:", [got[s] for s in range(5, 9)])


def test_checkpoint_interrupted_mid_write_keeps_previous(tmp_path):
    extra = ["train.max_steps=4", "train.save_interval=2"]
    out = tmp_path / "run"
    rc = _run(1, out, extra, expect_ok=False, **{CRASH_ENV: "4"})
    assert rc != 0  # died while writing the step-4 checkpoint
    root = out / "checkpoints"
    assert (root / ".step_0000004.partial" / "weights").is_dir()
    assert [s for s, _ in complete_checkpoints(root)] == [2]

    _run(1, out, extra)  # resumes from step 2 and completes
    assert [s for s, _ in complete_checkpoints(root)] == [2, 4]
    assert not (root / ".step_0000004.partial").exists()
    ref = tmp_path / "ref"
    _run(1, ref, extra)
    assert _losses(out) == _losses(ref)
