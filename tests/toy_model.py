"""Shared Hydra overrides of the tests: the 2-layer toy model the evaluation and RL tests build in
process, and the quick run of the ``tiny`` model the integration tests train; and the callback
that preempts such a run at a chosen step."""

import signal
import threading

from divprec.metrics.callback import Callback

TOY_MODEL = [
    "train.seq_length=64",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
]

_TINY_RUN = {
    "train.seq_length": "64",
    "train.global_batch_size": "8",
    "train.micro_batch_size": "2",
    "optim.warmup_steps": "1",
    "logging.wandb.mode": "disabled",
    "logging.progress": "false",
}


def tiny_run(*overrides: str) -> list[str]:
    """A few-second run of the tiny model; ``overrides`` (key=value) add keys or replace them."""
    replaced = {o.split("=", 1)[0] for o in overrides}
    return [f"{k}={v}" for k, v in _TINY_RUN.items() if k not in replaced] + list(overrides)


class SignalAt(Callback):
    """Sends SIGUSR1 to this process after a step, as SLURM would ahead of a time limit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state, metrics) -> None:
        if state.step == self.step and state.is_logging_rank:
            # To the main thread: a signal to the process may be taken by a thread that existed
            # before the trainer blocked it (this test's process group), and then reaches the
            # trainer a step later. SLURM's signal is asynchronous anyway; the test needs the
            # stop at this very step.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
