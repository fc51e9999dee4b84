"""Parallel layout and optimizer configuration (the Hydra groups ``parallel`` and ``optim``).

The optimizer is configured here because DeepSpeed, which owns it, is built in this layer.
"""

from __future__ import annotations

from dataclasses import dataclass

# DeepSpeed's default gradient-reduction bucket (elements). DeepSpeed allocates a whole bucket every
# step, so a rank with fewer parameters gets a bucket of its own size instead.
DEFAULT_REDUCE_BUCKET = 500_000_000


def reduce_bucket_elements(local_parameters: int) -> int:
    """Elements of DeepSpeed's gradient-reduction bucket on a rank holding ``local_parameters``."""
    return max(1, min(DEFAULT_REDUCE_BUCKET, local_parameters))


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ``world_size`` processes.

    data parallel = world_size / (tensor x pipeline). DeepSpeed ZeRO partitions the optimizer state
    (stage 1) and also the gradients (stage 2) over the data-parallel group; stage 2 cannot be
    combined with pipeline parallelism.

    ``expert`` is megatron-core's expert-model-parallel size: a MoE layer's experts are split over
    that many ranks of the data-parallel group (each holds num_experts / expert of them, with the
    tensor-parallel split of the dense layers). Their gradients are reduced, and ZeRO partitions
    their optimizer state, over the expert-data-parallel group of data / expert ranks.
    """

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    backend: str = "auto"  # "auto": nccl with CUDA, gloo without | "nccl" | "gloo"
    timeout_minutes: float = 30.0  # collective timeout: a hung rank fails the job instead of idling

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline)

    def expert_data_parallel(self, world_size: int) -> int:
        """Replicas of each expert: the data-parallel ranks that hold the same experts."""
        return self.data_parallel(world_size) // self.expert


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
