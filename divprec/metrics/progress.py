"""A tqdm progress bar with ETA on the logging rank, for interactive runs (a terminal only)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from divprec.metrics.callback import Callback, TrainState

_POSTFIX = ("loss", "lm_loss")


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar(Callback):
    """Steps done out of ``total_steps`` (starting at the resumed step) with ETA, and the latest
    loss, lm_loss and tokens/s. Writes to stderr at most every ``mininterval`` seconds.

    While the bar is up, records of the root logger's console handlers go through ``tqdm.write``
    so log lines (e.g. :class:`ConsoleLogger`) do not tear the bar.

    When stderr is not a terminal (a SLURM .out file, a pipe, a CI log) there is no bar: its
    carriage-return frames would pile up in the file, and the plain step lines say the same.
    """

    def __init__(self, mininterval: float = 1.0) -> None:
        self.mininterval = mininterval
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_logging_rank or not _is_terminal(sys.stderr):
            return
        self._bar = tqdm(
            total=state.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            file=sys.stderr,
            mininterval=self.mininterval,
            dynamic_ncols=True,
        )
        self._redirect.enter_context(logging_redirect_tqdm())

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if self._bar is None:
            return
        if metrics is not None:
            postfix: dict[str, Any] = {k: f"{metrics[k]:.4f}" for k in _POSTFIX if k in metrics}
            if "tokens_per_s" in metrics:
                postfix["tok/s"] = tqdm.format_sizeof(metrics["tokens_per_s"])
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(state.step - self._bar.n)

    def on_train_end(self, state: TrainState) -> None:
        self._redirect.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
