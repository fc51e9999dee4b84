"""The shaped loss over vocab-parallel logits, as one autograd Function.

Rank r of the tensor-parallel group holds logits[..., r*V/tp : (r+1)*V/tp]. Nothing
vocabulary-sized crosses ranks. Forward, for n tokens and k_local = min(topk, V/tp), over chunks
of rows (about _CHUNK_ELEMENTS logits each on CPU):

1. local max and local top-k of the shard, by blocks: the maxima of blocks of B consecutive logits
   (one read of the shard) give the row max; the k blocks with the largest maxima hold the local
   top-k values (every logit above the k-th block maximum lies in one of them), so the top-k is
   taken over k*B candidates instead of V/tp logits. Exact, ties included (see _local_top).
   all-reduce MAX  [n, 2]           (local max, target logit where owned else -inf)
2. all-gather      [tp, n, k_local] (local top-k values) -> global k-th largest logit tau;
   a token a is in K_t iff z_a >= tau, decided locally (ties at tau are all in K_t).
   K_t's members on this shard lie in the blocks whose maximum is >= tau: they are found from
   those few blocks and kept as flat indices (no vocabulary-sized mask).
3. one pass into one fp32 buffer: e = exp(z - max), the row sums of e and e*d (d = z - max),
   the target's rank; the head sums come from K_t's indices.
   all-reduce SUM  [n, 6]           (the packed row sums)
   (with tp = 1 steps 1-3 run in the same pass over each chunk, while it is in cache)
4. per-token scalars (divprec.loss.rewards): loss, stats, backward coefficients.

Backward: grad = pi * C - c, shard-local and in place over the saved buffer; no collectives:
one in-place multiply by the tail scale, then K_t's entries (from their indices) and the target.

Memory: the only vocabulary-sized tensor kept for backward is the fp32 buffer (one copy of the
shard; with ``inplace=True`` and fp32 logits, the logits themselves). Saved besides: K_t's flat
indices (about k per token). Rows whose K_t spans too many blocks (massive ties at tau) store
membership in the buffer's sign bit instead (-e for head tokens), as does every row when the shard
is too narrow for blocks. Temporaries are per chunk of rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from divprec.loss.config import ShapedLossConfig
from divprec.loss.rewards import RowSums, shaped_rows

# Rows are processed in chunks of about this many logits (4 MiB per fp32 temporary): on CPU a
# chunk's passes then run from cache. On CUDA chunks are larger (fewer kernel launches and host
# syncs); that value is a guess, not yet measured.
_CHUNK_ELEMENTS = 1 << 20
_CUDA_CHUNK_ELEMENTS = 1 << 25
# Block widths tried for the block-max top-k, widest first; a width must divide V/tp and leave at
# least _MIN_BLOCKS_PER_K * k_local blocks, else the top-k is taken over the whole row.
_BLOCK_SIZES = (32, 64, 16)
# Width of the second-level blocks within the chosen blocks.
_SUB_BLOCK = 8
_MIN_BLOCKS_PER_K = 2
# A row whose K_t touches more than 2 * k_local + _DENSE_EXTRA_BLOCKS blocks (ties at tau) is
# handled densely: a row mask and the sign bit instead of indices.
_DENSE_EXTRA_BLOCKS = 16

STAT_NAMES = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")


def _chunk_rows(vocab: int, device: torch.device) -> int:
    elements = _CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CHUNK_ELEMENTS
    return max(1, elements // max(vocab, 1))


def _row_chunks(rows: int, step: int) -> Iterator[slice]:
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _for_each_chunk(
    rows: int, step: int, device: torch.device, fn: Callable[[int, slice], None]
) -> None:
    """Call fn(i, rows_i) for every chunk of rows.

    On CPU with several intra-op threads, chunks run concurrently in that many Python threads, each
    chunk single-threaded. A chunk's dozen ops are each too small for an OpenMP fork/join per op to
    pay off, and on a loaded machine every fork/join waits for a free core (milliseconds). torch
    ops release the GIL, so the threads compute in parallel. The results do not depend on the
    schedule: chunks touch disjoint rows.
    """
    chunks = list(enumerate(_row_chunks(rows, step)))
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads <= 1 or len(chunks) <= 1:
        for i, chunk in chunks:
            fn(i, chunk)
        return

    def call(i: int, chunk: slice) -> None:
        with torch.no_grad():  # grad mode is per thread; the Function's forward runs without
            fn(i, chunk)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
            for future in [pool.submit(call, i, chunk) for i, chunk in chunks]:
                future.result()  # re-raises a chunk's exception
    finally:
        torch.set_num_threads(threads)


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


@dataclass
class _Top:
    """What the local top-k of a chunk found: enough to locate K_t without another search."""

    row_max: torch.Tensor  # [c] fp32
    values: torch.Tensor  # [c, k] fp32, the k largest logits (any order)
    block_max: torch.Tensor | None = None  # [c, nb], input dtype
    # With candidates: the final candidate logits [c, m] (input dtype), a function giving their
    # columns, and per level (maxima of all groups, the chosen groups) to check for ties.
    candidates: torch.Tensor | None = None
    columns: Callable[[], torch.Tensor] | None = None
    levels: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


def _local_top(zc: torch.Tensor, k_local: int, block: int | None) -> _Top:
    """Row max and the k_local largest values of each row of zc [c, v], exactly.

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
        return _Top(top.amax(dim=-1).float(), top.float())
    blocks = zc.view(c, width // block, block)
    block_max = blocks.amax(dim=-1)  # [c, nb], input dtype
    row_max = block_max.amax(dim=-1).float()
    if k_local == 1:
        return _Top(row_max, row_max[:, None], block_max)
    chosen = torch.topk(block_max, k_local, dim=-1, sorted=False).indices  # [c, k]
    candidates = _take_blocks(blocks, chosen).view(c, -1)  # [c, k*B]
    levels = ((block_max, chosen),)

    def block_columns() -> torch.Tensor:
        offsets = torch.arange(block, device=zc.device)
        return (chosen[:, :, None] * block + offsets).view(c, -1)

    columns = block_columns
    if block > _SUB_BLOCK:
        groups = candidates.shape[1] // _SUB_BLOCK
        strided = candidates.view(c, _SUB_BLOCK, groups)  # group g: positions g + i * groups
        group_max = strided.amax(dim=1)  # [c, groups]
        chosen2 = torch.topk(group_max, k_local, dim=-1, sorted=False).indices  # [c, k]
        candidates = strided.gather(2, chosen2[:, None, :].expand(c, _SUB_BLOCK, k_local))
        candidates = candidates.view(c, -1)  # [c, _SUB_BLOCK * k]
        levels += ((group_max, chosen2),)

        def group_columns() -> torch.Tensor:
            steps = torch.arange(0, _SUB_BLOCK * groups, groups, device=zc.device)
            position = (steps[:, None] + chosen2[:, None, :]).view(c, -1)  # in the k*B logits
            first = chosen.gather(1, torch.div(position, block, rounding_mode="floor"))
            return first * block + position % block

        columns = group_columns
    top = torch.topk(candidates, k_local, dim=-1, sorted=False).values
    return _Top(row_max, top.float(), block_max, candidates, columns, levels)


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


class _Pass:
    """Step 3 over one chunk of rows: fills the buffer and the row sums; collects K_t's indices."""

    def __init__(self, z, buf, sums, target_exp, owned_rows, owned_cols, block, k_local, keep):
        self.z, self.buf, self.sums, self.target_exp = z, buf, sums, target_exp
        self.owned_rows, self.block, self.keep_head = owned_rows, block, keep
        self.vocab = vocab = z.shape[1]
        self.owned_flat = owned_rows * vocab + owned_cols  # ascending
        self.dense_cap = 2 * k_local + _DENSE_EXTRA_BLOCKS
        self.step = _chunk_rows(vocab, z.device)
        self.rows = min(self.step, z.shape[0])
        self.local = threading.local()  # one chunk-sized workspace per thread
        chunks = list(_row_chunks(z.shape[0], self.step))
        # Per chunk: K_t's chunk-local flat indices (int32), and the chunk-local rows whose K_t is
        # in the sign bit (None: none; "all": every row).
        self.head_index: list[torch.Tensor | None] = [None] * len(chunks)
        self.dense_rows: list[torch.Tensor | str | None] = [None] * len(chunks)
        # Where each chunk's owned targets start in owned_rows (one host sync).
        starts = torch.tensor([r.start for r in chunks] + [z.shape[0]])
        self.bounds = torch.searchsorted(owned_rows.cpu(), starts).tolist()

    def workspace(self, c: int) -> torch.Tensor:
        work = getattr(self.local, "work", None)
        if work is None:
            work = torch.empty((self.rows, self.vocab), dtype=torch.float32, device=self.z.device)
            self.local.work = work
        return work[:c]

    def run(self, i: int, rows: slice, row_max, tau, z_target, top: _Top | None) -> None:
        z, sums, vocab, block = self.z, self.sums, self.vocab, self.block
        zc, bc = z[rows], self.buf[rows]  # bc may alias zc (inplace): read zc before writing bc
        bflat = bc.view(-1)
        c = zc.shape[0]
        dev = zc.device
        d = self.workspace(c)  # the one chunk-sized temporary (per thread)
        tau_z = tau.to(zc.dtype)  # exact: tau is one of the logits
        lo, hi = self.bounds[i], self.bounds[i + 1]

        # K_t on this shard: the logits >= tau, all in the blocks whose maximum is >= tau.
        head = None
        if top is None or top.block_max is None:  # no blocks: every row is dense; slices
            dense = slice(None)
        else:
            head_blocks = top.block_max >= tau_z[:, None]  # [c, nb]
            count = head_blocks.sum(dim=-1)
            dense_mask = count > self.dense_cap
            # Rows whose K_t lies in the final candidates: at every level no group outside the
            # chosen ones has a maximum >= tau (ties excepted, fewer than k groups exceed tau).
            found = torch.zeros_like(dense_mask) if top.candidates is None else ~dense_mask
            for level, (maxima, chosen) in enumerate(top.levels):
                if top.candidates is None:
                    break
                kept = (maxima.gather(1, chosen) >= tau_z[:, None]).sum(dim=-1)
                every = count if level == 0 else (maxima >= tau_z[:, None]).sum(dim=-1)
                found &= kept == every
            parts = []
            if top.candidates is not None:
                hit = (top.candidates >= tau_z[:, None]) & found[:, None]
                hr, hq = hit.nonzero(as_tuple=True)
                hcol = top.columns()[hr, hq]
                parts.append((hr, hcol, top.candidates[hr, hq]))
            head_blocks &= ~(dense_mask | found)[:, None]
            hr, hb = head_blocks.nonzero(as_tuple=True)
            if hr.numel():  # the other rows: the logits >= tau of those blocks
                cand = zc.view(-1, block).index_select(0, hr * (vocab // block) + hb)  # [P, B]
                hit = (cand >= tau_z.index_select(0, hr)[:, None]).view(-1)
                hit = hit.nonzero(as_tuple=True)[0]
                hp = hit // block
                hrow = hr.index_select(0, hp)
                hcol = hb.index_select(0, hp) * block + (hit - hp * block)
                parts.append((hrow, hcol, cand.view(-1).index_select(0, hit)))
            if parts:
                hrow, hcol, hval = (torch.cat(x) for x in zip(*parts, strict=True))
                head = (hrow, hrow * vocab + hcol, hval)
            dense = dense_mask.nonzero(as_tuple=True)[0]
        dense_head = None
        if isinstance(dense, slice) or dense.numel():
            dense_head = zc[dense] >= tau_z[dense, None]

        # Rank of the target: #{a: z_a > z_x}, counted as floats (faster than a bool sum).
        torch.gt(zc, z_target[:, None], out=d)
        sums[rows, 5] = d.sum(dim=-1)

        torch.sub(zc, row_max[:, None], out=d)  # d = z - max, fp32
        torch.exp(d, out=bc)  # e; zc is no longer valid when bc aliases it
        # Exclude the target from every sum; it is accounted for separately.
        if hi > lo:
            target_flat = self.owned_flat[lo:hi] - rows.start * vocab
            self.target_exp.index_copy_(
                0, self.owned_rows[lo:hi], bflat.index_select(0, target_flat)
            )
            bflat.index_fill_(0, target_flat, 0.0)
        sums[rows, 0] = bc.sum(dim=-1)
        xlogx = d.mul_(bc)  # e * d
        xlogx_sum = xlogx.sum(dim=-1)
        bad = xlogx_sum.isnan().nonzero(as_tuple=True)[0]
        if bad.numel():
            # A -inf logit gives e = 0 and d = -inf: e * d is 0 (as with d clamped at the lowest
            # float), not NaN. NaN with e != 0 comes from NaN logits and stays.
            fixed = xlogx[bad]
            fixed.masked_fill_(fixed.isnan() & (bc[bad] == 0), -0.0)
            xlogx[bad] = fixed
            xlogx_sum[bad] = fixed.sum(dim=-1)
        sums[rows, 2] = xlogx_sum

        head_sum = torch.zeros(c, dtype=torch.float32, device=dev)
        head_xlogx = torch.zeros_like(head_sum)
        if head is not None and head[0].numel():
            hrow, hflat, hval = head
            e_head = bflat.index_select(0, hflat)  # the target's entry is already 0
            d_head = (hval.float() - row_max.index_select(0, hrow)).clamp_(
                min=torch.finfo(torch.float32).min
            )
            head_sum.index_add_(0, hrow, e_head)
            head_xlogx.index_add_(0, hrow, e_head * d_head)
            if self.keep_head:
                self.head_index[i] = hflat.int()
        if dense_head is not None:
            e_dense = bc[dense]
            head_sum[dense] = (e_dense * dense_head).sum(dim=-1)
            head_xlogx[dense] = (xlogx[dense] * dense_head).sum(dim=-1)
            bc[dense] = torch.where(dense_head, -e_dense, e_dense)  # sign bit marks K_t
            self.dense_rows[i] = "all" if isinstance(dense, slice) else dense
        sums[rows, 1] = head_sum
        sums[rows, 3] = head_xlogx


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

        # Which rows' targets live on this shard, and where.
        local_target = tgt - rank * local_vocab
        owned = (local_target >= 0) & (local_target < local_vocab)
        owned_rows = owned.nonzero(as_tuple=True)[0]
        owned_cols = local_target[owned_rows]

        k_local = min(cfg.topk, local_vocab)
        block = _block_size(local_vocab, k_local)
        # The buffer: the logits themselves when allowed (inplace) or when z is our own copy.
        if z.dtype == torch.float32 and (inplace or private):
            buf = z
        else:
            buf = torch.empty((n, local_vocab), dtype=torch.float32, device=dev)
        sums = torch.zeros((n, 6), dtype=torch.float32, device=dev)
        target_exp = torch.zeros(n, dtype=torch.float32, device=dev)
        same_scale = cfg.topk_negative_reward == cfg.tail_negative_reward
        passes = _Pass(
            z, buf, sums, target_exp, owned_rows, owned_cols, block, k_local, not same_scale
        )
        step = passes.step

        if world == 1:
            # Steps 1-3 in one pass over each chunk.
            target_logit = torch.full((n,), float("-inf"), device=dev)
            target_logit[owned_rows] = z[owned_rows, owned_cols].float()
            z_target = target_logit.to(z.dtype)  # exact: it is one of the logits
            row_max = torch.empty(n, dtype=torch.float32, device=dev)
            tau = torch.empty(n, dtype=torch.float32, device=dev)

            def fused(i: int, rows: slice) -> None:
                top = _local_top(z[rows], k_local, block)
                row_max[rows] = top.row_max
                tau[rows] = top.values.amin(dim=-1)
                passes.run(i, rows, top.row_max, tau[rows], z_target[rows], top)

            _for_each_chunk(n, step, dev, fused)
        else:
            # 1. local max and top-k; global max and target logit in one all-reduce MAX.
            maxes = torch.full((n, 2), float("-inf"), device=dev)
            local_topk = torch.empty((n, k_local), dtype=torch.float32, device=dev)

            def local(i: int, rows: slice) -> None:
                top = _local_top(z[rows], k_local, block)
                maxes[rows, 0] = top.row_max
                local_topk[rows] = top.values

            _for_each_chunk(n, step, dev, local)
            maxes[owned_rows, 1] = z[owned_rows, owned_cols].float()
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            row_max, target_logit = maxes[:, 0], maxes[:, 1]
            z_target = target_logit.to(z.dtype)
            # 2. the top-k threshold.
            tau = _global_threshold(local_topk, cfg.topk, group, world)
            del local_topk
            # 3. the pass.

            def main(i: int, rows: slice) -> None:
                zc = z[rows]
                top = None
                if block is not None:  # the block maxima again: K_t is found from them
                    top = _Top(row_max[rows], tau[rows], zc.view(zc.shape[0], -1, block).amax(-1))
                passes.run(i, rows, row_max[rows], tau[rows], z_target[rows], top)

            _for_each_chunk(n, step, dev, main)
        head_index, dense_rows = passes.head_index, passes.dense_rows
        passes.local = threading.local()  # frees this thread's workspace
        # Row sums and the target's exp, in one all-reduce SUM.
        sums[:, 4] = target_exp
        if world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        # 4. per-token math.
        shifted_target = target_logit - row_max
        rows_out = shaped_rows(
            RowSums(
                target_exp=sums[:, 4],
                target_shifted=shifted_target,
                others=sums[:, 0],
                head_others=sums[:, 1],
                xlogx_others=sums[:, 2],
                xlogx_head=sums[:, 3],
                target_in_head=target_logit >= tau,
                target_rank=sums[:, 5],
            ),
            cfg,
        )
        # A view made here of the logits cannot be saved (autograd forbids views created in no-grad
        # mode that are modified in place); save the logits themselves and view them in backward.
        saved_buf = (
            logits
            if buf.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
            else buf
        )
        ctx.save_for_backward(
            saved_buf, owned_rows, owned_cols, rows_out.head_scale, rows_out.tail_scale,
            rows_out.target_grad,
        )  # fmt: skip
        # Small index tensors (about k per token), not vocabulary-sized.
        ctx.head_index, ctx.dense_rows, ctx.step = head_index, dense_rows, step
        ctx.input_shape = logits.shape
        ctx.input_dtype = logits.dtype
        outputs = (
            rows_out.loss,
            rows_out.nll,
            rows_out.entropy,
            rows_out.topk_mass,
            rows_out.target_prob,
            sums[:, 5].clone(),
        )
        outputs = tuple(t.reshape(out_shape) for t in outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):  # type: ignore[override]
        buf, owned_rows, owned_cols, head_scale, tail_scale, target_grad = ctx.saved_tensors
        local_vocab = ctx.input_shape[-1]
        buf = buf.view(-1, local_vocab)  # [n, v/tp] (the saved logits themselves when inplace)
        g = grad_loss.reshape(-1).float()  # [n]
        head_scale = head_scale * g
        tail_scale = tail_scale * g

        def chunk(i: int, rows: slice) -> None:
            bc, hs, ts = buf[rows], head_scale[rows, None], tail_scale[rows, None]
            dense, head = ctx.dense_rows[i], ctx.head_index[i]
            if isinstance(dense, str):  # every row: grad = |b| * scale, b negative in K_t
                bc.mul_(torch.where(torch.signbit(bc), -hs, ts))
                return
            if head is not None:  # read K_t's e before the multiply overwrites it
                head = head.long()
                e_head = bc.view(-1).index_select(0, head)
            if dense is not None:
                b = bc[dense]
                b.mul_(torch.where(torch.signbit(b), -hs[dense], ts[dense]))
            bc.mul_(ts)  # one pass: every token as if in the tail
            if head is not None:
                bc.view(-1).index_copy_(
                    0, head, e_head * hs.view(-1).index_select(0, head // local_vocab)
                )
            if dense is not None:
                bc[dense] = b

        _for_each_chunk(buf.shape[0], ctx.step, buf.device, chunk)
        buf[owned_rows, owned_cols] = target_grad[owned_rows] * g[owned_rows]
        if ctx.input_dtype != torch.float32:
            buf = _narrow_in_place(buf, ctx.input_dtype, ctx.step)
        return buf.view(ctx.input_shape), None, None, None, None


def _narrow_in_place(buf: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
    """buf [n, v] fp32 converted to a 16-bit dtype inside its own storage (no second tensor).

    Row r of the result occupies the bytes of fp32 rows r/2 .. (r+1)/2, which a chunk ending at
    row b has already read when it writes rows below b: each chunk is converted into a temporary
    first. The result is a view of buf's storage (the first half of it).
    """
    n, vocab = buf.shape
    out = buf.view(-1).view(dtype)[: n * vocab].view(n, vocab)
    for rows in _row_chunks(n, step):
        out[rows] = buf[rows].to(dtype)
    return out


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
        inplace: with fp32 logits, use their storage as the loss's fp32 buffer instead of
            allocating one, as megatron-core's ``vocab_parallel_cross_entropy`` does: peak memory
            drops by one shard-sized fp32 tensor, the logits are overwritten (with exp(z - max),
            then the gradient, which the backward returns in that same storage), and nothing else
            may read them after this call. An op that saved the logits for its own backward then
            fails loudly (autograd's version check). No effect on bf16 logits (the fp32 buffer
            cannot live in a bf16 tensor). Results are identical either way.

    Returns:
        ``(loss, stats)``: loss ``[...]`` fp32, identical on every rank; stats a dict of detached
        fp32 ``[...]`` tensors: nll, entropy, topk_mass, target_prob, target_rank.

    Collectives (when tp > 1): all-reduce MAX [n, 2]; all-gather [n, min(topk, V/tp)] per rank;
    all-reduce SUM [n, 6]. Backward: none.
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
