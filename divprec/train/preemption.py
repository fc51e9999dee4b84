"""Preemption: SIGTERM or SIGUSR1 -> finish the step, save, write a marker, exit 75.

SLURM sends SIGUSR1 ahead of a time limit (``--signal=USR1@<s>``) and SIGTERM on preemption. The
signal may reach the ranks at different steps, so they agree after every step (one all-reduce MAX
of a flag); all stop after the same step. Rank 0 then writes ``<run.dir>/preempted.json``, which
launch/pretrain.slurm reads to requeue the job (torchrun does not pass the exit code through).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, try again (the job is requeued)
MARKER = "preempted.json"


class PreemptionWatcher:
    """Records SIGTERM/SIGUSR1 instead of dying; :meth:`should_stop` is the ranks' agreement."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal. Collective: all-reduce MAX [1]."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def write_marker(self, run_dir: str, step: int, checkpoint: Path) -> None:
        info = {
            "step": step,
            "signal": self.received or "peer rank",
            "checkpoint": str(checkpoint),
            "time": time.time(),
            "exit_code": PREEMPTED_EXIT_CODE,
        }
        path = Path(run_dir) / MARKER
        tmp = path.with_name(MARKER + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; the process exits with code 75."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
