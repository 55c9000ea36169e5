#!/usr/bin/env bash
# Creates .venv-mcore-<VERSION>: a sibling of .venv that runs the project against another
# megatron-core release. Only megatron-core itself is installed there (--no-deps, a few MB);
# everything else (torch, transformers, the editable project, ...) comes from .venv, whose
# site-packages the sibling adds *after* its own, so its megatron-core shadows .venv's.
#
#   bash scripts/mcore_env.sh 0.14.0     # prints the python to use on its last line
#
# .venv's own release (0.16.1) needs no sibling: .venv's python is printed.
# Idempotent: an existing sibling with the same version and the same .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/mcore_env.sh MEGATRON_CORE_VERSION (e.g. 0.14.0)}
ROOT=$(pwd)
BASE="$ROOT/.venv"
[ -x "$BASE/bin/python" ] || { echo "error: $BASE does not exist; run 'make venv' first" >&2; exit 2; }
mcore_version() {  # the megatron-core that python $1 imports
  "$1" -W ignore -c "import megatron.core as m; print(m.__version__)" 2>/dev/null | tail -1
}
if [ "$VERSION" = "$(mcore_version "$BASE/bin/python")" ]; then
  echo "$BASE/bin/python"
  exit 0
fi

ENV="$ROOT/.venv-mcore-$VERSION"
base_site=$("$BASE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
stamp="$VERSION $base_site"
if [ ! -f "$ENV/.mcore-stamp" ] || [ "$(cat "$ENV/.mcore-stamp")" != "$stamp" ]; then
  rm -rf "$ENV"
  # the same interpreter as .venv, without pip of its own: .venv's pip installs into it
  base_python=$("$BASE/bin/python" -c "import sys; print(sys._base_executable)")
  "$base_python" -m venv --without-pip "$ENV"
  site=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "[mcore-env] megatron-core==$VERSION into $ENV" >&2
  log=$(mktemp)
  if ! "$BASE/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
      --target "$site" "megatron-core==$VERSION" >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -c 1500 >&2 || true
    rm -f "$log"
    echo "error: could not install megatron-core==$VERSION (see above)" >&2
    exit 1
  fi
  rm -f "$log"
  # addsitedir (not a plain path line) so that .venv's own .pth files run too: the
  # editable install of probsft_megatron is a path hook registered by one of them
  echo "import site; site.addsitedir('$base_site')" > "$site/zz_probsft_base_venv.pth"
  got=$(mcore_version "$ENV/bin/python")
  if [ "$got" != "$VERSION" ]; then
    echo "error: $ENV imports megatron-core '$got', not $VERSION" >&2
    exit 1
  fi
  echo "$stamp" > "$ENV/.mcore-stamp"
fi
echo "$ENV/bin/python"
