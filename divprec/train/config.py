"""Training-loop and optimizer configuration (the Hydra groups ``train`` and ``optim``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    """AdamW with a warmup-stable-decay learning rate (the paper: warmup 2000, 3e-4, decay to 3e-5).

    Steps [0, warmup) ramp linearly to ``lr``; the next ``stable_steps`` hold it; the last
    ``decay_steps`` go to ``final_lr`` following ``decay_style``. ``stable_steps`` None: whatever
    train.steps leaves after warmup and decay. ``decay_fraction`` (instead of ``decay_steps``):
    decay over that fraction of train.steps, so one schedule fits runs of any length. A schedule
    longer than train.steps (a smoke run) shrinks to fit, with one warning (see ``phases``).
    """

    lr: float = 3e-4
    final_lr: float = 3e-5
    warmup_steps: int = 2000
    stable_steps: int | None = None
    decay_steps: int = 0
    decay_fraction: float | None = None
    decay_style: str = "linear"  # "linear" | "cosine" | "sqrt"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def decay_length(self, total_steps: int) -> int:
        """Steps of the decay phase of a ``total_steps`` run, as configured."""
        if self.decay_fraction is not None:
            return round(self.decay_fraction * total_steps)
        return self.decay_steps

    def configured_phases(self, total_steps: int) -> tuple[int, int, int]:
        """(warmup, stable, decay) steps as configured; their sum may exceed ``total_steps``."""
        decay = self.decay_length(total_steps)
        stable = self.stable_steps
        if stable is None:
            stable = max(0, total_steps - self.warmup_steps - decay)
        return self.warmup_steps, stable, decay

    def phases(self, total_steps: int) -> tuple[int, int, int]:
        """(warmup, stable, decay) steps of a ``total_steps`` run.

        A schedule longer than the run (a smoke run of a few steps) shrinks to fit: the run is
        shared among the phases in proportion to their configured lengths (largest remainders,
        so the phases fill the run exactly).
        """
        wanted = self.configured_phases(total_steps)
        if sum(wanted) <= total_steps:
            return wanted
        shares = [total_steps * n / sum(wanted) for n in wanted]
        fitted = [int(share) for share in shares]
        by_remainder = sorted(range(3), key=lambda i: shares[i] - fitted[i], reverse=True)
        for i in by_remainder[: total_steps - sum(fitted)]:
            fitted[i] += 1
        return fitted[0], fitted[1], fitted[2]


@dataclass
class TrainConfig:
    """Steps, batch geometry, seed and numeric precision.

    ``global_batch_size`` sequences per optimizer step = micro_batch_size x data parallel x
    microbatches; megatron-core's schedule runs the microbatches. ``precision`` "auto" is bf16 with
    CUDA and fp32 on CPU.
    """

    steps: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_length: int = 256
    seed: int = 1234
    precision: str = "auto"  # "auto" | "bf16" | "fp32"
