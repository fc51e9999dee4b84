"""Warmup-stable-decay learning rate, a pure function of the step (nothing to save or restore)."""

from __future__ import annotations

import math

from divprec.parallel.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    [0, warmup): linear from lr/warmup to lr. Then hold lr for the stable steps; the decay steps
    go from lr to final_lr (and final_lr holds after them). The phases are
    ``OptimConfig.phases``: a schedule longer than the run is shrunk to fit it.
    """
    warmup, stable, decay_len = cfg.phases(total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_start = warmup + stable
    if step < decay_start or decay_len == 0:
        return cfg.lr
    progress = min(1.0, (step - decay_start + 1) / decay_len)
    if cfg.decay_style == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay_style == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:
        shape = 1.0 - progress
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * shape
