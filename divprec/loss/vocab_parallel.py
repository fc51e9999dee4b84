"""Vocab-parallel shaped loss: the forward, the backward, and its collectives.

Rank r of the tensor-parallel group holds logits[..., r*V/tp : (r+1)*V/tp]. Nothing
vocabulary-sized crosses ranks. Forward, for n tokens and k_local = min(topk, V/tp), over chunks
of rows:

1. local max and local top-k of the shard, by blocks: the maxima of blocks of B consecutive logits
   (one read of the shard) give the row max; the k blocks with the largest maxima hold the local
   top-k values (every logit above the k-th block maximum lies in one of them), and a second level
   narrows their k*B logits to k*8 candidates. Exact, ties included (see _local_top).
   all-reduce MAX  [n, 2]           (local max, target logit where owned else -inf)
2. all-gather      [tp, n, k_local] (local top-k values) -> global k-th largest logit tau;
   a token a is in K_t iff z_a >= tau, decided locally (ties at tau are all in K_t).
3. one read-only pass (divprec.loss.row_kernels.row_sums) sums per row e = exp(z - max) and
   e*d (d = z - max) over all tokens and over K_t, and counts the target's rank; the target
   itself is left out of every sum.
   all-reduce SUM  [6, n]           (the packed row sums and the target's e)
   (with tp = 1 steps 1-3 run back to back on each chunk, while it is in cache)
4. per-token scalars (divprec.loss.rewards): loss, stats, backward coefficients.

Backward: grad = pi * C - c, shard-local, no collectives: one pass (row_kernels.shaped_grad)
recomputes e from the saved logits and writes e * (head or tail scale, by z >= tau); then the
targets' entries. Recomputing e costs one exp per logit and saves writing and reading back a
vocabulary-sized buffer.

The two passes are compiled (``loss.kernel``: one fused loop each, C++ on CPU, Triton on CUDA) or
run eagerly; the code and the results are the same.

Memory: nothing vocabulary-sized is allocated in the forward, and the logits themselves (not a
copy) are saved for the backward. The backward allocates the gradient in the logits' dtype, or,
with ``inplace=True`` and fp32 logits, writes it into the logits' storage (as megatron-core's
cross-entropy does), through a per-thread sub-chunk workspace. Temporaries are per chunk of rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from divprec.loss import row_kernels
from divprec.loss.config import ShapedLossConfig
from divprec.loss.rewards import RowSums, shaped_rows

# Rows are processed in chunks of about this many logits. Eager on CPU: 8 MiB of fp32, so that a
# chunk's many small ops run from cache. Compiled on CPU: larger, because there the cost is per
# call, not per cache miss (the best of 2^19..2^27 on a 2-core Xeon). On CUDA chunks are larger
# still (fewer kernel launches and host syncs); that value is a guess, not yet measured.
_CHUNK_ELEMENTS = 1 << 21
_COMPILED_CHUNK_ELEMENTS = 1 << 24
_CUDA_CHUNK_ELEMENTS = 1 << 25
# Eager passes run in sub-chunks of about this many logits on CPU: their several sub-chunk-sized
# temporaries then stay in the core's cache (2 MiB L2 here). A compiled pass makes no
# temporaries; only the backward's in-place workspace is sub-chunk-sized (4 MiB of fp32).
_SUB_CHUNK_ELEMENTS = 1 << 17
_COMPILED_SUB_CHUNK_ELEMENTS = 1 << 20
# Block widths tried for the block-max top-k, widest first; a width must divide V/tp and leave at
# least _MIN_BLOCKS_PER_K * k_local blocks, else the top-k is taken over the whole row.
_BLOCK_SIZES = (32, 64, 16)
# Width of the second-level blocks within the chosen blocks.
_SUB_BLOCK = 8
_MIN_BLOCKS_PER_K = 2

STAT_NAMES = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")
# Rows of the packed [6, n] row sums: row_kernels.SUM_ROWS, then the target's e.
_TARGET_EXP = len(row_kernels.SUM_ROWS)


def _chunk_rows(vocab: int, device: torch.device, compiled: bool) -> int:
    if device.type == "cuda":
        elements = _CUDA_CHUNK_ELEMENTS
    else:
        elements = _COMPILED_CHUNK_ELEMENTS if compiled else _CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _sub_chunk_rows(vocab: int, device: torch.device, compiled: bool) -> int:
    if device.type == "cuda":
        return _chunk_rows(vocab, device, compiled)
    elements = _COMPILED_SUB_CHUNK_ELEMENTS if compiled else _SUB_CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _row_chunks(rows: int, step: int) -> Iterator[slice]:
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _for_each_chunk(
    rows: int, step: int, device: torch.device, fn: Callable[[slice], None], threads: bool
) -> None:
    """Call fn(rows_i) for every chunk of rows.

    With ``threads`` on CPU with several intra-op threads, chunks run concurrently in that many
    Python threads, each chunk single-threaded: the eager passes' ops are each too small for an
    OpenMP fork/join per op to pay off. torch ops release the GIL, so the threads compute in
    parallel. The compiled passes instead parallelise inside their one loop (``threads=False``).
    The results do not depend on the schedule: chunks touch disjoint rows.
    """
    chunks = list(_row_chunks(rows, step))
    workers = torch.get_num_threads() if device.type == "cpu" and threads else 1
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            fn(chunk)
        return

    def call(chunk: slice) -> None:
        with torch.no_grad():  # grad mode is per thread; the Function's forward runs without
            fn(chunk)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for future in [pool.submit(call, chunk) for chunk in chunks]:
                future.result()  # re-raises a chunk's exception
    finally:
        torch.set_num_threads(workers)


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _block_size(local_vocab: int, k_local: int) -> int | None:
    for block in _BLOCK_SIZES:
        if local_vocab % block == 0 and local_vocab // block >= _MIN_BLOCKS_PER_K * k_local:
            return block
    return None


def _take_blocks(blocks: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """blocks [c, nb, B] contiguous, chosen [c, k] block ids -> [c, k, B] (one index_select)."""
    c, nb, width = blocks.shape
    flat = chosen + torch.arange(0, c * nb, nb, device=chosen.device)[:, None]
    return blocks.reshape(c * nb, width).index_select(0, flat.view(-1)).view(c, -1, width)


def _local_top(
    zc: torch.Tensor, k_local: int, block: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max [c] and the k_local largest values [c, k] (any order) of each row of zc, exactly; fp32.

    With blocks: let t be the k-th largest block maximum. At least k logits are >= t (one per top
    block), so the k-th largest logit tau >= t, and every logit > t lies in a block whose maximum
    is > t; there are fewer than k such blocks, so the top-k selection of blocks contains them all.
    If fewer than k logits exceed t, the remaining top-k values equal t, and each chosen block with
    maximum t supplies one. So the top-k of the chosen blocks' logits is the row's top-k multiset.
    Any partition into groups works the same way: the k*B chosen logits are split again into k*B/8
    groups of 8 (strided, so the group maxima are 7 elementwise maxima) and the top-k is taken
    over the k*8 logits of the k best groups.
    """
    c, width = zc.shape
    if block is None:
        top = torch.topk(zc, k_local, dim=-1, sorted=False).values
        return top.amax(dim=-1).float(), top.float()
    blocks = zc.view(c, width // block, block)
    block_max = blocks.amax(dim=-1)  # [c, nb], input dtype
    row_max = block_max.amax(dim=-1).float()
    if k_local == 1:
        return row_max, row_max[:, None]
    chosen = torch.topk(block_max, k_local, dim=-1, sorted=False).indices  # the k blocks, [c, k]
    candidates = _take_blocks(blocks, chosen).view(c, -1)  # [c, k*B]
    if block > _SUB_BLOCK:
        groups = candidates.shape[1] // _SUB_BLOCK
        strided = candidates.view(c, _SUB_BLOCK, groups)  # group g: positions g + i * groups
        group_max = strided.amax(dim=1)  # [c, groups]
        chosen = torch.topk(group_max, k_local, dim=-1, sorted=False).indices  # [c, k]
        candidates = strided.gather(2, chosen[:, None, :].expand(c, _SUB_BLOCK, k_local))
        candidates = candidates.view(c, -1)  # [c, _SUB_BLOCK * k]
    top = torch.topk(candidates, k_local, dim=-1, sorted=False).values
    return row_max, top.float()


def _global_threshold(
    local_topk: torch.Tensor, topk: int, group: dist.ProcessGroup | None, world: int
) -> torch.Tensor:
    """k-th largest logit over the whole vocabulary. local_topk: [n, k_local], any order.

    Collective: all-gather of [n, k_local] fp32 (k values per token per rank).
    """
    if world == 1:
        return local_topk.amin(dim=-1)
    gathered = [torch.empty_like(local_topk) for _ in range(world)]
    dist.all_gather(gathered, local_topk.contiguous(), group=group)
    candidates = torch.cat(gathered, dim=-1)  # [n, tp * k_local]
    return torch.topk(candidates, topk, dim=-1, sorted=False).values.amin(dim=-1)


class _Passes:
    """Runs the row_kernels passes over the sub-chunks of a chunk of rows."""

    def __init__(self, vocab: int, device: torch.device, kernel: str) -> None:
        self.vocab, self.device, self.kernel = vocab, device, kernel
        self.compiled = row_kernels.use_compiled(kernel)
        self.sub_rows = _sub_chunk_rows(vocab, device, self.compiled)
        self.local = threading.local()  # one sub-chunk-sized workspace per thread

    def workspace(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        work = getattr(self.local, "work", None)
        if work is None or work.dtype != dtype:
            work = torch.empty((self.sub_rows, self.vocab), dtype=dtype, device=self.device)
            self.local.work = work
        return work[:rows]

    def sub_chunks(self, rows: slice) -> Iterator[slice]:
        for start in range(rows.start, rows.stop, self.sub_rows):
            yield slice(start, min(start + self.sub_rows, rows.stop))

    def forward(self, z, sums, row_max, tau, target_logit, target_col, rows: slice) -> None:
        """sums[:5, rows] (row_kernels.row_sums); compiled, in one call (it makes no temporaries)."""
        for r in [rows] if self.compiled else self.sub_chunks(rows):
            sums[:_TARGET_EXP, r] = row_kernels.run(
                row_kernels.row_sums, self.kernel,
                z[r], row_max[r], tau[r], target_logit[r], target_col[r],
            )  # fmt: skip

    def backward(self, z, grad, row_max, tau, head_scale, tail_scale, rows: slice) -> None:
        """grad[rows] (row_kernels.shaped_grad); grad may be z itself (then via the workspace)."""
        aliased = grad.data_ptr() == z.data_ptr()
        for r in self.sub_chunks(rows):
            out = self.workspace(r.stop - r.start, grad.dtype) if aliased else grad[r]
            row_kernels.run(
                row_kernels.shaped_grad, self.kernel,
                z[r], out, row_max[r], tau[r], head_scale[r], tail_scale[r],
            )  # fmt: skip
            if aliased:
                grad[r].copy_(out)


class _VocabParallelShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cfg: ShapedLossConfig, group, inplace: bool):  # type: ignore[override]
        rank, world = _world(group)
        local_vocab = logits.shape[-1]
        vocab = local_vocab * world
        if cfg.topk > vocab:
            raise ValueError(f"loss.topk={cfg.topk} exceeds the vocabulary size {vocab}")
        out_shape = target.shape
        z = logits.reshape(-1, local_vocab)  # [n, v/tp], input dtype
        private = z.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
        if not z.is_contiguous():
            z, private = z.contiguous(), True
        tgt = target.reshape(-1)  # [n]
        if z.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on tokens"
            )
        if tgt.numel() and (bool((tgt < 0).any()) or bool((tgt >= vocab).any())):
            bad = tgt[(tgt < 0) | (tgt >= vocab)][0].item()
            raise ValueError(
                f"target id {bad} is outside the vocabulary [0, {vocab}); check the tokenizer's "
                "vocabulary size against model.vocab_size"
            )
        n = z.shape[0]
        dev = z.device
        kernel = row_kernels.resolve(cfg.kernel, z.numel())
        compiled = row_kernels.use_compiled(kernel)

        # Which rows' targets live on this shard, and where (-1: elsewhere).
        local_target = tgt - rank * local_vocab
        owned = (local_target >= 0) & (local_target < local_vocab)
        owned_rows = owned.nonzero(as_tuple=True)[0]
        owned_cols = local_target[owned_rows]
        target_col = torch.where(owned, local_target, -1).int()

        k_local = min(cfg.topk, local_vocab)
        block = _block_size(local_vocab, k_local)
        # Row sums, one row per quantity: row_kernels.SUM_ROWS, then the target's e.
        sums = torch.zeros((_TARGET_EXP + 1, n), dtype=torch.float32, device=dev)
        passes = _Passes(local_vocab, dev, kernel)
        step = _chunk_rows(local_vocab, dev, compiled)

        if world == 1:
            # Steps 1-3 back to back on each chunk.
            target_logit = torch.full((n,), float("-inf"), device=dev)
            target_logit[owned_rows] = z[owned_rows, owned_cols].float()
            z_target = target_logit.to(z.dtype)  # exact: it is one of the logits
            row_max = torch.empty(n, dtype=torch.float32, device=dev)
            tau = torch.empty(n, dtype=torch.float32, device=dev)
            tau_z = torch.empty(n, dtype=z.dtype, device=dev)

            def fused(rows: slice) -> None:
                row_max[rows], values = _local_top(z[rows], k_local, block)
                tau[rows] = values.amin(dim=-1)
                tau_z[rows] = tau[rows].to(z.dtype)  # exact: tau is one of the logits
                passes.forward(z, sums, row_max, tau_z, z_target, target_col, rows)

            _for_each_chunk(n, step, dev, fused, threads=not compiled)
        else:
            # 1. local max and top-k; global max and target logit in one all-reduce MAX.
            maxes = torch.full((n, 2), float("-inf"), device=dev)
            local_topk = torch.empty((n, k_local), dtype=torch.float32, device=dev)

            def local(rows: slice) -> None:
                maxes[rows, 0], local_topk[rows] = _local_top(z[rows], k_local, block)

            _for_each_chunk(n, step, dev, local, threads=True)
            maxes[owned_rows, 1] = z[owned_rows, owned_cols].float()
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            row_max, target_logit = maxes[:, 0].contiguous(), maxes[:, 1].contiguous()
            z_target = target_logit.to(z.dtype)
            # 2. the top-k threshold.
            tau = _global_threshold(local_topk, cfg.topk, group, world)
            del local_topk
            tau_z = tau.to(z.dtype)
            # 3. the pass.
            _for_each_chunk(
                n, step, dev,
                lambda rows: passes.forward(z, sums, row_max, tau_z, z_target, target_col, rows),
                threads=not compiled,
            )  # fmt: skip
        # The target's e, from the owning rank (the pass above left it out of every sum).
        sums[_TARGET_EXP, owned_rows] = torch.exp(target_logit[owned_rows] - row_max[owned_rows])
        # Row sums and the target's exp, in one all-reduce SUM.
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        # 4. per-token math.
        others, head_others, xlogx_others, xlogx_head, target_rank, target_exp = sums
        rows_out = shaped_rows(
            RowSums(
                target_exp=target_exp,
                target_shifted=target_logit - row_max,
                others=others,
                head_others=head_others,
                xlogx_others=xlogx_others,
                xlogx_head=xlogx_head,
                target_in_head=target_logit >= tau,
                target_rank=target_rank,
            ),
            cfg,
        )
        # The logits themselves are saved (a private contiguous copy only if they were strided);
        # the backward writes the gradient into them when that is allowed.
        ctx.save_for_backward(
            z if private else logits, row_max, tau_z, owned_rows, owned_cols,
            rows_out.head_scale, rows_out.tail_scale, rows_out.target_grad,
        )  # fmt: skip
        ctx.overwrite = private or (inplace and z.dtype == torch.float32)
        ctx.step, ctx.kernel = step, kernel
        ctx.input_shape = logits.shape
        outputs = (
            rows_out.loss,
            rows_out.nll,
            rows_out.entropy,
            rows_out.topk_mass,
            rows_out.target_prob,
            target_rank.clone(),
        )
        outputs = tuple(t.reshape(out_shape) for t in outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):  # type: ignore[override]
        saved, row_max, tau_z, owned_rows, owned_cols, head_scale, tail_scale, target_grad = (
            ctx.saved_tensors
        )
        local_vocab = ctx.input_shape[-1]
        z = saved.view(-1, local_vocab)  # [n, v/tp]
        g = grad_loss.reshape(-1).float()  # [n]
        head_scale = (head_scale * g).contiguous()
        tail_scale = (tail_scale * g).contiguous()
        grad = z if ctx.overwrite else torch.empty_like(z)
        passes = _Passes(local_vocab, z.device, ctx.kernel)
        _for_each_chunk(
            z.shape[0], ctx.step, z.device,
            lambda rows: passes.backward(z, grad, row_max, tau_z, head_scale, tail_scale, rows),
            threads=not row_kernels.use_compiled(ctx.kernel),
        )  # fmt: skip
        passes.local = threading.local()  # frees this thread's workspace
        grad[owned_rows, owned_cols] = (target_grad[owned_rows] * g[owned_rows]).to(grad.dtype)
        return grad.view(ctx.input_shape), None, None, None, None


