#!/usr/bin/env bash
# The megatron-core version matrix: runs the version-sensitive subset of the test suite
# (parallel parity, bit-exact resume, fused-head TP, converter TP/PP) against each given
# megatron-core release, in a sibling environment built by scripts/mcore_env.sh.
#
#   bash scripts/test_mcore.sh 0.14.0 0.15.3:core 0.16.1
#
# VERSION runs the whole subset; VERSION:core only CORE_SUBSET, for a release that sits
# between two fully tested ones (docs/environment.md, "The tested matrix", says which and why).
# Prints one summary line per version (pytest's closing line and the wall time) and exits
# non-zero if any version failed. Extra pytest arguments: PYTEST_ARGS="-x -k tp2".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
[ $# -gt 0 ] || { echo "usage: scripts/test_mcore.sh VERSION[:core] ..." >&2; exit 2; }
# the subset: every test whose result depends on megatron-core's parallel internals
SUBSET=(
  tests/test_mcore_matrix.py
  tests/test_parallel_parity.py
  tests/test_train.py::test_kill_and_resume_is_bit_exact
  "tests/test_fused_loss.py::test_multirank_op_matches_unfused"
  "tests/test_fused_loss.py::test_multirank_training_matches_tp1_unfused"
  "tests/test_fused_loss.py::test_multirank_negative_control_is_detected"
  "tests/test_converters.py::test_logits_parity_tp1"
  "tests/test_converters.py::test_logits_parity_tp2"
  "tests/test_converters.py::test_logits_parity_pp2"
  "tests/test_converters.py::test_negative_controls_are_detected"
  "tests/test_converters.py::test_roundtrip_is_bit_exact"
)
# the core: compat.py's version branches, every parallel layout's training parity with its
# negative controls, and the distributed optimizer's checkpoint (its format differs by release)
CORE_SUBSET=(
  tests/test_mcore_matrix.py
  tests/test_parallel_parity.py
  tests/test_train.py::test_kill_and_resume_is_bit_exact
)
for arg in "$@"; do
  [[ "$arg" =~ ^[0-9][0-9A-Za-z.]*(:core)?$ ]] ||
    { echo "error: '$arg' is not VERSION or VERSION:core (e.g. 0.15.3:core)" >&2; exit 2; }
done
summary=()
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
status=0
for arg in "$@"; do
  version=${arg%%:*}
  if [ "$arg" = "$version" ]; then tests=("${SUBSET[@]}"); else tests=("${CORE_SUBSET[@]}"); fi
  start=$(date +%s)
  if ! py=$(bash scripts/mcore_env.sh "$version" | tail -1); then
    summary+=("megatron-core $version: environment could not be built")
    status=1
    continue
  fi
  echo "== megatron-core $arg ($py)"
  # shellcheck disable=SC2086
  "$py" -m pytest -q -p no:cacheprovider -o console_output_style=classic \
    "${tests[@]}" ${PYTEST_ARGS:-} | tee "$logdir/$version.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  closing=$(grep -E "(passed|failed|error)" "$logdir/$version.log" | tail -1)
  summary+=("megatron-core $arg: ${closing:-no result (rc=$rc)} [$(( $(date +%s) - start )) s]")
done
echo "== megatron-core matrix"
printf '%s\n' "${summary[@]}"
exit $status
