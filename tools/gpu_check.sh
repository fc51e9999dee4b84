#!/usr/bin/env bash
# The GPU check: everything a CUDA machine should confirm, in one go (< 8 minutes on one H100/H200).
#
#   bash tools/gpu_check.sh --wheels /path/to/divprec-wheels --out gpu_check/
#   bash tools/gpu_check.sh --dry-run --out /tmp/gpu_check        # the same steps, tiny, on CPU
#
# Needs no network. The machine must have torch (and triton, with CUDA). The other packages come
# as files: on any machine with network and the same Python minor version, run
#   bash tools/gpu_wheels.sh divprec-wheels/
# and copy that folder over; --wheels installs divprec and them from it (pip --no-index).
# Steps, outputs and time limits: tools/gpu_check.py. Exit code 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
wheels=""
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -n $wheels ]]; then
  if [[ ! -d $wheels ]]; then
    echo "gpu_check: --wheels $wheels is not a folder (make it with tools/gpu_wheels.sh)" >&2
    exit 2
  fi
  echo "[gpu_check] installing divprec and its dependencies from $wheels (no network)"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
    --no-build-isolation -e . pytest pytest-timeout
fi
if ! "$PY" -c "import torch, deepspeed, megatron.core, hydra, divprec" >/dev/null 2>&1; then
  echo "gpu_check: torch, deepspeed, megatron-core, hydra-core and divprec must import here:" \
    "pass --wheels DIR (see tools/gpu_wheels.sh)" >&2
  exit 2
fi
exec "$PY" tools/gpu_check.py "${args[@]}"
