"""Training-loop configuration (the Hydra group ``train``)."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_skipped_steps: int = 5  # consecutive non-finite steps (updates skipped) before stopping
    preemption_signal: str = "USR1"  # with SIGTERM: save and exit 75 (launch/pretrain.slurm agrees)
