"""Vocab-parallel shaped loss: the forward, the backward, and its collectives.

Rank r of the tensor-parallel group holds logits[..., r*V/tp : (r+1)*V/tp]. Nothing
vocabulary-sized crosses ranks. Forward, for n tokens and k_local = min(topk, V/tp), over chunks
of rows:

1. local max and local top-k of the shard, by blocks: the maxima of blocks of B consecutive logits
   (one read of the shard) give the row max; the k blocks with the largest maxima hold the local
   top-k values (every logit above the k-th block maximum lies in one of them), and a second level
   narrows their k*B logits to k*8 candidates; also counted: the logits tied with the k-th value
   beyond the k. Exact (see _local_top). On CPU with the compiled kernels, native/block_topk.c
   runs the same algorithm in C (divprec.loss.native_select).
   all-reduce MAX  [n, 2]           (local max, target logit where owned else -inf)
2. all-gather      [tp, n, k_local + 1] (local top-k values and ties) -> global k-th largest
   logit tau; a token a is in K_t iff z_a >= tau, decided locally (ties at tau are all in K_t).
   The sums over K_t (of e = exp(z - max) and e*d, d = z - max, target left out) come from the
   gathered lists and ties, the same on every rank (_threshold_and_head): O(k) per token.
3. one pass (divprec.loss.row_kernels.row_sums) sums per row e and e*d over all tokens and
   counts the target's rank (unless step 1's C kernel counted it, from the target logits
   all-reduced first); the target itself is left out of every sum, by masking its logit to -inf
   while the pass runs (_target_masked).
   all-reduce SUM  [4, n]           (the packed row sums and the target's e)
4. per-token scalars (divprec.loss.rewards): loss, stats, backward coefficients.

Backward: grad = pi * C - c, shard-local, no collectives: one pass (row_kernels.shaped_grad,
or shaped_grad_ in place) recomputes e from the saved logits and writes e * (head or tail
scale, by z >= tau); then the targets' entries. Recomputing e costs one exp per logit and saves writing and reading back a
vocabulary-sized buffer.

The two passes are compiled (``loss.kernel``: one fused loop each, C++ on CPU, Triton on CUDA) or
run eagerly; the code and the results are the same.

Memory: nothing vocabulary-sized is allocated in the forward, and the logits themselves (not a
copy) are saved for the backward. The backward allocates the gradient in the logits' dtype, or,
with ``inplace=True`` and fp32 logits, writes it into the logits' storage (as megatron-core's
cross-entropy does), each element read and then overwritten in the same loop. Temporaries are
per chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.distributed as dist

from divprec.loss import native_select, row_kernels
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
# temporaries then stay in the core's cache (2 MiB L2 here). A compiled pass makes no temporaries
# and takes a whole chunk per call.
_SUB_CHUNK_ELEMENTS = 1 << 17
# Block widths tried for the block-max top-k, widest first; a width must divide V/tp and leave at
# least _MIN_BLOCKS_PER_K * k_local blocks, else the top-k is taken over the whole row.
_BLOCK_SIZES = (32, 64, 16)
# Width of the second-level blocks within the chosen blocks.
_SUB_BLOCK = 8
_MIN_BLOCKS_PER_K = 2

STAT_NAMES = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")
# Rows of the packed [4, n] row sums: row_kernels.SUM_ROWS, then the target's e.
_RANK = row_kernels.SUM_ROWS.index("target_rank")
_TARGET_EXP = len(row_kernels.SUM_ROWS)


def _chunk_rows(vocab: int, device: torch.device, compiled: bool) -> int:
    if device.type == "cuda":
        elements = _CUDA_CHUNK_ELEMENTS
    else:
        elements = _COMPILED_CHUNK_ELEMENTS if compiled else _CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _sub_chunk_rows(vocab: int, device: torch.device) -> int:
    if device.type == "cuda":
        return _chunk_rows(vocab, device, compiled=False)
    return max(1, _SUB_CHUNK_ELEMENTS // max(vocab, 1))


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max [c], the k_local largest values [c, k] (any order) and the ties beyond them [c].

    Exact, fp32; the ties are #{z >= tau} - k with tau the k-th largest (as float): K_t holds
    them too.

    With blocks: let t be the k-th largest block maximum. At least k logits are >= t (one per top
    block), so the k-th largest logit tau >= t, and every logit > t lies in a block whose maximum
    is > t; there are fewer than k such blocks, so the top-k selection of blocks contains them all.
    If fewer than k logits exceed t, the remaining top-k values equal t, and each chosen block with
    maximum t supplies one. So the top-k of the chosen blocks' logits is the row's top-k multiset.
    Any partition into groups works the same way: the k*B chosen logits are split again into k*B/8
    groups of 8 (strided, so the group maxima are 7 elementwise maxima) and the top-k is taken
    over the k*8 logits of the k best groups. The logits >= tau all lie in the final candidates
    unless more than k blocks (or groups) have a maximum >= tau (ties at tau across them); such
    rows are counted over the whole row.
    """
    c, width = zc.shape
    if block is None:
        top = torch.topk(zc, k_local, dim=-1, sorted=False).values
        at_least = (zc >= top.amin(dim=-1, keepdim=True)).sum(dim=-1)
        return top.amax(dim=-1).float(), top.float(), (at_least - k_local).float()
    blocks = zc.view(c, width // block, block)
    block_max = blocks.amax(dim=-1)  # [c, nb], input dtype
    row_max = block_max.amax(dim=-1).float()
    chosen = torch.topk(block_max, k_local, dim=-1, sorted=False).indices  # the k blocks, [c, k]
    candidates = _take_blocks(blocks, chosen).view(c, -1)  # [c, k*B]
    # Maxima of the sets the candidates were chosen from: a logit >= tau outside the candidates
    # needs more than k of them >= tau (a tie at tau across sets).
    set_maxima = [block_max]
    if block > _SUB_BLOCK and k_local > 1:
        groups = candidates.shape[1] // _SUB_BLOCK
        strided = candidates.view(c, _SUB_BLOCK, groups)  # group g: positions g + i * groups
        group_max = strided.amax(dim=1)  # [c, groups]
        set_maxima.append(group_max)
        chosen = torch.topk(group_max, k_local, dim=-1, sorted=False).indices  # [c, k]
        candidates = strided.gather(2, chosen[:, None, :].expand(c, _SUB_BLOCK, k_local))
        candidates = candidates.view(c, -1)  # [c, _SUB_BLOCK * k]
    top = torch.topk(candidates, k_local, dim=-1, sorted=False).values  # [c, k], input dtype
    tau = top.amin(dim=-1, keepdim=True)
    at_least = torch.count_nonzero(candidates >= tau, dim=-1)
    spilled = torch.zeros(c, dtype=torch.bool, device=zc.device)
    for maxima in set_maxima:
        spilled |= torch.count_nonzero(maxima >= tau, dim=-1) > k_local
    if bool(spilled.any()):
        rows = spilled.nonzero(as_tuple=True)[0]
        at_least[rows] = torch.count_nonzero(zc[rows] >= tau[rows], dim=-1)
    return row_max, top.float(), (at_least - k_local).float()


def _threshold_and_head(
    local_top: torch.Tensor,
    topk: int,
    row_max: torch.Tensor,
    target_logit: torch.Tensor,
    group: dist.ProcessGroup | None,
    world: int,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tau [n] (the k-th largest logit over the whole vocabulary) and the head sums [n] x 2.

    local_top [n, k_local + 1]: this rank's k_local largest values, then its ties beyond them.
    K_t = {z >= tau} is the gathered values >= tau plus, from each rank whose own k-th value is
    tau, its ties: a rank's logits > its k-th value are all in its list, and tau is never below a
    rank's k-th value. The head sums, sum_{K_t, a != x} e_a and e_a * d_a, are taken over them,
    with one copy of the target's value left out when x is in K_t (no subtraction: the target
    may dominate). Every rank computes the same values. ``native``: the k-th largest of the
    gathered lists by native_select (CPU), else torch.topk.

    Collective: all-gather of [n, k_local + 1] fp32.
    """
    n, width = local_top.shape
    k_local = width - 1
    dev = local_top.device
    if world == 1:
        gathered = local_top[None]  # [1, n, k + 1]
    else:
        gathered = torch.empty((world * n, width), dtype=local_top.dtype, device=dev)
        dist.all_gather_into_tensor(gathered, local_top.contiguous(), group=group)
        gathered = gathered.view(world, n, width)
    tau = torch.empty(n, dtype=torch.float32, device=dev)
    head = torch.empty((2, n), dtype=torch.float32, device=dev)
    lowest = torch.finfo(torch.float32).min  # d clamped here: e * d = 0 * lowest = 0 at -inf
    # Rows in chunks: the [rows, tp * k] temporaries stay small.
    for rows in _row_chunks(n, max(1, (1 << 16) // (world * width))):
        part = gathered[:, rows]  # [tp, r, k + 1]
        values = part[..., :k_local].permute(1, 0, 2).reshape(-1, world * k_local)  # [r, tp*k]
        if world == 1:
            kth = values.amin(dim=-1)
        elif native:
            kth = native_select.block_topk(values.contiguous(), topk)[1].amin(dim=-1)
        else:
            kth = torch.topk(values, topk, dim=-1, sorted=False).values.amin(dim=-1)
        tau[rows] = kth
        rank_kth = part[..., :k_local].amin(dim=-1)  # [tp, r]
        ties = torch.where(rank_kth == kth, part[..., k_local], 0.0).sum(dim=0)  # [r]
        x = target_logit[rows]
        keep = values >= kth[:, None]  # [r, tp*k]
        # One copy of the target's value is left out (values == x >= tau only if x is in K_t);
        # a target at tau that is not in the lists is one of the ties.
        same = keep & (values == x[:, None])
        has_copy = same.any(dim=-1)
        first = same.to(torch.uint8).argmax(dim=-1)
        picked = torch.arange(first.shape[0], device=dev)
        keep[picked, first] &= ~has_copy
        ties = ties - ((x >= kth) & ~has_copy).float()
        d = (values - row_max[rows, None]).clamp_(min=lowest)
        e = torch.exp(d).mul_(keep)
        d_tau = (kth - row_max[rows]).clamp_(min=lowest)
        ties_mass = ties * torch.exp(d_tau)
        head[0, rows] = e.sum(dim=-1) + ties_mass
        head[1, rows] = e.mul_(d).sum(dim=-1) + ties_mass * d_tau
    return tau, head[0], head[1]


class _Passes:
    """Runs the row_kernels passes over a chunk of rows: compiled in one call, eager by sub-chunks."""

    def __init__(self, vocab: int, device: torch.device, kernel: str) -> None:
        self.kernel = kernel
        self.compiled = row_kernels.use_compiled(kernel)
        self.sub_rows = _sub_chunk_rows(vocab, device)

    def calls(self, rows: slice) -> Iterator[slice]:
        """A compiled pass makes no temporaries: the chunk is one call. Eager: sub-chunks."""
        if self.compiled:
            yield rows
            return
        for start in range(rows.start, rows.stop, self.sub_rows):
            yield slice(start, min(start + self.sub_rows, rows.stop))

    def forward(self, z, sums, row_max, target_logit, rows: slice, with_rank: bool) -> None:
        """sums[:2 or 3, rows] (row_kernels.row_sums[_with_rank]); the target's logit is -inf."""
        for r in self.calls(rows):
            if with_rank:
                sums[: _RANK + 1, r] = row_kernels.run(
                    row_kernels.row_sums_with_rank, self.kernel, z[r], row_max[r], target_logit[r]
                )
            else:
                sums[:_RANK, r] = row_kernels.run(
                    row_kernels.row_sums, self.kernel, z[r], row_max[r]
                )

    def backward(self, z, grad, row_max, tau, head_scale, tail_scale, rows: slice) -> None:
        """grad[rows] (row_kernels.shaped_grad); grad may be z itself (then shaped_grad_)."""
        inplace = grad.data_ptr() == z.data_ptr()
        for r in self.calls(rows):
            scales = (row_max[r], tau[r], head_scale[r], tail_scale[r])
            if inplace:
                row_kernels.run(row_kernels.shaped_grad_, self.kernel, z[r], *scales)
            else:
                row_kernels.run(row_kernels.shaped_grad, self.kernel, z[r], grad[r], *scales)


@contextmanager
def _target_masked(z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """z[rows, cols] = -inf while the block runs, then the logits as they were (also on error).

    Leaving the target out of the row sums this way costs two scatters of n values instead of a
    per-element column comparison (a quarter of the pass, measured). The write goes through
    ``.data``, which has its own version counter: an op that saved the logits for its backward
    sees them unchanged, as they are once the block exits.
    """
    data = z.data
    saved = data[rows, cols]  # [owned] (advanced indexing: a copy)
    data[rows, cols] = float("-inf")
    try:
        yield
    finally:
        data[rows, cols] = saved


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

        # Which rows' targets live on this shard, and where.
        local_target = tgt - rank * local_vocab
        owned = (local_target >= 0) & (local_target < local_vocab)
        owned_rows = owned.nonzero(as_tuple=True)[0]
        owned_cols = local_target[owned_rows]

        k_local = min(cfg.topk, local_vocab)
        block = _block_size(local_vocab, k_local)
        step = _chunk_rows(local_vocab, dev, compiled)

        # Row sums, one row per quantity: row_kernels.SUM_ROWS, then the target's e.
        sums = torch.zeros((_TARGET_EXP + 1, n), dtype=torch.float32, device=dev)
        target_logit = torch.full((n,), float("-inf"), device=dev)
        target_logit[owned_rows] = z[owned_rows, owned_cols].float()
        # On CPU the compiled kernels take step 1 to native/block_topk.c (the same algorithm),
        # which also counts the target's rank while each row is in cache: it needs the target's
        # logit first (with tp > 1, one more all-reduce MAX [n]).
        native = dev.type == "cpu" and native_select.supports(z) and native_select.usable(kernel)
        if native and world > 1:
            dist.all_reduce(target_logit, op=dist.ReduceOp.MAX, group=group)

        # 1. local max and top-k; with tp > 1 the global max and the target logit in one
        #    all-reduce MAX (the max alone where the target's logit was reduced above).
        row_max = torch.empty(n, dtype=torch.float32, device=dev)
        local_top = torch.empty((n, k_local + 1), dtype=torch.float32, device=dev)  # values, ties

        def local(rows: slice) -> None:
            if native:
                row_max[rows], local_top[rows, :k_local], local_top[rows, k_local], rank = (
                    native_select.block_topk(z[rows], k_local, above=target_logit[rows])
                )
                sums[_RANK, rows] = rank
            else:
                row_max[rows], local_top[rows, :k_local], local_top[rows, k_local] = _local_top(
                    z[rows], k_local, block
                )

        # Chunks of the eager size: the top-k's temporaries stay small, and chunks run in threads.
        _for_each_chunk(n, _chunk_rows(local_vocab, dev, compiled=False), dev, local, threads=True)
        if world > 1 and native:  # the target's logit is global already
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        elif world > 1:
            maxes = torch.stack([row_max, target_logit], dim=1)  # [n, 2]
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            row_max, target_logit = maxes[:, 0].contiguous(), maxes[:, 1].contiguous()
        # 2. the top-k threshold, and the sums over K_t from the gathered top-k lists.
        tau, head_others, xlogx_head = _threshold_and_head(
            local_top, cfg.topk, row_max, target_logit, group, world, native
        )
        tau_z = tau.to(z.dtype)  # exact: tau is one of the logits
        z_target = target_logit.to(z.dtype)  # exact, likewise
        # 3. the pass, with the target left out of its sums.
        passes = _Passes(local_vocab, dev, kernel)
        with _target_masked(z, owned_rows, owned_cols):
            _for_each_chunk(
                n, step, dev,
                lambda rows: passes.forward(z, sums, row_max, z_target, rows, not native),
                threads=not compiled,
            )  # fmt: skip
        # The target's e, from the owning rank (the pass above left it out of every sum).
        sums[_TARGET_EXP, owned_rows] = torch.exp(target_logit[owned_rows] - row_max[owned_rows])
        # Row sums and the target's exp, in one all-reduce SUM.
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        # 4. per-token math.
        others, xlogx_others, target_rank, target_exp = sums
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
            threads=not passes.compiled,
        )  # fmt: skip
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

    Collectives (when tp > 1): all-reduce MAX [n, 2]; all-gather [n, min(topk, V/tp) + 1] per
    rank; all-reduce SUM [4, n]. On CPU with the compiled kernels the MAX is two [n] all-reduces
    instead, the target's logit first (step 1 counts the rank against it). Backward: none.
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


def forward_temporaries_bytes(rows: int, local_vocab: int, kernel: str, on_gpu: bool) -> int:
    """Upper bound of the forward's vocabulary-sized temporaries on one rank (memory planning).

    On CPU with the compiled kernels (loss.kernel resolved for ``rows`` x ``local_vocab`` logits)
    step 1 runs in C and the passes in one loop each: nothing vocabulary-sized. The torch path's
    step 1 holds, for one chunk of rows at a time, a boolean mask over the chunk and its int64
    count: 9 bytes per logit of a chunk.
    """
    kernel = row_kernels.resolve(kernel, rows * local_vocab)
    if not on_gpu and row_kernels.use_compiled(kernel):
        return 0
    device = torch.device("cuda" if on_gpu else "cpu")
    chunk_rows = _chunk_rows(local_vocab, device, compiled=False)
    return 9 * min(rows, chunk_rows) * local_vocab
