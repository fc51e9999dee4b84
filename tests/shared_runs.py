"""A training run that several test files read, trained once per pytest session: the tiny model
trained 1 step at tensor 2 x pipeline 2 (tests/conftest.py's ``tiny_tp2_pp2_run``), read by
tests/integration/test_checkpoint_tool.py and test_hf_interop.py.

It trains with a small learning rate, so that greedy generations are not one repeated token, and
Adam's eps at 1e-3: with the default eps a weight whose gradient is ~1e-8 moves by ~lr on float
noise, so layouts would differ by 1e-4 in a few elements; a larger eps keeps the update
proportional to the gradient and the layouts' weights equal to ~1e-6.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from toy_model import tiny_run

STEP = "step_0000001"
INTEROP_RUN = tiny_run(
    "train.steps=1",
    "optim.lr=3e-5",
    "optim.final_lr=3e-6",
    "optim.adam_eps=1e-3",
)
TP2_PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]
# Nothing in these runs touches the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def train(rank: int, world: int, overrides: list[str], run_dir: str) -> list[dict]:
    """One rank of ``INTEROP_RUN`` with ``overrides``; its logged metrics."""
    from divprec.config.compose import compose_config
    from divprec.train.trainer import pretrain

    os.environ.update(OFFLINE)
    return pretrain(compose_config([*INTEROP_RUN, *overrides, f"run.dir={run_dir}"])).history


class BackgroundRun:
    """A run trained in a background thread from the first :meth:`start`, so that a test file can
    train its own runs meanwhile; :meth:`result` waits for it (and re-raises its failure)."""

    def __init__(self, run_dir: Path, world: int, overrides: list[str]) -> None:
        self.run_dir, self.world, self.overrides = run_dir, world, overrides
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._train, daemon=True)
            self._thread.start()

    def _train(self) -> None:
        from divprec.parallel.spawn import run_in_processes

        try:
            run_in_processes(train, self.world, self.overrides, str(self.run_dir))
        except BaseException as err:  # re-raised by every result()
            self._error = err

    def result(self) -> Path:
        """The run directory, once trained."""
        self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the shared run in {self.run_dir} failed") from self._error
        return self.run_dir
