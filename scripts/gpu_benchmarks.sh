#!/usr/bin/env bash
# The GPU measurements in one command, most valuable first, each stage's results written as
# soon as it finishes (and within a stage after every token count, variant or row):
#   1. the fused loss head's time and peak memory in bf16 at 8192 and 16384 tokens
#      (benchmarks/fused_loss.py: unfused vs chunks 512 and 256, two-pass case at 8192);
#   2. bf16 training throughput and MFU of the Qwen2.5-1.5B shape at sequence 4096: sdpa,
#      Hugging Face, sdpa + fused head, te (where installed), local (benchmarks/throughput.py);
#   3. the memory planner's error against the measured peak of a Qwen2.5-1.5B-shaped training
#      step, unfused and fused heads at 2048 and 4096 tokens (benchmarks/plan_accuracy.py);
#   4. packed sequences through Transformer Engine's attention (THD with cu_seqlens): losses
#      of a few steps packed vs dynamically padded from the same weights, and a control whose
#      attention crosses the packed examples (benchmarks/data_efficiency.py --part packed-te;
#      skipped where CUDA or Transformer Engine is missing).
#
# Time on one H100 (estimated from FLOPs and bytes, not yet measured; docs/performance.md):
# the arithmetic is small: ~0.5 PFLOP of loss heads (1.40 GFLOP per token forward + backward
# at V=151,936, h=1536), ~1.7 PFLOP of throughput steps (12.8 GFLOP per token, 32 steps of
# 4096 tokens) and ~0.3 PFLOP of planner steps: under 10 s at 400-600 TFLOP/s; the bytes
# (logits up to 5 GB bf16 per pass, Adam over 1.8B parameters) add a few seconds at 3 TB/s.
# The run is dominated by ~22 fresh processes (import torch + megatron, CUDA context, model
# build), ~10-15 s each: about 4-6 minutes in all. Hard limit: BUDGET_S (default 570 s, so
# the whole command ends inside 10 minutes); each stage also has its own cap (below), and a
# stage cut short keeps what it already wrote.
#
# GPU machines often have PyTorch, transformers and the rest of the scientific stack but no
# package registry. Only megatron-core is then missing; fetch its wheel where pip works and
# bring the folder along:
#
#   scripts/gpu_benchmarks.sh fetch [PYVER]   # megatron-core wheel for Python PYVER (3.12) into .whl/
#   scripts/gpu_benchmarks.sh run [OUTDIR]    # on the GPU machine; results into OUTDIR
#                                             # (default benchmarks/results), log in OUTDIR/gpu_benchmarks.log
#
# `run` installs .whl/*.whl into a private folder only when `import megatron.core` fails, and
# checks every import the stages need before the first one starts. A stage that fails does not
# stop the next; the exit status is 1 when any stage failed or ran out of time.
# SMOKE=1 runs tiny sizes instead (checks the plumbing on any machine, CPU included; the test
# suite runs it: tests/test_benchmarks.py).
set -euo pipefail
start=$SECONDS # the budget counts from here: installing and checking imports included
caller=$PWD
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
    [[ -z "${2:-}" || "$out" == /* ]] || out="$caller/$out" # relative to where it was called
    mkdir -p "$out"
    log="$out/gpu_benchmarks.log"
    : >"$log"
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
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
    say() { echo "[gpu_benchmarks] $*" | tee -a "$log"; }
    # fail in seconds, not after minutes of device time, when an import is missing
    if ! "$PY" -c "import megatron.core, transformers, psutil, torch
from probsft_megatron import runtime, fused_loss, plan, loss, model
print('[gpu_benchmarks] torch', torch.__version__, 'megatron-core', megatron.core.__version__,
      'transformers', transformers.__version__, 'on', torch.cuda.get_device_name()
      if torch.cuda.is_available() else 'CPU (no CUDA)')" 2>&1 | tee -a "$log"; then
        say "an import the benchmarks need fails (above); nothing was measured"
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1 || true
    if [[ "${SMOKE:-0}" == 1 ]]; then
        fused=(--tokens 512 --chunks 256 --rounds 1 --two-pass-tokens "" --vocab 4096 --hidden 256)
        thru=(--shape small --seq 128 --steps 1 --warmup 1 --variants sdpa,huggingface)
        plan=(--shape small --seqs 128 --heads unfused)
        packed=(--part packed-te --max-lengths 256 --examples 64 --global-batch 8 --micro-batch 4 --steps 2)
    else
        fused=(--tokens 8192,16384 --chunks 512,256 --two-pass-tokens 8192)
        thru=(--shape qwen2.5-1.5b --seq 4096 --steps 6 --warmup 2
            --variants sdpa,huggingface,sdpa+fused,te,local)
        plan=(--shape qwen2.5-1.5b --seqs 2048,4096)
        packed=(--part packed-te --max-lengths 4096 --examples 1024 --global-batch 64 --micro-batch 8 --steps 5)
    fi
    budget="${BUDGET_S:-570}"
    failed=()
    # stage NAME CAP_S SCRIPT ARGS...: run one benchmark under min(CAP_S, budget left)
    stage() {
        local name=$1 cap=$2 left rc t0
        shift 2
        left=$((budget - (SECONDS - start)))
        ((cap < left)) || cap=$left
        if ((cap < 10)); then
            say "$name: skipped, the time budget (${budget} s) is spent"
            failed+=("$name (no time left)")
            return
        fi
        say "$name: start (limit ${cap} s)"
        t0=$SECONDS
        rc=0
        timeout --kill-after=10 "$cap" "$PY" "$@" --out "$out" 2>&1 | tee -a "$log" || rc=$?
        if ((rc == 0)); then
            say "$name: done in $((SECONDS - t0)) s"
        else
            [[ $rc == 124 || $rc == 137 ]] && why="out of time" || why="exit $rc"
            say "$name: FAILED ($why) after $((SECONDS - t0)) s"
            failed+=("$name ($why)")
        fi
    }
    stage "fused loss head" 210 benchmarks/fused_loss.py "${fused[@]}"
    stage "throughput and MFU" 180 benchmarks/throughput.py "${thru[@]}"
    stage "planner error" 120 benchmarks/plan_accuracy.py "${plan[@]}"
    stage "packed sequences through TE" 60 benchmarks/data_efficiency.py "${packed[@]}"
    say "total $((SECONDS - start)) s; results in $out"
    if ((${#failed[@]})); then
        say "failed: ${failed[*]}"
        exit 1
    fi
    ;;
*)
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
