#!/usr/bin/env bash
# The pip step of docker/Dockerfile: installs probsft-megatron with the given extras into a
# GPU image's Python without replacing what the image ships. Every image-owned package that
# is present (CUDA torch, megatron-core, Transformer Engine, apex, vLLM, numpy, ...) is pinned
# to the image's own version by a constraints file, so pip either keeps it or fails loudly.
#
#   bash docker/install.sh SOURCE EXTRAS [REQUIREMENT ...]   e.g.  bash docker/install.sh . train,launch
#
# SOURCE is the project folder or a wheel; further requirements go into the same pip call. Environment: PYTHON (default python), PIP (default
# "$PYTHON -m pip"), PIP_INSTALL_ARGS (extra pip arguments, e.g. "--dry-run --no-index").
set -euo pipefail
SRC=${1:?usage: docker/install.sh SOURCE EXTRAS [REQUIREMENT ...]}
EXTRAS=${2:?usage: docker/install.sh SOURCE EXTRAS [REQUIREMENT ...]}
shift 2
PYTHON=${PYTHON:-python}
PIP=${PIP:-"$PYTHON -m pip"}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PYTHON" - > "$constraints" <<'PY'
import importlib.metadata as md

KEEP = ("torch", "megatron-core", "transformer-engine", "transformer-engine-torch", "apex",
        "flash-attn", "triton", "vllm", "numpy", "nemo-toolkit")
for name in KEEP:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
echo "[install] kept from the image:"
sed 's/^/  /' "$constraints"
# shellcheck disable=SC2086  # PIP and PIP_INSTALL_ARGS are word lists
$PIP install ${PIP_INSTALL_ARGS:-} --constraint "$constraints" "${SRC}[${EXTRAS}]" "$@"
