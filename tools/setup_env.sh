#!/usr/bin/env bash
# Installs divprec and its test tools into the current Python environment. Idempotent.
# torch goes first: when it is missing, the CPU build 2.13.0 is installed, so pip does not pull a
# multi-GB CUDA build on a machine without a GPU (set DIVPREC_TORCH to choose another spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${DIVPREC_TORCH:-torch==2.13.0}"
  "$PY" -m pip install --quiet --disable-pip-version-check "${DIVPREC_TORCH:-torch==2.13.0}"
fi
echo "[setup] installing divprec (editable) with its test extra"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
