"""The target token of each row: checked, located on its shard, and masked out of the pass.

Dense over the rows on purpose: a row whose target another rank holds reads and writes its own
value back, so no index set of data-dependent size (``nonzero``) is built and the GPU never waits
for the host (no synchronisation in the loss's hot path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def check(target: torch.Tensor, rows: int, vocab: int, logits_shape: tuple) -> None:
    """One clear error for targets that do not fit the logits: count or range.

    On CPU a ValueError names the first bad id. On CUDA the range check is a device-side assert
    (no host synchronisation): a bad id stops the run at the step's next synchronisation.
    """
    if target.shape[0] != rows:
        raise ValueError(
            f"logits {tuple(logits_shape)} and target {tuple(target.shape)} disagree on tokens"
        )
    if not target.numel():
        return
    in_range = ((target >= 0) & (target < vocab)).all()
    if target.is_cuda:
        torch._assert_async(in_range, f"a target id is outside the vocabulary [0, {vocab})")
    elif not bool(in_range):
        bad = target[(target < 0) | (target >= vocab)][0].item()
        raise ValueError(
            f"target id {bad} is outside the vocabulary [0, {vocab}); check the tokenizer's "
            "vocabulary size against model.vocab_size"
        )


@dataclass
class TargetShard:
    """Where this rank holds the targets: which rows, their columns, and the logits."""

    owned: torch.Tensor  # [n] bool: the row's target lies in this rank's vocabulary slice
    cols: torch.Tensor  # [n] the target's column within the shard (clamped where not owned)
    logit: torch.Tensor  # [n] fp32: the target's logit where owned, else -inf


def write_at_targets(
    z: torch.Tensor, owned: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> None:
    """z[row, cols[row]] = values[row] where ``owned``; the other rows keep their value."""
    index = cols[:, None]  # [n, 1]
    kept = z.gather(1, index)[:, 0]  # [n]
    z.scatter_(1, index, torch.where(owned, values.to(z.dtype), kept)[:, None])


def locate(z: torch.Tensor, target: torch.Tensor, rank: int) -> TargetShard:
    """The targets [n] (global ids) on rank ``rank``'s shard z [n, v/tp]."""
    local_vocab = z.shape[1]
    local = target - rank * local_vocab  # [n]
    owned = (local >= 0) & (local < local_vocab)
    cols = local.clamp(0, local_vocab - 1)
    at_target = z.gather(1, cols[:, None])[:, 0].float()  # [n]
    logit = torch.where(owned, at_target, float("-inf"))
    return TargetShard(owned, cols, logit)


@contextmanager
def masked(z: torch.Tensor, shard: TargetShard) -> Iterator[None]:
    """z's target logits = -inf while the block runs, then as they were (also on error).

    Leaving the target out of the row sums this way costs two scatters of n values instead of a
    per-element column comparison (a quarter of the pass, measured). The write goes through
    ``.data``, which has its own version counter: an op that saved the logits for its backward
    sees them unchanged, as they are once the block exits.
    """
    data = z.data
    index = shard.cols[:, None]  # [n, 1]
    saved = data.gather(1, index)  # [n, 1] (a copy)
    data.scatter_(1, index, torch.where(shard.owned[:, None], float("-inf"), saved))
    try:
        yield
    finally:
        data.scatter_(1, index, saved)
