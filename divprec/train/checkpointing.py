"""Interval and final checkpoints as an end-of-step hook."""

from __future__ import annotations

from divprec.checkpoint.checkpointer import Progress
from divprec.checkpoint.manager import CheckpointManager
from divprec.metrics.callback import Callback, TrainState


class CheckpointHook(Callback):
    """Saves every ``checkpoint.interval`` steps (in the background with ``async_save``) and, waiting
    for it, after the last step; commits finished background saves after each step.

    Collectives: the save's (see divprec.checkpoint.checkpointer.save_checkpoint) and, while a
    background save is pending, one all-reduce per step.
    """

    def __init__(self, checkpoints: CheckpointManager) -> None:
        self.checkpoints = checkpoints

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        self.checkpoints.maybe_save(Progress(state.step, state.consumed_samples), state.total_steps)
