"""A diverging run stops instead of training on NaN: the end-of-step divergence guard."""

from __future__ import annotations

import logging

from divprec.metrics.callback import Callback, TrainState

logger = logging.getLogger(__name__)

DIVERGED_EXIT_CODE = 3  # not 75: a requeue would only diverge again


class Diverged(SystemExit):
    """Too many consecutive skipped updates; the process exits with :data:`DIVERGED_EXIT_CODE`."""

    def __init__(self, message: str) -> None:
        super().__init__(DIVERGED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DivergenceGuard(Callback):
    """Warns at every skipped update (train_step skips a step whose loss or gradient norm is not
    finite, on every rank alike) and stops the run after ``max_skipped_steps`` in a row."""

    def __init__(self, max_skipped_steps: int) -> None:
        self.max_skipped_steps = max_skipped_steps
        self.consecutive = 0

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if state.skipped is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        if state.is_logging_rank:
            logger.warning(
                "step %d: %s not finite; update skipped (%d in a row, the limit is "
                "train.max_skipped_steps=%d)",
                state.step,
                state.skipped,
                self.consecutive,
                self.max_skipped_steps,
            )
        if self.consecutive >= self.max_skipped_steps:
            raise Diverged(
                f"divprec: error: training diverged: {self.consecutive} consecutive steps up to "
                f"step {state.step} had a non-finite {state.skipped}; lower optim.lr or check the "
                "data, then resume from the last checkpoint"
            )
