"""When to save and what to resume from, for one run (the trainer's single point of contact)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from divprec.checkpoint.checkpointer import Progress, load_checkpoint, save_checkpoint
from divprec.checkpoint.config import CheckpointConfig
from divprec.checkpoint.layout import resolve_latest

logger = logging.getLogger(__name__)


class CheckpointManager:
    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str,
        model: torch.nn.Module,
        engine,
        layout: dict,
        extra_files: dict[str, Path],
    ) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir or Path(run_dir) / "checkpoints").expanduser().resolve()
        self.model, self.engine, self.layout, self.extra_files = model, engine, layout, extra_files
        self.last_saved_step: int | None = None

    def resume(self) -> Progress | None:
        """Load ``checkpoint.load``, else (``resume=auto``) the latest complete checkpoint."""
        if self.cfg.load:
            path = Path(self.cfg.load).expanduser().resolve()
        elif self.cfg.resume == "auto":
            path = resolve_latest(self.root)
        else:
            path = None
        if path is None:
            return None
        logger.info("resuming from checkpoint %s", path)
        progress = load_checkpoint(path, self.model, self.engine, self.layout)
        self.last_saved_step = progress.step
        return progress

    def save(self, progress: Progress) -> Path:
        path = save_checkpoint(
            self.root, progress, self.model, self.layout, self.extra_files, self.cfg.keep_last
        )
        self.last_saved_step = progress.step
        logger.info("saved checkpoint %s", path)
        return path

    def maybe_save(self, progress: Progress, total_steps: int) -> None:
        """Save every ``checkpoint.interval`` steps and at the end of training."""
        due = self.cfg.interval > 0 and progress.step % self.cfg.interval == 0
        if (due or progress.step == total_steps) and self.last_saved_step != progress.step:
            self.save(progress)
