"""Configuration of metric logging (the Hydra group ``logging``): cadence, sinks, MFU peak."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases sink. "offline" writes under the run directory and needs no login or
    network (upload later with ``wandb sync <run_dir>/wandb/offline-run-*``)."""

    mode: str = "offline"  # "offline" | "online" | "disabled"
    project: str = "divprec"
    entity: str | None = None
    name: str | None = None  # None: wandb picks a name
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """What is logged, how often, and where.

    - ``interval``: metrics are reduced across ranks and logged every ``interval`` steps (and on the
      last step). The reduction is a collective, so every rank must agree: use :meth:`should_log`.
    - ``progress``: a tqdm bar on global rank 0 (turn off under SLURM, where the console line is
      the useful record).
    - ``jsonl``: append one JSON object per logged step to ``<run_dir>/metrics.jsonl``.
    - ``peak_tflops``: per-device peak for MFU; None looks it up from the device name (bf16 dense),
      and an unknown device or the CPU logs no MFU.
    """

    interval: int = 1
    progress: bool = True
    jsonl: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: float | None = None

    def should_log(self, step: int, total_steps: int) -> bool:
        """Whether ``step`` (1-based, counted after the optimizer step) is a logging step."""
        return step % self.interval == 0 or step == total_steps


def validate_logging_config(cfg: LoggingConfig) -> None:
    """Raise ValueError with one line naming the key and the fix; accepts a DictConfig too."""
    interval = cfg.interval
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(
            f"logging.interval must be an integer >= 1 (log every N steps), got {interval!r}"
        )
    mode = cfg.wandb.mode
    if mode not in WANDB_MODES:
        raise ValueError(
            f"logging.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}"
        )
    if not cfg.wandb.project:
        raise ValueError("logging.wandb.project must be a non-empty string, e.g. divprec")
    peak = cfg.peak_tflops
    if peak is not None and (
        isinstance(peak, bool)
        or not isinstance(peak, (int, float))
        or not math.isfinite(peak)
        or peak <= 0
    ):
        raise ValueError(
            f"logging.peak_tflops must be a positive number (per-device peak TFLOP/s) or null "
            f"to look it up from the device, got {peak!r}"
        )
