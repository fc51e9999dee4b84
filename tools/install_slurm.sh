#!/usr/bin/env bash
# Installs a local SLURM (Debian packages slurmctld, slurmd, slurm-client, munge) for the SLURM
# integration tests (tests/integration/test_slurm.py). Idempotent: does nothing when the daemons
# and client commands are already on PATH. Needs root and apt (Debian/Ubuntu).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
have_all() {
  local cmd
  for cmd in slurmctld slurmd sbatch scontrol squeue munged; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || return 1
  done
}

if have_all; then
  echo "[install_slurm] SLURM and munge already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "[install_slurm] needs root (apt-get install ${PACKAGES[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_slurm] apt-get not found: install ${PACKAGES[*]} with your package manager" >&2
  exit 1
fi

echo "[install_slurm] installing ${PACKAGES[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' postinst scripts try to start the daemons through systemd; without systemd
# (containers, CI) that fails harmlessly. policy-rc.d keeps invoke-rc.d from trying at all.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
have_all || { echo "[install_slurm] installation incomplete" >&2; exit 1; }
echo "[install_slurm] done: slurm $(dpkg-query -W -f '${Version}' slurmctld 2>/dev/null)"
