#!/usr/bin/env bash
# The GPU measurements in one command: the fused loss head in bf16 at 8192 and 16384 tokens
# (benchmarks/fused_loss.py) and bf16 training throughput of the Qwen2.5-1.5B shape at
# sequence 4096, local vs sdpa (vs te where installed) vs Hugging Face
# (benchmarks/throughput.py); the memory planner's estimate against the measured peak of a
# Qwen2.5-1.5B-shaped training step (benchmarks/plan_accuracy.py).
#
# GPU machines often have PyTorch, transformers and the rest of the scientific stack but no
# package registry. Only megatron-core is then missing; fetch its wheel where pip works and
# bring the folder along:
#
#   scripts/gpu_benchmarks.sh fetch [PYVER]   # megatron-core wheel for Python PYVER (3.12) into .whl/
#   scripts/gpu_benchmarks.sh run [OUTDIR]    # on the GPU machine; results into OUTDIR
#                                             # (default benchmarks/results), log in OUTDIR/gpu_benchmarks.log
#
# `run` installs .whl/*.whl into a private folder only when `import megatron.core` fails.
# SMOKE=1 runs tiny sizes instead (checks the plumbing on any machine, CPU included).
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION=0.16.1

case "${1:-}" in
fetch)
    pyver="${2:-3.12}"
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "megatron-core==${MCORE_VERSION}"
    ls -l .whl
    ;;
run)
    out="${2:-benchmarks/results}"
    mkdir -p "$out"
    PY="${PYTHON:-python3}"
    if ! "$PY" -c "import megatron.core" 2>/dev/null; then
        compgen -G ".whl/*.whl" >/dev/null || {
            echo "megatron-core is not importable and .whl/ holds no wheel: run '$0 fetch' where pip works" >&2
            exit 2
        }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/probsft-site .whl/*.whl
        export PYTHONPATH="/tmp/probsft-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    if [[ "${SMOKE:-0}" == 1 ]]; then
        fused=(--tokens 512 --chunks 256 --rounds 1 --two-pass-tokens "")
        thru=(--shape small --seq 256 --steps 2 --variants sdpa,sdpa+fused,huggingface)
    else
        fused=(--tokens 8192,16384 --chunks 512,256 --two-pass-tokens 8192)
        thru=(--shape qwen2.5-1.5b --seq 4096 --steps 6 --warmup 2)
    fi
    {
        "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
        "$PY" benchmarks/fused_loss.py "${fused[@]}" --out "$out"
        "$PY" benchmarks/throughput.py "${thru[@]}" --out "$out"
        # -- memory planner vs the measured peak of a training step (benchmarks/plan_accuracy.py):
        #    Qwen2.5-1.5B shape, TP=1, bf16, unfused and fused heads at 2048 and 4096 tokens
        if [[ "${SMOKE:-0}" == 1 ]]; then
            "$PY" benchmarks/plan_accuracy.py --shape small --seqs 128 --heads unfused --out "$out"
        else
            "$PY" benchmarks/plan_accuracy.py --shape qwen2.5-1.5b --seqs 2048,4096 --out "$out"
        fi
    } 2>&1 | tee "$out/gpu_benchmarks.log"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
