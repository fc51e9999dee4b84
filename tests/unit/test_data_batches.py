"""Batch order: resumable, and independent of the data-parallel size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from divprec.data.batches import BatchLayout, MicroBatchSampler, build_batch_iterator

SEQ = 5


class IndexDataset(Dataset):
    """Sample i carries i in every token, so batches reveal which samples they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = torch.full((SEQ,), i, dtype=torch.long)
        return {
            "tokens": tokens,
            "labels": tokens + 1,
            "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ),
            "ignored": torch.zeros(1),
        }


def sample_ids(batches) -> list[list[int]]:
    return [b["tokens"][:, 0].tolist() for b in batches]


def flat(batches) -> list[int]:
    return [i for b in sample_ids(batches) for i in b]


def test_batch_contents() -> None:
    (batch,) = list(build_batch_iterator(IndexDataset(3), 0, 3, 0, 1))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert batch["tokens"].shape == (3, SEQ) and batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"][:, 0].tolist() == [0, 1, 2]


def test_stream_is_the_dataset_order_and_drops_partial_global_batch() -> None:
    batches = list(build_batch_iterator(IndexDataset(23), 0, 2, 0, 1, global_batch_size=4))
    assert flat(batches) == list(range(20))


def global_batches(ds: Dataset, consumed: int, mbs: int, dp: int, gbs: int) -> list[list[int]]:
    """Sample ids of each global batch, reassembled from the ranks' micro-batches."""
    ranks = [
        sample_ids(build_batch_iterator(ds, consumed, mbs, r, dp, global_batch_size=gbs))
        for r in range(dp)
    ]
    micro = gbs // (mbs * dp)
    return [
        [i for r in range(dp) for mb in ranks[r][g * micro : (g + 1) * micro] for i in mb]
        for g in range(len(ranks[0]) // micro)
    ]


@pytest.mark.parametrize("dp,mbs,gbs", [(1, 2, 8), (2, 2, 8), (4, 1, 8), (2, 4, 8), (2, 1, 2)])
def test_ranks_concatenated_give_the_global_batch(dp: int, mbs: int, gbs: int) -> None:
    expected = [list(range(g * gbs, (g + 1) * gbs)) for g in range(40 // gbs)]
    assert global_batches(IndexDataset(40), 0, mbs, dp, gbs) == expected


def test_dp2_slices_equal_dp1_batch() -> None:
    ds = IndexDataset(24)
    dp1 = list(build_batch_iterator(ds, 0, 4, 0, 1))
    rank0 = list(build_batch_iterator(ds, 0, 2, 0, 2))
    rank1 = list(build_batch_iterator(ds, 0, 2, 1, 2))
    for whole, a, b in zip(dp1, rank0, rank1, strict=True):
        for key in whole:
            torch.testing.assert_close(torch.cat([a[key], b[key]]), whole[key])


@pytest.mark.parametrize("dp,mbs", [(1, 3), (1, 1), (2, 3), (3, 1)])
def test_resume_equals_uninterrupted(dp: int, mbs: int) -> None:
    ds, gbs = IndexDataset(50), 6
    full = global_batches(ds, 0, mbs, dp, gbs)
    assert len(full) == 8
    for step in (1, 3, 7, 8):
        assert global_batches(ds, step * gbs, mbs, dp, gbs) == full[step:]


def test_resume_after_changing_dp_size() -> None:
    # 3 steps on 1 rank, then the rest on 2 ranks: the same samples as 4 ranks all along.
    ds, gbs = IndexDataset(40), 8
    first = global_batches(ds, 0, 4, 1, gbs)[:3]
    rest = global_batches(ds, 3 * gbs, 2, 2, gbs)
    assert first + rest == global_batches(ds, 0, 1, 4, gbs)
    assert [i for batch in first + rest for i in batch] == list(range(40))


def test_dataloader_workers_keep_the_order() -> None:
    ds = IndexDataset(32)
    base = flat(build_batch_iterator(ds, 8, 2, 1, 2, global_batch_size=8))
    assert flat(build_batch_iterator(ds, 8, 2, 1, 2, global_batch_size=8, num_workers=2)) == base


def test_layout_errors() -> None:
    with pytest.raises(ValueError, match="multiple of global_batch_size 4"):
        MicroBatchSampler(10, 3, BatchLayout(2, 2, 4), 0)
    with pytest.raises(ValueError, match="global_batch_size 6 must be a positive multiple"):
        BatchLayout(2, 2, 6)
    with pytest.raises(ValueError, match="data_parallel_rank 2 outside"):
        MicroBatchSampler(10, 0, BatchLayout(1, 2, 2), 2)
    assert len(MicroBatchSampler(20, 4, BatchLayout(1, 2, 4), 1)) == 8
