"""The shaped loss over vocab-parallel logits, as one autograd Function.

Rank r of the tensor-parallel group holds logits[..., r*V/tp : (r+1)*V/tp]. Nothing
vocabulary-sized crosses ranks. Forward, for n tokens and k_local = min(topk, V/tp):

1. local top-k of the shard (its first value is the local max).
   all-reduce MAX  [n, 2]           (local max, target logit where owned else -inf)
2. all-gather      [tp, n, k_local] (local top-k values) -> global k-th largest logit tau;
   a token a is in K_t iff z_a >= tau, decided locally (ties at tau are all in K_t).
3. row-chunked local passes into one fp32 buffer: e = exp(z - max), the masked sums in RowSums.
   all-reduce SUM  [n, 6]           (the packed row sums)
4. per-token scalars (divprec.loss.rewards): loss, stats, backward coefficients.

Backward: grad = pi * C - c, shard-local and in place over the saved buffer; no collectives.

Memory: the only vocabulary-sized tensor kept for backward is the fp32 buffer (one copy of the
shard). Membership in K_t is stored in its sign bit (-e for head tokens), so neither a mask nor the
logits are saved. Temporaries are per chunk of rows (about _CHUNK_ELEMENTS elements).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from divprec.loss.config import ShapedLossConfig
from divprec.loss.rewards import RowSums, shaped_rows

# Rows are processed in chunks of about this many logits, bounding temporaries at 16 MiB (fp32).
_CHUNK_ELEMENTS = 1 << 22

STAT_NAMES = ("nll", "entropy", "topk_mass", "target_prob", "target_rank")


def _row_chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_threshold(
    local_topk: torch.Tensor, topk: int, group: dist.ProcessGroup | None, world: int
) -> torch.Tensor:
    """k-th largest logit over the whole vocabulary. local_topk: [n, k_local], sorted descending.

    Collective: all-gather of [n, k_local] fp32 (k values per token per rank).
    """
    if world == 1:
        return local_topk[:, topk - 1]
    gathered = [torch.empty_like(local_topk) for _ in range(world)]
    dist.all_gather(gathered, local_topk.contiguous(), group=group)
    candidates = torch.cat(gathered, dim=-1)  # [n, tp * k_local]
    return torch.topk(candidates, topk, dim=-1, sorted=False).values.min(dim=-1).values


class _VocabParallelShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, cfg: ShapedLossConfig, group):  # type: ignore[override]
        rank, world = _world(group)
        local_vocab = logits.shape[-1]
        vocab = local_vocab * world
        if cfg.topk > vocab:
            raise ValueError(f"loss.topk={cfg.topk} exceeds the vocabulary size {vocab}")
        out_shape = target.shape
        z = logits.reshape(-1, local_vocab)  # [n, v/tp], input dtype
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

        # 1. local top-k and max; global max and target logit in one all-reduce MAX.
        k_local = min(cfg.topk, local_vocab)
        local_topk = torch.topk(z, k_local, dim=-1, sorted=True).values.float()  # [n, k_local]
        maxes = torch.full((n, 2), float("-inf"), device=dev)
        maxes[:, 0] = local_topk[:, 0]
        maxes[owned_rows, 1] = z[owned_rows, owned_cols].float()
        if world > 1:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        row_max, target_logit = maxes[:, 0], maxes[:, 1]

        # 2. the top-k threshold.
        tau = _global_threshold(local_topk, cfg.topk, group, world)
        del local_topk

        # 3. chunked local passes. buf holds e = exp(z - max), negated for tokens in K_t.
        buf = torch.empty((n, local_vocab), dtype=torch.float32, device=dev)
        sums = torch.zeros((n, 6), dtype=torch.float32, device=dev)
        target_exp_local = torch.zeros(n, dtype=torch.float32, device=dev)
        target_in_chunk = torch.zeros(n, dtype=torch.bool, device=dev)
        target_in_chunk[owned_rows] = True
        z_target = target_logit.to(z.dtype)  # exact: it is one of the logits
        lowest = torch.finfo(torch.float32).min
        for rows in _row_chunks(n, local_vocab):
            zc = z[rows]  # [c, v/tp]
            shifted = torch.sub(zc, row_max[rows, None], alpha=1).float()  # d = z - max
            shifted.clamp_(min=lowest)  # -inf logits: e = 0 and e * d = 0, not NaN
            ec = buf[rows]
            torch.exp(shifted, out=ec)
            # Exclude the target from every sum; it is accounted for separately.
            chunk_rows = target_in_chunk[rows].nonzero(as_tuple=True)[0]
            if chunk_rows.numel():
                cols = local_target[rows][chunk_rows]
                target_exp_local[rows][chunk_rows] = ec[chunk_rows, cols]
                ec[chunk_rows, cols] = 0.0
            head = zc >= tau[rows, None].to(zc.dtype)  # [c, v/tp] bool
            sums[rows, 5] = (zc > z_target[rows, None]).sum(dim=-1, dtype=torch.float32)
            sums[rows, 0] = ec.sum(dim=-1)
            shifted.mul_(ec)  # e * d
            sums[rows, 2] = shifted.sum(dim=-1)
            sums[rows, 3] = (shifted * head).sum(dim=-1)
            sums[rows, 1] = (ec * head).sum(dim=-1)
            ec.mul_(1.0 - 2.0 * head.float())  # sign bit marks K_t for the backward
        # Row sums and the target's exp, in one all-reduce SUM.
        sums[:, 4] = target_exp_local
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
        ctx.save_for_backward(
            buf, owned_rows, owned_cols, rows_out.head_scale, rows_out.tail_scale,
            rows_out.target_grad,
        )  # fmt: skip
        ctx.same_scale = cfg.topk_negative_reward == cfg.tail_negative_reward
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
        g = grad_loss.reshape(-1).float()  # [n]
        head_scale = head_scale * g
        tail_scale = tail_scale * g
        n, local_vocab = buf.shape
        for rows in _row_chunks(n, local_vocab):
            ec = buf[rows]  # [c, v/tp], sign = membership in K_t
            if ctx.same_scale:
                ec.abs_().mul_(tail_scale[rows, None])
            else:
                scale = torch.where(
                    torch.signbit(ec), head_scale[rows, None], tail_scale[rows, None]
                )
                ec.abs_().mul_(scale)
        buf[owned_rows, owned_cols] = target_grad[owned_rows] * g[owned_rows]
        grad = buf.view(ctx.input_shape)  # [..., v/tp]
        if grad.dtype != ctx.input_dtype:
            grad = grad.to(ctx.input_dtype)
        return grad, None, None, None


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shaped loss per token over vocab-parallel logits.

    Args:
        logits: ``[..., V/tp]`` fp32 or bf16, rank r of ``tp_group`` holding vocabulary slice
            [r*V/tp, (r+1)*V/tp). Not modified.
        target: ``[...]`` int64 token ids in [0, V).
        cfg: the rewards.
        tp_group: the tensor-parallel group; None means megatron-core's when it is initialised,
            else no parallelism.

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
    loss, *stat_values = _VocabParallelShapedLoss.apply(logits, target.long(), cfg, tp_group)
    return loss, dict(zip(STAT_NAMES, stat_values, strict=True))


def shaped_loss(
    logits: torch.Tensor, target: torch.Tensor, cfg: ShapedLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Shaped loss per token on one device: logits ``[..., V]``, target ``[...]``.

    The same algorithm as :func:`vocab_parallel_shaped_loss` with the vocabulary unsharded.
    """
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    loss, *stat_values = _VocabParallelShapedLoss.apply(logits, target.long(), cfg, None)
    return loss, dict(zip(STAT_NAMES, stat_values, strict=True))
