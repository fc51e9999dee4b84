"""Training-loop configuration (the Hydra group ``train``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Steps, batch geometry, seed and numeric precision.

    ``global_batch_size`` sequences per optimizer step = micro_batch_size x data parallel x
    microbatches; megatron-core's schedule runs the microbatches. ``precision`` "auto" is bf16 with
    CUDA and fp32 on CPU. ``loss_averaging`` "token": the gradient is that of the mean loss over
    every unmasked token of the global batch; "microbatch": of the mean of the microbatches' token
    means (megatron-core's legacy default), which weighs a token of a sparsely masked microbatch
    more (divprec.train.loss_averaging).
    """

    steps: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_length: int = 256
    seed: int = 1234
    precision: str = "auto"  # "auto" | "bf16" | "fp32"
    loss_averaging: str = "token"  # "token" | "microbatch"
    max_skipped_steps: int = 5  # consecutive skipped updates (non-finite, spikes) before stopping
    loss_spike_window: int = 0  # applied steps the loss/grad-norm z-scores look back on; 0: off
    loss_spike_zscore: float = 6.0  # warn (and with skip_loss_spikes, skip) above this z-score
    skip_loss_spikes: bool = False
    preemption_signal: str = "USR1"  # with SIGTERM: save and exit 75 (launch/pretrain.slurm agrees)


@dataclass
class EvalConfig:
    """In-loop validation (the Hydra group ``eval``).

    Every ``interval`` optimizer steps, and after the last, the run evaluates ``iters`` global
    batches of the validation split (the first ones, the same every time); 0: never.
    """

    interval: int = 0
    iters: int = 10

    def samples(self, global_batch_size: int) -> int:
        """Validation samples a run reads: ``iters`` global batches (the same every time); 0 when
        validation is off."""
        return self.iters * global_batch_size if self.interval > 0 else 0
