"""Parallel layout configuration (the Hydra group ``parallel``)."""

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
    """

    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 1
    sequence_parallel: bool = False
    backend: str = "auto"  # "auto": nccl with CUDA, gloo without | "nccl" | "gloo"
    timeout_minutes: int = 30  # collective timeout: a hung rank fails the job instead of idling

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor * self.pipeline)
