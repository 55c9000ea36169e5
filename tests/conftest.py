"""Shared test helpers: running multi-rank workers under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MP_DIR = REPO / "tests" / "mp"


def run_torchrun(
    script: str | Path, nproc: int, args: list[str], timeout: int = 300, expect_ok: bool = True
) -> subprocess.CompletedProcess:
    """Run ``tests/mp/<script>`` with ``nproc`` processes; fail with its output if it fails."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        str(MP_DIR / script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if expect_ok and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{script} x{nproc} {' '.join(args)} failed (rc={proc.returncode}):\n{tail}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_json(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)
