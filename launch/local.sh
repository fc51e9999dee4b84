#!/usr/bin/env bash
# divprec pre-training on one machine.
#   bash launch/local.sh [hydra overrides]                        # one process
#   NPROC_PER_NODE=2 bash launch/local.sh parallel.tensor=2      # torchrun --standalone
# DIVPREC_PYTHON picks the interpreter (default python3). Without a GPU, DeepSpeed runs on CPU.
# With several processes, torchrun restarts the group up to MAX_RESTARTS times (default 3) when
# a process dies; each restart resumes from the latest checkpoint of the same run.dir, which is
# therefore fixed here (runs/<timestamp>) unless given.
set -euo pipefail
PYTHON=${DIVPREC_PYTHON:-python3}
NPROC=${NPROC_PER_NODE:-1}

if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # megatron-core TP overlap
# A fresh rendezvous store for every restart: with torchrun's shared one, a restarted group reads
# the previous group's addresses and hangs.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

if [[ $NPROC == 1 ]]; then
  exec "$PYTHON" -m divprec.pretrain "$@"
fi
ARGS=("$@")
case " $* " in
  *" run.dir="* | *" +run.dir="* | *" ++run.dir="*) ;;
  *) ARGS+=("run.dir=runs/$(date +%Y%m%d-%H%M%S)") ;;
esac
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  --max-restarts "${MAX_RESTARTS:-3}" -m divprec.pretrain "${ARGS[@]}"
