"""Step 2: the global top-k threshold tau and the sums over K_t, from the gathered top-k lists."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from divprec.loss import chunks

# Rows of the gathered lists handled at once: the [rows, tp * k] temporaries stay this small.
_GATHERED_ELEMENTS = 1 << 16


def gather_lists(local_top: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's [n, k + 1] lists, [tp, n, k + 1].

    Collective (tp > 1): all-gather of [n, k + 1] fp32.
    """
    if group is None:
        return local_top[None]  # [1, n, k + 1]
    world = dist.get_world_size(group)
    n, width = local_top.shape
    gathered = torch.empty((world * n, width), dtype=local_top.dtype, device=local_top.device)
    dist.all_gather_into_tensor(gathered, local_top.contiguous(), group=group)
    return gathered.view(world, n, width)  # [tp, n, k + 1]


def threshold_and_head(
    gathered: torch.Tensor,
    topk: int,
    row_max: torch.Tensor,
    target_logit: torch.Tensor,
    kth_largest: Callable[[torch.Tensor, int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tau [n] (the k-th largest logit over the whole vocabulary) and the head sums [n] x 2.

    gathered [tp, n, k_local + 1]: each rank's k_local largest values, then its ties beyond them
    (:func:`gather_lists`); row_max and target_logit [n] fp32, global. K_t = {z >= tau} is the
    gathered values >= tau plus, from each rank whose own k-th value is tau, its ties: a rank's
    logits > its k-th value are all in its list, and tau is never below a rank's k-th value. The
    head sums, sum_{K_t, a != x} e_a and e_a * d_a (e = exp(d), d = z - max), are taken over them,
    with one copy of the target's value left out when x is in K_t (no subtraction: the target
    may dominate). Every rank computes the same values, O(tp * k) per row. ``kth_largest``
    selects the k-th largest of the lists (step 1's strategy's). No collectives.
    """
    world, n, width = gathered.shape
    k_local = width - 1
    dev = gathered.device
    tau = torch.empty(n, dtype=torch.float32, device=dev)
    head = torch.empty((2, n), dtype=torch.float32, device=dev)
    lowest = torch.finfo(torch.float32).min  # d clamped here: e * d = 0 * lowest = 0 at -inf
    for rows in chunks.row_chunks(n, max(1, _GATHERED_ELEMENTS // (world * width))):
        part = gathered[:, rows]  # [tp, r, k + 1]
        values = part[..., :k_local].permute(1, 0, 2).reshape(-1, world * k_local)  # [r, tp*k]
        kth = values.amin(dim=-1) if world == 1 else kth_largest(values, topk)  # [r]
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
