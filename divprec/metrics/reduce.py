"""Token-weighted means of per-token statistics across data-parallel ranks.

Each rank sums ``value * loss_mask`` over its microbatches and counts its tokens; one all-reduce
SUM of all the sums packed together, then a division by the global token count, gives means over
every token of the step. Averaging per-rank means instead would weight a rank with few unmasked
tokens as much as a full one.

Under tensor parallelism every rank of a TP group holds the same stats (the vocab-parallel loss
reduces them), so the group to pass is the data-parallel group; under pipeline parallelism only
the last stage has them, so only its ranks call this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

NUM_TOKENS = "num_tokens"  # the key of the token count among the sums


def masked_sums(
    values: Mapping[str, torch.Tensor], loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``sum(value * loss_mask)`` for each per-token tensor, plus the token count as ``num_tokens``.

    ``values`` map names to tensors shaped like ``loss_mask`` (e.g. ``[b, s]``); the results are
    detached float64 scalars on the same device, so accumulating them costs no host sync.
    """
    mask = loss_mask.detach()
    sums: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        if value.shape != mask.shape:
            raise ValueError(
                f"masked_sums: {name!r} has shape {tuple(value.shape)}, the loss mask "
                f"{tuple(mask.shape)}"
            )
        # A 0/1 mask multiplies exactly in any dtype; the sum runs in float64.
        sums[name] = (value.detach() * mask).sum(dtype=torch.float64)
    sums[NUM_TOKENS] = mask.sum(dtype=torch.float64)
    return sums


def _collective_device(group: dist.ProcessGroup | None, fallback: torch.device) -> torch.device:
    # NCCL reduces only CUDA tensors; gloo takes the tensors where they are (CPU or CUDA).
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def reduce_token_means(
    sums: Mapping[str, torch.Tensor | float], group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Means over all tokens of ``group`` from per-rank sums; ``sums[NUM_TOKENS]`` counts tokens.

    Returns ``{name: global_sum / global_count}`` for every other key, plus ``num_tokens``, the
    global count. A step without tokens gives NaN means. Every rank of ``group`` must pass the same
    keys (they are packed in sorted order).

    Collectives: one ``all_reduce(SUM)`` over ``group`` (None: the default group) of a float64
    tensor with ``len(sums)`` elements; none when torch.distributed is not initialised or the
    group has one rank. Then one device-to-host copy.
    """
    if NUM_TOKENS not in sums:
        raise ValueError(f"reduce_token_means: sums must include the token count {NUM_TOKENS!r}")
    names = sorted(sums)
    tensors = [v for v in sums.values() if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        device = _collective_device(group, device)
    packed = torch.stack(
        [torch.as_tensor(sums[n], dtype=torch.float64).to(device).reshape(()) for n in names]
    )  # [len(sums)]
    if distributed and dist.get_world_size(group) > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    totals = dict(zip(names, packed.tolist(), strict=True))
    count = totals.pop(NUM_TOKENS)
    means = {n: (s / count if count > 0 else math.nan) for n, s in totals.items()}
    means[NUM_TOKENS] = count
    return means


class TokenStatSums:
    """Running sums over the microbatches of one step; :meth:`reduce` turns them into means.

    Usage::

        acc = TokenStatSums()
        for mb in microbatches:  # inside the step
            acc.add(masked_sums({"lm_loss": nll, "loss": loss}, mb["loss_mask"]))
        means = acc.reduce(dp_group)  # on logging steps, on every rank of dp_group
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, sums: Mapping[str, torch.Tensor]) -> None:
        """Add one microbatch's sums (same keys every time)."""
        if self._sums and set(sums) != set(self._sums):
            raise ValueError(
                f"TokenStatSums.add: keys {sorted(sums)} differ from earlier {sorted(self._sums)}"
            )
        for name, value in sums.items():
            value = value.detach()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()

    def totals(self) -> dict[str, torch.Tensor]:
        """The sums so far (this rank's), e.g. to reduce over a group of the caller's choosing."""
        return dict(self._sums)

    def reduce(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """:func:`reduce_token_means` of the sums so far (a collective over ``group``); resets."""
        if not self._sums:
            raise ValueError("TokenStatSums.reduce: nothing was added since the last reduce")
        means = reduce_token_means(self._sums, group)
        self._sums = {}
        return means

    def reset(self) -> None:
        """Drop the sums, e.g. on non-logging steps where no reduction runs."""
        self._sums = {}
