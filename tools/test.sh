#!/usr/bin/env bash
# The test command: sets up the environment, then runs the whole CPU suite (GPU tests skip).
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export DS_ACCELERATOR=cpu
exec "${PYTHON:-python3}" -m pytest "$@"
