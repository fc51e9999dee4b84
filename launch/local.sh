#!/usr/bin/env bash
# divprec pre-training on one machine.
#   bash launch/local.sh [hydra overrides]     # one process per visible GPU (1 without a GPU)
#   NPROC_PER_NODE=2 bash launch/local.sh parallel.tensor=2      # torchrun --standalone
# Visible GPUs: those of nvidia-smi -L, narrowed by CUDA_VISIBLE_DEVICES.
# DIVPREC_PYTHON picks the interpreter (default python3). Without a GPU, DeepSpeed runs on CPU.
# With several processes, torchrun restarts the group up to MAX_RESTARTS times (default 3) when
# a process dies; each restart resumes from the latest checkpoint of the same run.dir, which is
# therefore fixed here (runs/<timestamp>) unless given.
set -euo pipefail
PYTHON=${DIVPREC_PYTHON:-python3}

# visible-gpus: the GPUs a process started here may use: those nvidia-smi lists, narrowed by
# CUDA_VISIBLE_DEVICES as CUDA reads it (indices or UUIDs, comma-separated; the list ends at the
# first entry that names no GPU; set but empty: none). 0 without nvidia-smi.
visible_gpus() {
  local listing total entry count=0
  listing=$(nvidia-smi -L 2>/dev/null || true)
  total=$(grep -c '^GPU' <<<"$listing" || true)
  if [[ -z ${CUDA_VISIBLE_DEVICES+set} ]]; then
    echo "$total"
    return
  fi
  local IFS=,
  for entry in $CUDA_VISIBLE_DEVICES; do
    entry=${entry// /}
    if [[ $entry =~ ^[0-9]+$ ]] && ((10#$entry < total)); then
      count=$((count + 1))
    elif [[ $entry == GPU-* || $entry == MIG-* ]] && grep -qF "UUID: $entry" <<<"$listing"; then
      count=$((count + 1))
    else
      break
    fi
  done
  echo $((count < total ? count : total))
}
# end visible-gpus
gpus=$(visible_gpus)
NPROC=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
if ((gpus == 0)); then
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
