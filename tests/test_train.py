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

from probsft_megatron.checkpoint import latest_checkpoint
from probsft_megatron.manifest import step_folders

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

BASE = [
    "--config",
    "tiny-figfont-cpu",
    "data.num_samples=160",
    "data.max_length=384",
    "train.tensorboard=false",
    "train.histogram_interval=0",
]


FAULT_WORKER = str(Path(__file__).parent / "mp" / "fault_worker.py")


def _cmd(nproc: int, out: Path, extra: list[str], fault: str | None = None) -> list[str]:
    """torchrun over the training entry point, or over tests/mp/fault_worker.py with
    ``fault`` injected."""
    entry = ["-m", "probsft_megatron.train"] if fault is None else [FAULT_WORKER, fault]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        *entry,
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
    nproc: int,
    out: Path,
    extra: list[str],
    timeout: int = 600,
    expect_ok: bool = True,
    fault: str | None = None,
    **env,
) -> int:
    """Run a training job in its own session; output goes to a log file, not a pipe.

    megatron's checkpoint writer starts a multiprocessing manager that outlives a crashed
    parent and would keep a pipe open; the whole session is killed once the job is done.
    """
    log = out.parent / f"{out.name}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            _cmd(nproc, out, extra, fault),
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
    rc = _run(1, out, extra, expect_ok=False, fault="crash@4")
    assert rc != 0  # died while writing the step-4 checkpoint
    root = out / "checkpoints"
    assert (root / ".step_0000004.partial" / "weights").is_dir()
    assert [s for s, _ in step_folders(root)] == [2]

    _run(1, out, extra)  # resumes from step 2 and completes
    assert [s for s, _ in step_folders(root)] == [2, 4]
    assert not (root / ".step_0000004.partial").exists()
    ref = tmp_path / "ref"
    _run(1, ref, extra)
    assert _losses(out) == _losses(ref)


# -- validation loss and the W&B sink ----------------------------------------------------------


def _wandb_history(root: Path) -> list[dict[str, float]]:
    """The history rows of the offline W&B run under ``root``, read from its ``.wandb`` file
    (W&B's record log: 32 KiB blocks of length-prefixed chunks holding its protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.HasField("history"):
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_validation_loss_every_interval_matches_the_training_loss_and_reaches_wandb(tmp_path):
    """DP=2, objective -p (so the objective and the NLL differ), the held-out file being the
    training file and a learning rate too small to move a float32 weight: the validation of
    the first global batch is the training loss of step 1 (same batch, same weights, same
    objective and normalization, reduced over both DP ranks), at steps 2 and 3 only
    (eval_interval=2 and the last step), identical each time; the NLL is above the -p loss
    (-log p >= 1 - p). The same records reach W&B in offline mode, and the runs report."""
    data = tmp_path / "records.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            a, b = 3 + i, 11 + 2 * i
            f.write(json.dumps({"prompt": f"Add {a} and {b}.", "response": f"{a + b}"}) + "\n")
    out = tmp_path / "run"
    extra = [
        "data.source=file",
        "data.num_samples=null",
        f"data.train_files=[{data}]",
        f"data.val_files=[{data}]",
        "loss.objective=p",
        "optim.lr=1e-12",
        "optim.min_lr=0",
        "train.max_steps=3",
        "train.save_interval=0",
        "train.eval_interval=2",
        "train.eval_batches=1",
        "train.wandb_project=probsft-tests",
        "train.wandb_mode=offline",
    ]
    _run(2, out, extra, WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [1, 2, 3]
    assert [s for s, r in by_step.items() if "val_loss" in r] == [2, 3]
    v2, v3, first = by_step[2], by_step[3], by_step[1]
    print("train loss step 1:", first["loss"], "val:", {k: v for k, v in v2.items() if "val" in k})
    assert v2["val_loss"] == pytest.approx(first["loss"], rel=1e-6)
    assert v2["val_tokens"] == first["response_tokens"]  # both DP ranks' tokens
    assert (v2["val_loss"], v2["val_nll"]) == (v3["val_loss"], v3["val_nll"])
    assert v2["val_nll"] > v2["val_loss"] > 0 and 0 < v2["val_mean_p"] < 1
    assert v2["val_batches"] == 1

    history = _wandb_history(tmp_path)
    logged = {int(r["_step"]): r for r in history}
    assert sorted(logged) == [1, 2, 3]
    assert logged[1]["train/loss"] == pytest.approx(first["loss"])
    assert logged[3]["val/loss"] == pytest.approx(v3["val_loss"])
    assert logged[3]["val/nll"] == pytest.approx(v3["val_nll"])
    assert "val/loss" not in logged[1]

    from probsft_megatron.report.runs import read_run

    run = read_run(out)
    assert run["training"]["validation"]["step"] == 3
    assert run["training"]["validation"]["val_loss"] == pytest.approx(v3["val_loss"])
    from probsft_megatron.cli import main as cli_main

    assert cli_main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text().split("| val loss | val NLL |")[1]
    assert f"| {v3['val_nll']:.4g} |" in table.splitlines()[2], table[:400]


def test_validation_keys_are_checked_before_any_work(tmp_path):
    from probsft_megatron.config import load_config, validate
    from probsft_megatron.errors import ConfigError

    cfg = load_config("tiny-figfont-cpu", ["train.eval_interval=5"])
    with pytest.raises(ConfigError, match="train.eval_interval is set but data.val_files is empty"):
        validate(cfg, 1)
    for bad, fragment in (
        ("train.eval_interval=-1", "train.eval_interval must be >= 0"),
        ("train.eval_batches=0", "train.eval_batches must be >= 1"),
        ("train.wandb_mode=cloud", "train.wandb_mode='cloud' is invalid"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            load_config("tiny-figfont-cpu", [bad])
    missing = tmp_path / "nope.jsonl"
    cfg = load_config("tiny-figfont-cpu", [f"data.val_files=[{missing}]"])
    from probsft_megatron.input_checks import check_files

    with pytest.raises(ConfigError, match="data.val_files: .*nope.jsonl does not exist"):
        check_files(cfg)
