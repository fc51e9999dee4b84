"""The output layer fused with the shaped loss: the logits exist one chunk of tokens at a time.

``hidden [n, h]`` (the same on every rank of the TP group) times this rank's vocabulary slice of
the output weight ``[V/tp, h]`` gives the vocab-parallel logits ``[n, V/tp]``. Unfused, those
logits are the largest activation of a model (9.3 GiB of fp32 per rank at V 151936, 16k tokens,
tp 1). Here they are made, used and freed per chunk of tokens, as Liger-Kernel's fused linear
cross-entropy does:

    for each chunk of c tokens:
        logits = hidden_c @ weight.T                       [c, V/tp]
        loss_c, stats_c, and d(sum_i w_i loss_i)/d logits  (vocab_parallel_shaped_loss, in place)
        grad_hidden_c = grad_logits @ weight               [c, h]
        grad_weight  += grad_logits.T @ hidden_c           [V/tp, h], fp32

A chunk holds whole rows of every rank's slice, so the loss's global top-k threshold per row
stays exact: each chunk is one call of the unfused vocab-parallel loss, with its collectives.

The gradients are computed during the forward, for token weights ``w`` = ``loss_mask`` (ones
without it), and kept until the backward. That is the backward's answer whenever the gradient
of the per-token loss is ``g = s * w`` for one scalar ``s`` (a masked mean or sum of the loss,
times any loss scale): the backward scales the kept gradients by ``s``. For any other ``g`` (a
per-sequence average, the loss used twice) the backward runs the chunks again with ``w = g``:
the same result, at the price of a second pass. Either way the matmuls are those of the
unfused output layer (one forward, two backward) when the fast path holds.

Memory beyond the inputs and the gradients: one chunk of logits (its gradient is written in
place), the loss's per-chunk temporaries, and ``[n]`` vectors. The chunk size is
``loss.fused_chunk_tokens``, by default the tokens whose fp32 logits fit
``FUSED_CHUNK_LOGIT_BYTES``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from divprec.loss import chunks
from divprec.loss.config import ShapedLossConfig
from divprec.loss.vocab_parallel import STAT_NAMES, default_tp_group, vocab_parallel_shaped_loss

# The default memory budget of one chunk's logits (fp32 bytes per rank, 192 MiB): large enough
# that the chunk's matmuls run as fast as one whole matmul (on 2 CPU cores 330 tokens at V 151936
# did, 220 took 5-13% longer), small enough to be under a tenth of the unfused logits of a
# training micro-batch of 4096 tokens at that vocabulary.
FUSED_CHUNK_LOGIT_BYTES = 3 << 26
# The backward reuses the forward's gradients when g = s * w to this relative tolerance
# (rounding of the loss reduction's scalars, e.g. 1 / num_tokens, multiplied by the mask).
_SCALE_RTOL = 1e-6


def fused_chunk_tokens(cfg: ShapedLossConfig, local_vocab: int) -> int:
    """Tokens per chunk: ``cfg.fused_chunk_tokens``, or those whose fp32 logits shard of
    ``local_vocab`` columns fits ``FUSED_CHUNK_LOGIT_BYTES`` (at least 1)."""
    if cfg.fused_chunk_tokens:
        return cfg.fused_chunk_tokens
    return max(1, FUSED_CHUNK_LOGIT_BYTES // (4 * max(local_vocab, 1)))


def _chunked_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    token_weights: torch.Tensor | None,
    cfg: ShapedLossConfig,
    group: dist.ProcessGroup | None,
    want: tuple[bool, bool],
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Loss and stats [n] over all chunks; with token_weights, the gradients of
    ``sum_i w_i loss_i`` w.r.t. hidden (this rank's part, [n, h]) and weight ([V/tp, h] fp32)
    as ``want`` = (hidden, weight) asks. hidden [n, h]; weight [V/tp, h]; target [n].
    Collectives: those of vocab_parallel_shaped_loss, once per chunk."""
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    stats = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in STAT_NAMES]
    grad_hidden = torch.empty_like(hidden) if token_weights is not None and want[0] else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if token_weights is not None and want[1]
        else None
    )
    step = min(n, fused_chunk_tokens(cfg, weight.shape[0]))
    # One buffer for every chunk's logits (and, in place, their gradient): allocated, and its
    # pages first touched, once rather than per chunk.
    buffer = hidden.new_empty((step, weight.shape[0]))  # [c, v/tp]
    for rows in chunks.row_chunks(n, step):
        hidden_c = hidden[rows]  # [c, h]
        logits = torch.mm(hidden_c, weight.t(), out=buffer[: hidden_c.shape[0]])  # [c, v/tp]
        if token_weights is None:
            loss_c, stats_c = vocab_parallel_shaped_loss(logits, target[rows], cfg, group)
        else:
            with torch.enable_grad():
                logits.requires_grad_(True)
                loss_c, stats_c = vocab_parallel_shaped_loss(
                    logits, target[rows], cfg, group, inplace=True
                )
                # fp32 logits: the gradient is written into their storage (inplace).
                (grad_logits,) = torch.autograd.grad(loss_c, logits, token_weights[rows])
            loss_c = loss_c.detach()
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])  # [c, h]
            if grad_weight is not None:
                if grad_logits.dtype == torch.float32 and hidden_c.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden_c)  # [v/tp, h]
                else:  # bf16: the chunk's product in its dtype, accumulated in fp32
                    grad_weight.add_(grad_logits.t() @ hidden_c)
            del grad_logits
        loss[rows] = loss_c
        for out, name in zip(stats, STAT_NAMES, strict=True):
            out[rows] = stats_c[name]
    return loss, stats, grad_hidden, grad_weight


