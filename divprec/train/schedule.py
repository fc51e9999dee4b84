"""Warmup-stable-decay learning rate, a pure function of the step (nothing to save or restore)."""

from __future__ import annotations

import math

from divprec.parallel.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    [0, warmup): linear from lr/warmup to lr. Then hold lr. The last decay steps (or those after
    warmup + stable_steps, when set) go from lr to final_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_len = cfg.decay_length(total_steps)
    if cfg.stable_steps is not None:
        decay_start = cfg.warmup_steps + cfg.stable_steps
    else:
        decay_start = total_steps - decay_len
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
