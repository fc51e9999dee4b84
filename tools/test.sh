#!/usr/bin/env bash
# The test command: sets up the environment, then runs the suite.
#   - The CPU tier (everything not marked gpu) always runs, on CPU: tests/conftest.py hides CUDA
#     from it, so a GPU host runs it exactly as a CPU machine does.
#   - On a host with CUDA, the GPU tier (`-m gpu`: the loss kernels, the model build, a bf16
#     training step, a checkpoint round trip on the GPU) runs after it. Without CUDA its tests
#     skip (they are part of the CPU tier's run, reported as skipped).
# Extra arguments go to pytest in both tiers, e.g. `bash tools/test.sh -x`; with `-m EXPR` only the
# CPU tier runs, with that expression (e.g. `bash tools/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY="${PYTHON:-python3}"
has_cuda() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}
marker_given=0
for arg in "$@"; do
  [[ $arg == -m || $arg == -m* ]] && marker_given=1
done
if [[ $marker_given == 1 ]] || ! has_cuda; then
  exec "$PY" -m pytest "$@"
fi
echo "== CPU tier (CUDA hidden) =="
"$PY" -m pytest -m "not gpu" "$@"
echo "== GPU tier =="
DIVPREC_TEST_TIER=gpu exec "$PY" -m pytest -m gpu "$@"
