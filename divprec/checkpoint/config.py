"""Checkpointing configuration (the Hydra group ``checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from divprec.checkpoint.layout import LATEST, check_complete


@dataclass
class CheckpointConfig:
    """Where and how often sharded checkpoints are written, and what a run resumes from.

    ``dir`` None: ``<run.dir>/checkpoints``. ``interval`` 0 saves only at the end of training.
    ``resume`` "auto" continues from ``<dir>/latest`` when it exists; "never" starts fresh.
    ``load`` names a checkpoint directory to start from (overrides ``resume``).
    ``async_save``: interval saves are written by a background process while training goes on
    (megatron-core's async torch_dist writer; on CPU the forked writer's memory is the snapshot);
    ``latest`` moves when all ranks' files are written. The final and preemption saves wait.
    """

    dir: str | None = None
    interval: int = 0
    keep_last: int | None = 3
    async_save: bool = False
    resume: str = "auto"  # "auto" | "never"
    load: str | None = None


def validate_checkpoint_load(load: str | None) -> None:
    """Raise ValueError (one line) unless ``load`` is None or a complete checkpoint directory."""
    if load is None:
        return
    path = Path(load).expanduser()
    status = check_complete(path)
    if status.complete:
        return
    fix = "point it at a complete step_* directory"
    if (path / LATEST).is_file():  # the checkpoints folder itself rather than one of its steps
        fix = f"point it at {path / (path / LATEST).read_text().strip()} (named by {LATEST})"
    raise ValueError(f"checkpoint.load={load}: not a checkpoint ({status.reason}); {fix}")
