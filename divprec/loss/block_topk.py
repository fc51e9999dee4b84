"""Step 1 in torch ops: the row max, the exact top-k and its ties, by blocks of logits.

The same algorithm as the CPU's C kernel (native/block_topk.c), in torch ops: the CUDA path,
``loss.kernel=eager``, and the fallback where the C kernel cannot be built.
"""

from __future__ import annotations

import torch

# Block widths tried, widest first; a width must divide V/tp and leave at least
# MIN_BLOCKS_PER_K * k blocks, else the top-k is taken over the whole row.
BLOCK_SIZES = (32, 64, 16)
MIN_BLOCKS_PER_K = 2
# Width of the second-level groups within the chosen blocks.
SUB_BLOCK = 8


def block_size(local_vocab: int, k: int) -> int | None:
    """The block width for rows of ``local_vocab`` logits at this k, or None (the whole row)."""
    for block in BLOCK_SIZES:
        if local_vocab % block == 0 and local_vocab // block >= MIN_BLOCKS_PER_K * k:
            return block
    return None


def _take_blocks(blocks: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """blocks [c, nb, B] contiguous, chosen [c, k] block ids -> [c, k, B] (one index_select)."""
    c, nb, width = blocks.shape
    flat = chosen + torch.arange(0, c * nb, nb, device=chosen.device)[:, None]
    return blocks.reshape(c * nb, width).index_select(0, flat.view(-1)).view(c, -1, width)


def local_top(
    zc: torch.Tensor, k: int, block: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max [c], the k largest values [c, k] (any order) and the ties beyond them [c].

    zc [c, v] fp32 or bf16, block from :func:`block_size`. Exact, fp32; the ties are
    #{z >= tau} - k with tau the k-th largest (as float): K_t holds them too.

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
        top = torch.topk(zc, k, dim=-1, sorted=False).values
        at_least = (zc >= top.amin(dim=-1, keepdim=True)).sum(dim=-1)
        return top.amax(dim=-1).float(), top.float(), (at_least - k).float()
    blocks = zc.view(c, width // block, block)  # [c, nb, B]
    block_max = blocks.amax(dim=-1)  # [c, nb], input dtype
    row_max = block_max.amax(dim=-1).float()
    chosen = torch.topk(block_max, k, dim=-1, sorted=False).indices  # the k blocks, [c, k]
    candidates = _take_blocks(blocks, chosen).view(c, -1)  # [c, k*B]
    # Maxima of the sets the candidates were chosen from: a logit >= tau outside the candidates
    # needs more than k of them >= tau (a tie at tau across sets).
    set_maxima = [block_max]
    if block > SUB_BLOCK and k > 1:
        groups = candidates.shape[1] // SUB_BLOCK
        strided = candidates.view(c, SUB_BLOCK, groups)  # group g: positions g + i * groups
        group_max = strided.amax(dim=1)  # [c, groups]
        set_maxima.append(group_max)
        chosen = torch.topk(group_max, k, dim=-1, sorted=False).indices  # [c, k]
        candidates = strided.gather(2, chosen[:, None, :].expand(c, SUB_BLOCK, k))
        candidates = candidates.view(c, -1)  # [c, SUB_BLOCK * k]
    top = torch.topk(candidates, k, dim=-1, sorted=False).values  # [c, k], input dtype
    tau = top.amin(dim=-1, keepdim=True)
    at_least = torch.count_nonzero(candidates >= tau, dim=-1)
    spilled = torch.zeros(c, dtype=torch.bool, device=zc.device)
    for maxima in set_maxima:
        spilled |= torch.count_nonzero(maxima >= tau, dim=-1) > k
    at_least = recount_spilled(zc, tau, spilled, at_least, without_sync=zc.is_cuda)
    return row_max, top.float(), (at_least - k).float()


def recount_spilled(
    zc: torch.Tensor,
    tau: torch.Tensor,
    spilled: torch.Tensor,
    at_least: torch.Tensor,
    without_sync: bool,
) -> torch.Tensor:
    """#{z >= tau} [c]: at_least, with the spilled rows [c] (bool) counted over the whole row.

    ``without_sync`` (CUDA): every row is counted and the spilled rows' counts kept, one more
    read of the chunk instead of asking the host which rows spilled (a synchronisation per
    chunk). Otherwise only the spilled rows are read again, found on the host: free on CPU.
    The same counts either way.
    """
    if without_sync:
        return torch.where(spilled, torch.count_nonzero(zc >= tau, dim=-1), at_least)
    if bool(spilled.any()):
        rows = spilled.nonzero(as_tuple=True)[0]
        at_least[rows] = torch.count_nonzero(zc[rows] >= tau[rows], dim=-1)
    return at_least
