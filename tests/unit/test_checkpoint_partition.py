"""The boxes that tile a ZeRO fragment (a flat range of a parameter) for the per-rank checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from divprec.checkpoint.sharded_state import flat_range_boxes


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (2, 2, 2, 3)])
def test_boxes_tile_every_flat_range_in_order(shape):
    numel = math.prod(shape)
    index = torch.arange(numel).reshape(shape)
    for start in range(numel + 1):
        for stop in range(start, numel + 1):
            boxes = flat_range_boxes(shape, start, stop)
            covered = []
            for offset, size in boxes:
                box = index[tuple(slice(o, o + s) for o, s in zip(offset, size, strict=True))]
                covered += box.reshape(-1).tolist()
            # In flat order, so each box is one contiguous piece of the fragment.
            assert covered == list(range(start, stop)), (shape, start, stop, boxes)
            assert len(boxes) <= 2 * len(shape) - 1
