"""Preemption: SIGTERM or the preemption signal (SIGUSR1 by default) -> finish the step, save,
write a marker, exit 75.

SLURM sends the preemption signal ahead of a time limit (``--signal=USR1@<s>``) and SIGTERM on
preemption, to every process of the job step: the training processes and every child they
started (megatron-core's checkpoint writer and its Manager, DataLoader workers, compile workers,
the wandb service, the loss kernel's compiler). :meth:`PreemptionWatcher.install` therefore
*blocks* the signals in the training process before any child exists; a blocked signal mask is
inherited across fork and exec, so a child leaves the signal pending instead of dying from it. The
training process takes its pending signals after every step. The ranks may see the signal
at different steps, so they agree after every step (one all-reduce MAX of a flag); all stop after
the same step. Rank 0 then writes ``<run.dir>/preempted.json``, which launch/pretrain.slurm reads
to requeue the job (torchrun does not pass the exit code through).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from divprec.checkpoint.checkpointer import Progress
from divprec.checkpoint.manager import CheckpointManager
from divprec.metrics.callback import Callback, TrainState

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, try again (the job is requeued)
MARKER = "preempted.json"


def preemption_signals(name: str) -> tuple[signal.Signals, ...]:
    """SIGTERM and the named signal ("USR1", "SIGUSR2", ...), as the watcher takes them."""
    sig = signal.Signals["SIG" + name.upper().removeprefix("SIG")]
    return tuple(dict.fromkeys((signal.SIGTERM, sig)))


class PreemptionWatcher:
    """Records the signals instead of dying; :meth:`should_stop` is the ranks' agreement."""

    def __init__(self, signal_name: str = "USR1") -> None:
        self.signals = preemption_signals(signal_name)
        self.received: str | None = None
        self._previous_handlers: dict[int, object] = {}
        self._previous_mask: set[int] | None = None

    def install(self) -> None:
        """Block the signals (inherited by every child started from now on): they stay pending
        until :meth:`poll` takes them. A handler catches them in threads that existed before and
        do not block them."""
        for sig in self.signals:
            self._previous_handlers[sig] = signal.signal(sig, self._handle)
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)

    def poll(self) -> str | None:
        """Take the pending signals (without waiting); the name of the one received, if any."""
        if self._previous_mask is not None:
            while (info := signal.sigtimedwait(self.signals, 0)) is not None:
                self._record(info.si_signo)
        return self.received

    def _handle(self, signum: int, frame) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        if self.received is None:
            logger.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.received = signal.Signals(signum).name

    def uninstall(self) -> None:
        """Take what is pending, then restore the mask and the handlers."""
        self.poll()
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._previous_mask = None
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank when any rank received a signal. Collective: all-reduce MAX [1]."""
        flag = torch.tensor([1.0 if self.poll() else 0.0], device=device)
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
    """Raised after the preemption checkpoint is saved; the process exits with code 75.

    Under torchrun the code is 0: torchrun restarts a worker group with a failed worker (its
    ``--max-restarts``), and a preempted group must stay stopped. The marker file is the launcher's
    signal in both cases (torchrun passes no worker's exit code through).
    """

    def __init__(self) -> None:
        super().__init__(0 if "TORCHELASTIC_RUN_ID" in os.environ else PREEMPTED_EXIT_CODE)


class PreemptionHook(Callback):
    """After every step but the last: if any rank was signalled, save and raise :class:`Preempted`.

    Collectives: the watcher's agreement (every step); the save when stopping.
    """

    def __init__(
        self, watcher: PreemptionWatcher, checkpoints: CheckpointManager, device: torch.device
    ) -> None:
        self.watcher, self.checkpoints, self.device = watcher, checkpoints, device

    def on_train_start(self, state: TrainState) -> None:
        if state.is_logging_rank:
            (Path(state.run_dir) / MARKER).unlink(missing_ok=True)  # an earlier attempt's

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if state.step >= state.total_steps or not self.watcher.should_stop(self.device):
            return
        path = self.checkpoints.save(Progress(state.step, state.consumed_samples))
        if state.is_logging_rank:
            self.watcher.write_marker(state.run_dir, state.step, path)
        logger.warning(
            "stopped by %s after step %d; saved %s",
            self.watcher.received or "a peer rank's signal",
            state.step,
            path,
        )
        raise Preempted()
