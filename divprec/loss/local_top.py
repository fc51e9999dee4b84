"""Step 1's strategy: how a rank finds its row max, top-k and ties (torch ops or the C kernel).

Every strategy has one interface, so the loss's collectives are written once
(divprec.loss.vocab_parallel): :meth:`LocalTopK.run` gives, for the rows of a shard, the row max,
the k largest values and the ties beyond them, and the target's rank where the strategy counts it
in the same read; :meth:`LocalTopK.kth_largest` selects the k-th largest of the gathered lists.

- :class:`TorchBlockTopK`: torch ops (divprec.loss.block_topk), on any device.
- :class:`NativeBlockTopK`: the CPU C kernel (divprec.loss.native_select), the same algorithm
  with one read of each row; it also counts the target's rank while the row is in cache.
- :class:`TritonTopK`: the Triton kernel (divprec.loss.triton_kernels, ``loss.kernel=triton``),
  a radix select; it counts the target's rank too.

:func:`select` picks the strategy for a call. Whether the C kernel builds is a fact about one
rank (its compiler, its cache directory), so the ranks of the tensor-parallel group agree on it
at the first call: one rank that cannot build it makes every rank use the torch ops ("auto"), or
every rank raise ("compiled"). Another strategy is one more subclass and one more case in
:func:`select`; the loss itself does not change.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from divprec.loss import block_topk, chunks, native_select, triton_kernels

log = logging.getLogger(__name__)


@dataclass
class LocalTop:
    """Step 1's result for n rows."""

    row_max: torch.Tensor  # [n] fp32, this rank's
    values_and_ties: torch.Tensor  # [n, k + 1] fp32: the k largest (any order), then the ties
    target_rank: torch.Tensor | None  # [n] #{z > target's logit} (float), or None: not counted


class LocalTopK(ABC):
    """Step 1 over the rows of a shard; subclasses give :meth:`rows` and :meth:`kth_largest`."""

    name = ""
    counts_target_rank = False  # rows() counts #{z > target's logit} in its read

    @abstractmethod
    def rows(
        self, z: torch.Tensor, k: int, target_logit: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """For a chunk z [c, v]: row max [c], the k largest [c, k], ties [c], and the target's
        rank [c] where the strategy counts it and target_logit [c] is given, else None."""

    @abstractmethod
    def kth_largest(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th largest of each row of values [r, m] (fp32, m >= k): [r]."""

    def run(self, z: torch.Tensor, k: int, target_logit: torch.Tensor | None = None) -> LocalTop:
        """:meth:`rows` over z [n, v] in chunks of rows, in threads on CPU.

        target_logit [n] fp32: the target's logit, global (the strategy may count the rank
        against it), or None (no rank). Chunks of the eager size: the temporaries stay small.
        The loss's step 1 is this call; tools/bench_threshold.py times it.
        """
        n = z.shape[0]
        row_max = torch.empty(n, dtype=torch.float32, device=z.device)
        values_and_ties = torch.empty((n, k + 1), dtype=torch.float32, device=z.device)
        rank = torch.empty(n, dtype=torch.float32, device=z.device)
        if not self.counts_target_rank or target_logit is None:
            rank = None

        def chunk(r: slice) -> None:
            row_max[r], values_and_ties[r, :k], values_and_ties[r, k], rank_r = self.rows(
                z[r], k, None if target_logit is None else target_logit[r]
            )
            if rank is not None:
                rank[r] = rank_r

        step = chunks.chunk_rows(z.shape[1], z.device, compiled=False)
        chunks.for_each_chunk(n, step, z.device, chunk, threads=True)
        return LocalTop(row_max, values_and_ties, rank)


class TorchBlockTopK(LocalTopK):
    """Torch ops: block maxima, torch.topk on them and on the candidates (block_topk)."""

    name = "torch"

    def rows(self, z, k, target_logit):
        row_max, top, ties = block_topk.local_top(z, k, block_topk.block_size(z.shape[1], k))
        return row_max, top, ties, None

    def kth_largest(self, values, k):
        return torch.topk(values, k, dim=-1, sorted=False).values.amin(dim=-1)


class NativeBlockTopK(LocalTopK):
    """The C kernel (CPU, fp32/bf16): one read of each row, the target's rank counted in it."""

    name = "native"
    counts_target_rank = True

    def rows(self, z, k, target_logit):
        return native_select.block_topk(z, k, above=target_logit)

    def kth_largest(self, values, k):
        return native_select.block_topk(values.contiguous(), k)[1].amin(dim=-1)


class TritonTopK(LocalTopK):
    """The Triton kernel (CUDA, or CPU in Triton's interpreter; fp32/bf16): a radix select,
    1 + 1 read per further 8-bit digit of each row (fp32 5, bf16 3), the target's rank counted
    in the first."""

    name = "triton"
    counts_target_rank = True

    def rows(self, z, k, target_logit):
        row_max, values_and_ties, rank = triton_kernels.local_top(z, k, target_logit)
        return row_max, values_and_ties[:, :k], values_and_ties[:, k], rank

    def kth_largest(self, values, k):
        return triton_kernels.kth_largest(values.contiguous(), k)

    def run(self, z, k, target_logit=None):
        """One launch over all rows: the kernel keeps no temporaries, so no chunks."""
        return LocalTop(*triton_kernels.local_top(z, k, target_logit))


TORCH = TorchBlockTopK()
NATIVE = NativeBlockTopK()
TRITON = TritonTopK()

# The agreed strategy (or the error to raise) per (tensor-parallel group, loss.kernel).
_AGREED: dict[tuple[object, str], LocalTopK | native_select.BuildError] = {}
_WARNED = False


def select(kernel: str, z: torch.Tensor, group: dist.ProcessGroup | None) -> LocalTopK:
    """Step 1's strategy for a call with loss.kernel ``kernel`` (already resolved) on shard z.

    "triton" uses the Triton kernel (the ranks need not agree: the collectives are the same).
    "eager", and logits the C kernel does not take (CUDA, other dtypes), use the torch ops.
    Otherwise the C kernel, if it builds on every rank of ``group``; if it does not, "auto" uses
    the torch ops on every rank (one warning) and "compiled" raises BuildError on every rank.
    The answer is kept per group and kernel.

    Collective (tp > 1, at the first call per group and kernel that could use the C kernel):
    all-reduce SUM [tp] int32, which ranks could not build it.
    """
    if kernel == "triton":
        return TRITON
    if kernel == "eager" or not native_select.supports(z):
        return TORCH
    key = (group, kernel)
    if key not in _AGREED:
        _AGREED[key] = _agree(kernel, group)
    agreed = _AGREED[key]
    if isinstance(agreed, native_select.BuildError):
        raise agreed
    return agreed


def _agree(kernel: str, group: dist.ProcessGroup | None) -> LocalTopK | native_select.BuildError:
    error = native_select.build_error()
    if group is None:
        failed = [0] if error is not None else []
    else:
        flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32)
        flags[dist.get_rank(group)] = int(error is not None)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
        failed = flags.nonzero(as_tuple=True)[0].tolist()
    if not failed:
        return NATIVE
    if error is None:
        error = native_select.BuildError(
            f"it could not be built on tensor-parallel rank(s) {failed} (that rank's log says "
            "why); the ranks must run the same kernel"
        )
    if kernel == "compiled":
        return error
    global _WARNED
    if not _WARNED:
        _WARNED = True
        log.warning(
            "the shaped loss's CPU top-k kernel could not be built (%s); every rank uses torch "
            "ops (same results, slower). Set loss.kernel=eager to skip the attempt.",
            error,
        )
    return TORCH
