#!/usr/bin/env bash
# The test command: sets up the environment, then runs the suite.
#   bash tools/test.sh          the default run (CI's): every test not marked slow, ~16 min on 2 cores
#   bash tools/test.sh --all    also the slow ones (the other cases of the same end-to-end tests)
#   - The CPU tier (everything not marked gpu) always runs, on CPU: tests/conftest.py hides CUDA
#     from it, so a GPU host runs it exactly as a CPU machine does.
#   - On a host with CUDA, the GPU tier (`-m gpu`: the loss kernels compiled, the model build, a
#     bf16 training step, a checkpoint round trip on the GPU) runs after it. Without CUDA its
#     tests skip (they are part of the CPU tier's run, reported as skipped).
# Extra arguments go to pytest in both tiers, e.g. `bash tools/test.sh -x`; with `-m EXPR` only the
# CPU tier runs, with that expression (e.g. `bash tools/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
args=()
for arg in "$@"; do
  if [[ $arg == --all ]]; then all=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
bash tools/setup_env.sh
PY="${PYTHON:-python3}"
has_cuda() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}
marker_given=0
for arg in "$@"; do
  [[ $arg == -m || $arg == -m* ]] && marker_given=1
done
if [[ $marker_given == 1 ]]; then
  exec "$PY" -m pytest "$@"
fi
lean=()
[[ $all == 1 ]] || lean=(and not slow)
if ! has_cuda; then
  if [[ $all == 1 ]]; then exec "$PY" -m pytest "$@"; fi
  exec "$PY" -m pytest -m "not slow" "$@"
fi
echo "== CPU tier (CUDA hidden) =="
"$PY" -m pytest -m "not gpu ${lean[*]-}" "$@"
echo "== GPU tier =="
DIVPREC_TEST_TIER=gpu exec "$PY" -m pytest -m gpu "$@"
