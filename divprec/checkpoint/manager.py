"""When to save and what to resume from, for one run (the trainer's single point of contact)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from divprec.checkpoint.checkpointer import (
    Progress,
    load_checkpoint,
    refuse_non_finite,
    save_checkpoint,
)
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
        self.last_saved: tuple[int, Path] | None = None  # (step, path) saved or resumed from
        self._async_queue = None
        if cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()

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
        self.last_saved = (progress.step, path)
        return progress

    def save(self, progress: Progress, wait: bool = True) -> Path:
        """Save; ``wait=False`` with ``checkpoint.async_save`` lets the writing overlap training.

        A step already saved (or resumed from) is not written again: its path is returned.
        Refuses (CheckpointError) weights or optimizer state that are not finite.
        """
        if self.last_saved is not None and self.last_saved[0] == progress.step:
            if wait:
                self.finalize(blocking=True)
            return self.last_saved[1]
        self.finalize(blocking=True)  # one save in flight at a time
        refuse_non_finite(self.model, self.engine, progress.step)
        background = self._async_queue is not None and not wait
        path = save_checkpoint(
            self.root,
            progress,
            self.model,
            self.layout,
            self.extra_files,
            self.cfg.keep_last,
            async_queue=self._async_queue if background else None,
        )
        self.last_saved = (progress.step, path)
        logger.info("%s checkpoint %s", "writing" if background else "saved", path)
        return path

    def maybe_save(self, progress: Progress, total_steps: int) -> None:
        """Save every ``checkpoint.interval`` steps (in the background with async_save) and,
        waiting for it, at the end of training."""
        self.finalize(blocking=False)
        last = progress.step == total_steps
        due = self.cfg.interval > 0 and progress.step % self.cfg.interval == 0
        if due or last:
            self.save(progress, wait=last)

    def finalize(self, blocking: bool) -> None:
        """Commit background saves that finished (all of them when ``blocking``).

        Collective while a background save is pending: one all-reduce per call.
        """
        if self._async_queue is not None and self._async_queue.get_num_unfinalized_calls():
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)
