#!/usr/bin/env bash
# Collects, on a machine with network, every wheel the GPU check needs besides torch and triton,
# for a GPU machine without network (tools/gpu_check.sh --wheels DIR).
#
#   bash tools/gpu_wheels.sh divprec-wheels/      # same Python minor version as the GPU machine
#
# The dependency closure comes from a scratch virtual environment holding a CPU torch (small) and
# divprec's dependencies; torch itself, triton and NVIDIA's libraries are left out (the GPU machine
# has its own). DeepSpeed is a source distribution on PyPI: its wheel is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$(mkdir -p "${1:-divprec-wheels}" && cd "${1:-divprec-wheels}" && pwd)
PY=${PYTHON:-python3}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  --index-url https://download.pytorch.org/whl/cpu torch
"$venv/bin/pip" install --quiet --disable-pip-version-check . pytest pytest-timeout setuptools wheel
"$venv/bin/pip" freeze --exclude-editable \
  | grep -viE '^(torch|triton|nvidia-|divprec)' >"$dest/requirements.txt"
grep -iE '^deepspeed==' "$dest/requirements.txt" | xargs -r "$venv/bin/pip" wheel --quiet \
  --no-deps --no-build-isolation -w "$dest"
grep -viE '^deepspeed==' "$dest/requirements.txt" | "$venv/bin/pip" download --quiet --no-deps \
  -d "$dest" -r /dev/stdin
echo "wheels for the GPU check in $dest ($(ls "$dest" | wc -l) files)"
