"""Deterministic, resumable micro-batches for data-parallel training.

Sample-order convention. The dataset (megatron's GPT/blended dataset, already shuffled by the
seed) is read as one global stream: sample i is ``dataset[i]``. Global batch g is the stream slice
``[g * G, (g + 1) * G)`` with ``G = global_batch_size = micro_batch_size * dp_size * num_micro``.
Data-parallel rank r takes the contiguous slice ``[r * G / dp_size, (r + 1) * G / dp_size)`` of
every global batch and feeds it as ``num_micro`` consecutive micro-batches of ``micro_batch_size``.

So the contents and position of every sample depend only on the seed and its global index: a run
resumed at ``consumed_samples = N`` (a multiple of G) continues exactly as an uninterrupted run
would, for any dp_size, and the dp_size rank slices of a global batch, concatenated in rank order,
are that global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch is cut across data-parallel ranks and micro-batches."""

    micro_batch_size: int
    data_parallel_size: int
    global_batch_size: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.micro_batch_size < 1 or self.data_parallel_size < 1:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) and data_parallel_size "
                f"({self.data_parallel_size}) must be >= 1"
            )
        if self.global_batch_size < per_step or self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be a positive multiple of "
                f"micro_batch_size * data_parallel_size = {per_step}"
            )

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per rank per global batch (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.data_parallel_size

    def micro_batch_indices(self, global_batch: int, rank: int, micro: int) -> list[int]:
        """Global sample indices of micro-batch ``micro`` of ``rank`` in ``global_batch``."""
        start = global_batch * self.global_batch_size + rank * self.per_rank
        start += micro * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))


class MicroBatchSampler(Sampler[list[int]]):
    """Yields the sample indices of one rank's micro-batches, from ``consumed_samples`` on.

    Stops before the first global batch that does not fit entirely in ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int,
        consumed_samples: int,
        layout: BatchLayout,
        data_parallel_rank: int,
    ) -> None:
        if not 0 <= data_parallel_rank < layout.data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} outside [0, {layout.data_parallel_size})"
            )
        if consumed_samples < 0 or consumed_samples % layout.global_batch_size:
            raise ValueError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                f"global_batch_size {layout.global_batch_size} (resume at a step boundary)"
            )
        self.layout = layout
        self.rank = data_parallel_rank
        self.first = consumed_samples // layout.global_batch_size
        self.end = num_samples // layout.global_batch_size

    def __len__(self) -> int:
        return max(self.end - self.first, 0) * self.layout.num_micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        for g in range(self.first, self.end):
            for m in range(self.layout.num_micro_batches):
                yield self.layout.micro_batch_indices(g, self.rank, m)


def collate_samples(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample [s] tensors into [b, s] batches (only the training keys)."""
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}


def build_batch_iterator(
    dataset: Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    *,
    global_batch_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches ``{tokens, labels, loss_mask, position_ids}``, each [b, s].

    ``global_batch_size`` defaults to ``micro_batch_size * data_parallel_size`` (no gradient
    accumulation). The iterator ends after the last global batch that fits in the dataset.
    DataLoader workers only prefetch: it returns batches in sampler order, so the stream is the
    same for any ``num_workers``.
    """
    layout = BatchLayout(
        micro_batch_size,
        data_parallel_size,
        global_batch_size or micro_batch_size * data_parallel_size,
    )
    sampler = MicroBatchSampler(len(dataset), consumed_samples, layout, data_parallel_rank)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return iter(loader)
