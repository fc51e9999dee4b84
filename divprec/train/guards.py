"""A diverging run stops instead of training on NaN: loss-spike detection (consulted by the
step) and the end-of-step divergence guard."""

from __future__ import annotations

import logging
import math
from collections import deque

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


class LossSpikes:
    """z-scores of the loss and the gradient norm against the last ``window`` applied steps, as
    OLMo-core's spike detection: reported every step (``loss_zscore``, ``grad_norm_zscore``) once
    the window is full, a warning above ``threshold``, and with ``skip`` an update whose loss
    z-score is above it is skipped. Every rank sees the same values, so all decide alike."""

    def __init__(self, window: int, threshold: float, skip: bool) -> None:
        self.threshold, self.skip = threshold, skip
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)

    @staticmethod
    def _zscore(value: float, history: deque[float]) -> float | None:
        if len(history) < history.maxlen:
            return None
        mean = sum(history) / len(history)
        std = math.sqrt(sum((x - mean) ** 2 for x in history) / (len(history) - 1))
        return (value - mean) / std if std > 0 else None

    def skip_reason(self, loss: float) -> str | None:
        """Why the update of a step with this loss is to be skipped, before it is applied."""
        z = self._zscore(loss, self.losses)
        if self.skip and z is not None and z > self.threshold:
            return f"loss spike (z-score {z:.1f} > train.loss_spike_zscore={self.threshold:g})"
        return None

    def record(self, loss: float, grad_norm: float, skipped: str | None) -> dict[str, float]:
        """This step's z-scores; an applied step joins the window."""
        scores = {"loss_zscore": self._zscore(loss, self.losses)}
        if math.isfinite(grad_norm):
            scores["grad_norm_zscore"] = self._zscore(grad_norm, self.grad_norms)
        scores = {k: v for k, v in scores.items() if v is not None}
        spiking = {k: v for k, v in scores.items() if v > self.threshold}
        if spiking and skipped is None:
            logger.warning(
                "spike: %s above train.loss_spike_zscore=%g",
                ", ".join(f"{k} {v:.1f}" for k, v in spiking.items()),
                self.threshold,
            )
        if skipped is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
        return scores


class DivergenceGuard(Callback):
    """Warns at every skipped update (train_step skips a step whose loss or gradient norm is not
    finite, or a loss spike when so configured, on every rank alike) and stops the run after
    ``max_skipped_steps`` in a row."""

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
                "step %d: %s; update skipped (%d in a row, the limit is "
                "train.max_skipped_steps=%d)",
                state.step,
                state.skipped,
                self.consecutive,
                self.max_skipped_steps,
            )
        if self.consecutive >= self.max_skipped_steps:
            raise Diverged(
                f"divprec: error: training diverged: {self.consecutive} consecutive updates up to "
                f"step {state.step} were skipped (the last: {state.skipped}); lower optim.lr or "
                "check the data, then resume from the last checkpoint"
            )
