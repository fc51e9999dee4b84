"""Weights & Biases sink: one run per run directory, continued across resumed jobs."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from divprec.metrics.callback import Callback, TrainState
from divprec.metrics.config import WandbConfig

logger = logging.getLogger(__name__)

ID_FILENAME = "wandb_id.txt"


def run_id_for(run_dir: str) -> str:
    """The wandb run id persisted in ``<run_dir>/wandb_id.txt``, created on first use, so every job
    of a run (fresh, then resumed) logs to the same wandb run."""
    path = os.path.join(run_dir, ID_FILENAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], a valid wandb id
    os.makedirs(run_dir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class WandbLogger(Callback):
    """Logs each logged step's metrics (and ``consumed_samples``) at ``step=state.step``.

    Acts on the logging rank only; mode "disabled" does nothing and never imports wandb. Offline
    runs land in ``<run_dir>/wandb/offline-run-*`` (one folder per job, same id); upload them
    with ``wandb sync <run_dir>/wandb/offline-run-*``, which appends the jobs in start order.
    """

    def __init__(self, cfg: WandbConfig) -> None:
        self.cfg = cfg
        self.run: Any = None

    def on_train_start(self, state: TrainState) -> None:
        if not state.is_logging_rank or self.cfg.mode == "disabled":
            return
        if self.cfg.mode == "offline":
            # wandb-core reports its own errors over the network unless told not to.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb  # here, not at module level: ~0.5 s, and unused on other ranks

        os.makedirs(state.run_dir, exist_ok=True)
        self.run = wandb.init(
            mode=self.cfg.mode,
            dir=state.run_dir,
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name,
            tags=list(self.cfg.tags),
            config=state.config,
            id=run_id_for(state.run_dir),
            resume="allow",
            settings=wandb.Settings(
                silent=True,  # wandb's banners; the line below says where the run went
                console="off",  # no capture of stdout/stderr (the progress bar, SLURM logs)
            ),
        )
        where = self.run.url if self.cfg.mode == "online" else self.run.dir
        logger.info("wandb run %s (%s): %s", self.run.id, self.cfg.mode, where)

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        if self.run is None or metrics is None:
            return
        data = {k: float(v) for k, v in metrics.items()}
        data["consumed_samples"] = state.consumed_samples
        self.run.log(data, step=state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
