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


def test_a_factorys_pieces_are_located_in_the_parameter():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    from divprec.checkpoint.sharded_state import _weight_pieces

    param = torch.nn.Parameter(torch.zeros(8, 3))  # SwiGLU's fc1: [gate; up] rows
    swiglu = apply_swiglu_sharded_factory(ShardedTensor.from_rank_offsets("fc1", param), ())
    pieces = _weight_pieces("fc1", param, swiglu)
    assert [(p.key, p.global_offset, start) for p, start in pieces] == [
        ("fc1", (0, 0), 0),  # the gate half: elements 0..11 of the parameter
        ("fc1", (4, 0), 12),  # the up half
    ]

    def transposed(key, t, replica_id, flattened_range):  # a copy: no longer the parameter's order
        return ShardedTensor.from_rank_offsets(key, t.t().contiguous(), replica_id=replica_id)

    factory = ShardedTensorFactory("w", param, transposed, lambda x: x, 0)
    with pytest.raises(ValueError, match="parameter w: its sharded-state factory"):
        _weight_pieces("w", param, factory)
