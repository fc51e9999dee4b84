#!/usr/bin/env bash
# divprec pre-training on one machine.
#   bash launch/local.sh [hydra overrides]                        # one process
#   NPROC_PER_NODE=2 bash launch/local.sh parallel.tensor=2      # torchrun --standalone
# DIVPREC_PYTHON picks the interpreter (default python3). Without a GPU, DeepSpeed runs on CPU.
set -euo pipefail
PYTHON=${DIVPREC_PYTHON:-python3}
NPROC=${NPROC_PER_NODE:-1}

if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # megatron-core TP overlap

if [[ $NPROC == 1 ]]; then
  exec "$PYTHON" -m divprec.pretrain "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m divprec.pretrain "$@"
