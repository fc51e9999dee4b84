"""Vocab-parallel shaped loss: the autograd Function, its steps, and its collectives.

Rank r of the tensor-parallel group holds logits[..., r*V/tp : (r+1)*V/tp]. Nothing
vocabulary-sized crosses ranks. Forward, for n tokens and k_local = min(topk, V/tp), over chunks
of rows (divprec.loss.chunks):

0. the target's logit from the rank that owns it (divprec.loss.targets).
   all-reduce MAX  [n]              (the target's logit where owned, else -inf)
1. local max, local top-k and the ties beyond it, exactly, by blocks of logits; step 1's
   strategy (divprec.loss.local_top) is torch ops (divprec.loss.block_topk) or, on CPU, a C
   kernel (divprec.loss.native_select), which also counts the target's rank in the same read.
   The ranks agree on the strategy at the first call (one all-reduce SUM [tp] int32).
   all-reduce MAX  [n]              (the row max)
2. all-gather      [tp, n, k_local + 1] (local top-k values and ties) -> global k-th largest
   logit tau; a token a is in K_t iff z_a >= tau, decided locally (ties at tau are all in K_t).
   The sums over K_t (of e = exp(z - max) and e*d, d = z - max, target left out) come from the
   gathered lists and ties, the same on every rank (divprec.loss.threshold): O(k) per token.
3. one pass (divprec.loss.row_kernels) sums per row e and e*d over all tokens, and counts the
   target's rank where step 1 did not; the target itself is left out of every sum, by masking
   its logit to -inf while the pass runs (divprec.loss.targets.masked).
   all-reduce SUM  [4, n]           (the packed row sums, the rank and the target's e)
4. per-token scalars (divprec.loss.rewards): loss, stats, backward coefficients.

The collectives are the same whatever step 1's strategy and loss.kernel.

Backward: grad = pi * C - c, shard-local, no collectives: one pass (row_kernels.shaped_grad,
or shaped_grad_ in place) recomputes e from the saved logits and writes e * (head or tail
scale, by z >= tau); then the targets' entries. Recomputing e costs one exp per logit and saves
writing and reading back a vocabulary-sized buffer.

The two passes are compiled (``loss.kernel``: one fused loop each, C++ on CPU, Triton on CUDA) or
run eagerly; the code and the results are the same. With ``loss.kernel=triton`` (the default on
CUDA) step 1 and both passes are the hand-written Triton kernels of divprec.loss.triton_kernels,
one launch each over all rows; the pass leaves the target out by its column instead of masking
it. divprec.loss.step_times times each step on request.

Memory: nothing vocabulary-sized is allocated in the forward, and the logits themselves (not a
copy) are saved for the backward. The backward allocates the gradient in the logits' dtype, or,
with ``inplace=True`` and fp32 logits, writes it into the logits' storage (as megatron-core's
cross-entropy does), each element read and then overwritten in the same loop. Temporaries are
per chunk of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from divprec.loss import (
    chunks,
    local_top,
    row_kernels,
    step_times,
    targets,
    threshold,
    triton_kernels,
)
from divprec.loss.config import ShapedLossConfig
from divprec.loss.rewards import RowSums, ShapedRows, shaped_rows

STAT_NAMES = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")
# Rows of the packed [4, n] row sums: row_kernels.SUM_ROWS, then the target's e.
_RANK = row_kernels.SUM_ROWS.index("target_rank")
_TARGET_EXP = len(row_kernels.SUM_ROWS)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None):
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """logits [..., v/tp] as rows z [n, v/tp], contiguous; and whether z is a private copy."""
    z = logits.reshape(-1, logits.shape[-1])  # [n, v/tp], input dtype
    private = z.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
    if not z.is_contiguous():
        z, private = z.contiguous(), True
    return z, private


def _row_sums(
    z: torch.Tensor,
    shard: targets.TargetShard,
    target_logit: torch.Tensor,
    row_max: torch.Tensor,
    target_rank: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """Step 3: the packed row sums [4, n] (row_kernels.SUM_ROWS, then the target's e).

    target_logit [n] fp32, global; target_rank [n] from step 1, or None: then the pass counts
    it. This rank's sums; no collectives.
    """
    n = z.shape[0]
    sums = torch.zeros((_TARGET_EXP + 1, n), dtype=torch.float32, device=z.device)
    if target_rank is not None:
        sums[_RANK] = target_rank
    if kernel == "triton":
        # One launch over all rows; the target is left out by its column, z is not written.
        skip = torch.where(shard.owned, shard.cols, -1)  # [n]
        counted = len(row_kernels.SUM_ROWS) - int(target_rank is not None)
        sums[:counted] = triton_kernels.row_sums(
            z, row_max, skip, target_logit if target_rank is None else None
        )
    else:
        target_z = target_logit.to(z.dtype)  # exact: the target's logit is one of the logits
        passes = row_kernels.ChunkPasses(z.shape[1], z.device, kernel)
        step = chunks.chunk_rows(z.shape[1], z.device, passes.compiled)
        with targets.masked(z, shard):
            chunks.for_each_chunk(
                n,
                step,
                z.device,
                lambda rows: passes.forward(z, sums, row_max, target_z, rows, target_rank is None),
                threads=not passes.compiled,
            )
    # The target's e, from the owning rank (the pass above left it out of every sum).
    sums[_TARGET_EXP] = torch.where(shard.owned, torch.exp(target_logit - row_max), 0.0)
    return sums


def _per_token(
    sums: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor],
    tau: torch.Tensor,
    row_max: torch.Tensor,
    target_logit: torch.Tensor,
    cfg: ShapedLossConfig,
) -> ShapedRows:
    """Step 4: the loss, the stats and the backward's coefficients [n], from the global sums."""
    others, xlogx_others, target_rank, target_exp = sums
    return shaped_rows(
        RowSums(
            target_exp=target_exp,
            target_shifted=target_logit - row_max,
            others=others,
            head_others=head[0],
            xlogx_others=xlogx_others,
            xlogx_head=head[1],
            target_in_head=target_logit >= tau,
            target_rank=target_rank,
        ),
        cfg,
    )


class _VocabParallelShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cfg: ShapedLossConfig, group, inplace: bool):  # type: ignore[override]
        rank = dist.get_rank(group) if group is not None else 0
        world = dist.get_world_size(group) if group is not None else 1
        vocab = logits.shape[-1] * world
        if cfg.topk > vocab:
            raise ValueError(f"loss.topk={cfg.topk} exceeds the vocabulary size {vocab}")
        z, private = _as_rows(logits)  # [n, v/tp]
        tgt = target.reshape(-1)  # [n]
        targets.check(tgt, z.shape[0], vocab, logits.shape)
        lap = step_times.laps(z.device)  # marks the steps' ends (timed only when recording)
        kernel = row_kernels.resolve(cfg.kernel, z.numel(), z.device)
        strategy = local_top.select(kernel, z, group)

        # 0. The target's logit, from its owner.
        shard = targets.locate(z, tgt, rank)
        target_logit = _all_reduce(shard.logit.clone(), dist.ReduceOp.MAX, group)  # [n]
        lap("0 target logit")
        # 1. Local max and top-k (the target's rank too, if the strategy counts it); global max.
        top = strategy.run(z, min(cfg.topk, z.shape[1]), target_logit)
        lap("1 local top-k")
        row_max = _all_reduce(top.row_max, dist.ReduceOp.MAX, group)  # [n]
        lap("1 all-reduce max")
        # 2. The threshold, and the sums over K_t from the gathered top-k lists.
        gathered = threshold.gather_lists(top.values_and_ties, group)  # [tp, n, k + 1]
        lap("2 all-gather")
        tau, *head = threshold.threshold_and_head(
            gathered, cfg.topk, row_max, target_logit, strategy.kth_largest
        )
        lap("2 threshold and head")
        # 3. The pass over the logits, the target left out of its sums.
        sums = _row_sums(z, shard, target_logit, row_max, top.target_rank, kernel)  # [4, n]
        lap("3 pass")
        sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
        lap("3 all-reduce sum")
        # 4. Per token.
        rows_out = _per_token(sums, head, tau, row_max, target_logit, cfg)
        lap("4 per token")

        # The logits themselves are saved (a private contiguous copy only if they were strided);
        # the backward writes the gradient into them when that is allowed.
        ctx.save_for_backward(
            z if private else logits,
            row_max,
            tau.to(z.dtype),
            shard.owned,
            shard.cols,
            rows_out.head_scale,
            rows_out.tail_scale,
            rows_out.target_grad,
        )
        ctx.overwrite = private or (inplace and z.dtype == torch.float32)
        ctx.kernel = kernel
        ctx.input_shape = logits.shape
        outputs = (
            rows_out.loss,
            rows_out.nll,
            rows_out.entropy,
            rows_out.topk_mass,
            rows_out.target_prob,
            sums[_RANK].clone(),
        )
        outputs = tuple(t.reshape(target.shape) for t in outputs)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):  # type: ignore[override]
        saved, row_max, tau_z, owned, cols, head_scale, tail_scale, target_grad = ctx.saved_tensors
        z = saved.view(-1, ctx.input_shape[-1])  # [n, v/tp]
        lap = step_times.laps(z.device)
        g = grad_loss.reshape(-1).float()  # [n]
        head_scale = (head_scale * g).contiguous()
        tail_scale = (tail_scale * g).contiguous()
        grad = z if ctx.overwrite else torch.empty_like(z)
        if ctx.kernel == "triton":
            triton_kernels.shaped_grad(z, grad, row_max, tau_z, head_scale, tail_scale)
        else:
            passes = row_kernels.ChunkPasses(z.shape[1], z.device, ctx.kernel)
            chunks.for_each_chunk(
                z.shape[0],
                chunks.chunk_rows(z.shape[1], z.device, passes.compiled),
                z.device,
                lambda rows: passes.backward(z, grad, row_max, tau_z, head_scale, tail_scale, rows),
                threads=not passes.compiled,
            )
        targets.write_at_targets(grad, owned, cols, target_grad * g)
        lap("backward")
        return grad.view(ctx.input_shape), None, None, None, None