def _common_scale(
    g: torch.Tensor, w: torch.Tensor, group: dist.ProcessGroup | None
) -> float | None:
    """s with g = s * w (to _SCALE_RTOL of max |g|) on every rank of ``group``, else None.

    One host synchronisation per backward: the fit and its check stay on the device until the
    answer is read. Collective (tp > 1): all-reduce MIN [1] int32 (every rank takes the same
    path: its collectives differ).
    """
    if not g.numel():
        return 0.0
    ww = (w * w).sum()
    s = torch.where(ww > 0, (g * w).sum() / ww, 0.0)
    fits = ((g - s * w).abs().amax() <= _SCALE_RTOL * g.abs().amax()).to(torch.int32)
    if _parallel(group):
        fits = fits.reshape(1)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=group)
    scale, ok = torch.stack([s.float(), fits.reshape(()).float()]).tolist()
    return scale if ok else None


def _parallel(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _gather_sequence(hidden: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sequence parallel: this rank's rows [n/tp, h] -> all ranks' rows [n, h].
    all-gather [n/tp, h] per rank."""
    if not _parallel(group):
        return hidden
    world = dist.get_world_size(group)
    full = hidden.new_empty((world * hidden.shape[0], hidden.shape[1]))  # [n, h]
    dist.all_gather_into_tensor(full, hidden.contiguous(), group=group)
    return full


def _reduce_grad_hidden(
    grad: torch.Tensor, group: dist.ProcessGroup | None, sequence_parallel: bool
) -> torch.Tensor:
    """Sum the ranks' parts of grad hidden [n, h]: all-reduce SUM [n, h], or with sequence
    parallelism reduce-scatter SUM to this rank's rows [n/tp, h]."""
    if not _parallel(group):
        return grad
    if not sequence_parallel:
        dist.all_reduce(grad, group=group)
        return grad
    world = dist.get_world_size(group)
    mine = grad.new_empty((grad.shape[0] // world, grad.shape[1]))  # [n/tp, h]
    dist.reduce_scatter_tensor(mine, grad, group=group)
    return mine


class _FusedLinearShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden,
        weight,
        target,
        token_weights,
        cfg: ShapedLossConfig,
        group,
        sequence_parallel: bool,
        want: tuple[bool, bool],
    ):
        rows = hidden.reshape(-1, hidden.shape[-1])  # [n(/tp with SP), h]
        full = _gather_sequence(rows, group) if sequence_parallel else rows  # [n, h]
        tgt = target.reshape(-1)  # [n]
        if full.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree on "
                "tokens" + (" (sequence parallel: hidden holds 1/tp of them)" * sequence_parallel)
            )
        fast = token_weights if any(want) else None
        loss, stats, grad_hidden, grad_weight = _chunked_pass(
            full, weight, tgt, fast, cfg, group, want
        )
        ctx.cfg, ctx.group, ctx.sequence_parallel, ctx.want = cfg, group, sequence_parallel, want
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        if any(want):
            ctx.save_for_backward(rows, weight, tgt, token_weights)
            ctx.grads = (grad_hidden, grad_weight)
        outputs = tuple(t.reshape(target.shape) for t in (loss, *stats))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):  # type: ignore[override]
        rows, weight, tgt, token_weights = ctx.saved_tensors
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        g = grad_loss.reshape(-1).float()  # [n]
        scale = _common_scale(g, token_weights, ctx.group)
        if scale is None:  # g is not s * w: the chunks again, with w = g
            full = _gather_sequence(rows, ctx.group) if ctx.sequence_parallel else rows
            _, _, grad_hidden, grad_weight = _chunked_pass(
                full, weight, tgt, g, ctx.cfg, ctx.group, ctx.want
            )
        else:
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(scale)
        if grad_hidden is not None:
            grad_hidden = _reduce_grad_hidden(grad_hidden, ctx.group, ctx.sequence_parallel)
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_shaped_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    cfg: ShapedLossConfig,
    tp_group: dist.ProcessGroup | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shaped loss of ``hidden @ weight.T``, without the whole logits tensor.

    Returns exactly what ``vocab_parallel_shaped_loss(hidden @ weight.T, target, cfg, tp_group)``
    returns, with the gradients that the output layer's matmul would pass to ``hidden`` and
    ``weight``; the logits exist one chunk of ``loss.fused_chunk_tokens`` tokens at a time.

    Args:
        hidden: ``[..., h]`` fp32 or bf16, the same on every rank of ``tp_group``; with
            ``sequence_parallel``, this rank's ``1/tp`` of the tokens along the first dimension
            (``[s/tp, b, h]``), as megatron-core's sequence parallelism shards them.
        weight: ``[V/tp, h]``, this rank's vocabulary slice of the output layer.
        target: ``[...]`` int64 token ids in [0, V), all the tokens (``[s, b]`` with SP).
        cfg: the rewards and the chunk size.
        tp_group: the tensor-parallel group; None means megatron-core's when it is initialised.
        loss_mask: ``[...]`` like ``target``: the weights the caller will reduce the per-token loss
            with (up to one scalar factor). The gradients are computed for them during the
            forward; another reduction is still exact, at the cost of a second pass. It does not
            change the returned loss or stats.
        sequence_parallel: hidden sharded over the sequence (see ``hidden``).

    Returns:
        ``(loss, stats)`` as :func:`vocab_parallel_shaped_loss`: loss ``[...]`` fp32, identical on
        every rank; stats detached fp32 ``[...]``: nll, entropy, topk_mass, target_prob,
        target_rank.

    Collectives (when tp > 1): with sequence parallelism, all-gather ``[n/tp, h]`` per rank
    (forward, and again in the backward's second pass if one runs); per chunk, those of
    vocab_parallel_shaped_loss (all-reduce MAX [c] twice, all-gather [c, min(topk, V/tp) + 1],
    all-reduce SUM [4, c], and once per process its [tp] int32 agreement). Backward: all-reduce
    MIN [1] int32 (the ranks agree on reusing the forward's gradients); then all-reduce SUM
    ``[n, h]`` of grad hidden, or with sequence parallelism reduce-scatter ``[n, h]`` -> ``[n/tp,
    h]``.
    """
    if tp_group is None:
        tp_group = default_tp_group()  # may have size 1: then it is passed on, for no collective
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer token ids, got dtype {target.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be [V/tp, h] with h = hidden's last dimension "
            f"{hidden.shape[-1]}"
        )
    if loss_mask is not None and loss_mask.shape != target.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have target's shape {tuple(target.shape)}"
        )
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    if loss_mask is None:
        token_weights = torch.ones(target.numel(), dtype=torch.float32, device=hidden.device)
    else:
        token_weights = loss_mask.detach().reshape(-1).to(hidden.device, torch.float32)  # [n]
    loss, *stat_values = _FusedLinearShapedLoss.apply(
        hidden, weight, target.long(), token_weights, cfg, tp_group, sequence_parallel, want
    )
    return loss, dict(zip(STAT_NAMES, stat_values, strict=True))