def _default_tp_group() -> dist.ProcessGroup | None:
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return None
    if (
        dist.is_available()
        and dist.is_initialized()
        and parallel_state.model_parallel_is_initialized()
    ):
        return parallel_state.get_tensor_model_parallel_group()
    return None


def vocab_parallel_shaped_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    cfg: ShapedLossConfig,
    tp_group: dist.ProcessGroup | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shaped loss per token over vocab-parallel logits.

    Args:
        logits: ``[..., V/tp]`` fp32 or bf16, rank r of ``tp_group`` holding vocabulary slice
            [r*V/tp, (r+1)*V/tp). Not modified unless ``inplace``.
        target: ``[...]`` int64 token ids in [0, V).
        cfg: the rewards.
        tp_group: the tensor-parallel group; None means megatron-core's when it is initialised,
            else no parallelism.
        inplace: with fp32 logits, the backward writes the gradient into the logits' storage
            instead of allocating it, as megatron-core's ``vocab_parallel_cross_entropy`` does:
            peak memory drops by one shard-sized tensor, and nothing else may read the logits
            after the backward. An op that saved the logits for its own backward then fails
            loudly (autograd's version check). No effect on bf16 logits. The forward never
            modifies the logits, and results are identical either way.

    Returns:
        ``(loss, stats)``: loss ``[...]`` fp32, identical on every rank; stats a dict of detached
        fp32 ``[...]`` tensors: nll, entropy, topk_mass, target_prob, target_rank.

    Collectives (when tp > 1): all-reduce MAX [n, 2]; all-gather [n, min(topk, V/tp)] per rank;
    all-reduce SUM [6, n]. Backward: none.
    """
    if tp_group is None:
        tp_group = _default_tp_group()
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    loss, *stat_values = _VocabParallelShapedLoss.apply(
        logits, target.long(), cfg, tp_group, inplace
    )
    return loss, dict(zip(STAT_NAMES, stat_values, strict=True))


def shaped_loss(
    logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig, inplace: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shaped loss per token on one device: logits ``[..., V]``, target ``[...]``.

    The same algorithm as :func:`vocab_parallel_shaped_loss` with the vocabulary unsharded
    (``inplace`` as there).
    """
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    loss, *stat_values = _VocabParallelShapedLoss.apply(logits, target.long(), cfg, None, inplace)
    return loss, dict(zip(STAT_NAMES, stat_values, strict=True))