def default_tp_group() -> dist.ProcessGroup | None:
    """megatron-core's tensor-parallel group when it is initialised, else None."""
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

    Collectives (when tp > 1), whatever the kernel: all-reduce MAX [n] (the target's logit);
    all-reduce MAX [n] (the row max); all-gather [n, min(topk, V/tp) + 1] per rank; all-reduce
    SUM [4, n]; at the first call with the CPU top-k kernel asked for, all-reduce SUM [tp] int32
    (the ranks agree on it). Backward: none.
    """
    if tp_group is None:
        tp_group = default_tp_group()
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
    step 1 runs in C and the passes in one loop each, and with loss.kernel=triton every pass is
    one Triton kernel: nothing vocabulary-sized ("auto" on CUDA is bounded as if its Triton
    kernels failed their self-check). The torch path's step 1 holds, for one chunk of rows at a
    time, a boolean mask over the chunk and its int64 count: 9 bytes per logit of a chunk.
    """
    if kernel == "triton":
        return 0  # the Triton kernels keep nothing per element
    if not on_gpu:
        resolved = row_kernels.resolve(kernel, rows * local_vocab, torch.device("cpu"))
        if row_kernels.use_compiled(resolved):
            return 0
    device = torch.device("cuda" if on_gpu else "cpu")
    chunk_rows = chunks.chunk_rows(local_vocab, device, compiled=False)
    return 9 * min(rows, chunk_rows) * local_vocab
