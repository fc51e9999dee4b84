"""The hooks the training loop calls, and the state it passes to them.

Side tasks (logging sinks, progress display, and in divprec.train checkpointing, preemption and
the divergence guard) are callbacks, not branches in the loop. Every rank calls every hook in the
same order, so a hook may run collectives; each callback decides itself whether it acts on this
rank, so the loop stays free of rank checks. Metrics arrive already reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """What callbacks may read about the run.

    ``step`` counts optimizer steps done (at train start: the step resumed from, 0 for a fresh
    run). ``is_logging_rank`` is true on global rank 0 only. ``config`` is the resolved config as
    plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
    """

    step: int
    total_steps: int
    consumed_samples: int
    run_dir: str
    is_logging_rank: bool
    config: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class: every hook is a no-op, so a callback overrides only what it needs."""

    def on_train_start(self, state: TrainState) -> None:
        """Before the first step (also after a resume, with ``state.step`` the resumed step)."""

    def on_step_end(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        """After each optimizer step; ``metrics`` only on logging steps, else None."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step, or when training stops early (e.g. preemption)."""
