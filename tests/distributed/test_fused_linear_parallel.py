"""fused_linear_shaped_loss at tp 2 (gloo), with and without sequence parallelism, against the
unfused output layer + loss in one process."""

from __future__ import annotations

import torch

from divprec.loss import STAT_NAMES, ShapedLossConfig, fused_linear_shaped_loss, shaped_loss
from divprec.parallel.spawn import run_in_processes

VOCAB, HIDDEN, SEQ, BATCH = 96, 16, 6, 2


def _case(seed: int):
    """hidden [s, b, h], weight [V, h], target [s, b], a 0/1 mask; top logits on both sides of
    the tp 2 shard boundary (column 48)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.75
    weight[44:52] *= 2.5
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    target[0] = torch.tensor([47, 48])
    mask = (torch.rand(SEQ, BATCH, generator=g) > 0.3).float()
    return hidden, weight, target, mask


# name: (config, sequence parallel, the loss's reduction weights from the mask)
CASES = {
    "masked_mean": (
        ShapedLossConfig(beta=-0.25, topk=5, tail_negative_reward=-0.1, fused_chunk_tokens=5),
        False,
        lambda mask: mask / mask.sum(),
    ),
    "sp_masked_mean": (
        ShapedLossConfig(beta=0.5, topk=7, topk_negative_reward=0.1, fused_chunk_tokens=5),
        True,
        lambda mask: mask / mask.sum(),
    ),
    # per-token weights that are not a multiple of the mask: the backward's second pass
    "sp_second_pass": (
        ShapedLossConfig(beta=-0.5, topk=3, tail_negative_reward=-0.2, fused_chunk_tokens=4),
        True,
        lambda mask: mask * torch.linspace(0.2, 1.0, mask.numel()).reshape(mask.shape),
    ),
}


def _worker(rank: int, world: int) -> dict:
    group = torch.distributed.group.WORLD
    out = {}
    for seed, (name, (cfg, sp, reduction)) in enumerate(CASES.items()):
        hidden, weight, target, mask = _case(seed)
        width, rows = VOCAB // world, SEQ // world
        h = hidden[rank * rows : (rank + 1) * rows] if sp else hidden
        h = h.clone().requires_grad_(True)
        w = weight[rank * width : (rank + 1) * width].clone().requires_grad_(True)
        loss, stats = fused_linear_shaped_loss(
            h, w, target, cfg, tp_group=group, loss_mask=mask, sequence_parallel=sp
        )
        (loss * reduction(mask)).sum().backward()
        out[name] = (loss.detach(), {k: v.clone() for k, v in stats.items()}, h.grad, w.grad)
    return out


def test_fused_at_tp2_equals_unfused_single_process():
    world = 2
    results = run_in_processes(_worker, world)
    for seed, (name, (cfg, sp, reduction)) in enumerate(CASES.items()):
        hidden, weight, target, mask = _case(seed)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, stats = shaped_loss(h @ w.t(), target, cfg)  # [s, b]
        (loss * reduction(mask)).sum().backward()
        grad_w = torch.cat([results[r][name][3] for r in range(world)])
        torch.testing.assert_close(grad_w, w.grad, rtol=1e-5, atol=1e-6, msg=name)
        for rank in range(world):
            rank_loss, rank_stats, rank_grad_h, _ = results[rank][name]
            torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=name)
            for stat in STAT_NAMES:
                torch.testing.assert_close(
                    rank_stats[stat], stats[stat], rtol=1e-5, atol=1e-6, msg=f"{name} {stat}"
                )
            rows = SEQ // world
            expected = h.grad[rank * rows : (rank + 1) * rows] if sp else h.grad
            torch.testing.assert_close(rank_grad_h, expected, rtol=1e-5, atol=1e-6, msg=name)
