"""Per-token scalar math of the shaped objective, from reduced row statistics.

Everything here works on per-token vectors ``[n]`` (never on the vocabulary), so the vocab-parallel
kernel only has to produce a few sums per token. All inputs are fp32 and shifted by the global max
logit ``m``: ``e_a = exp(z_a - m)``, ``d_a = z_a - m``.

Notation (loss.md): pi = softmax(z), x the target, c_a = sg(pi_a r_a), C = sum_a c_a,
loss = -sum_a c_a log pi_a, dloss/dz_j = pi_j C - c_j, w = c_x = pi_x r_pos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from divprec.loss.config import ShapedLossConfig

# 1 - pi_x is clamped here for beta < 0: the smallest normal fp32 keeps q^beta finite for |beta| < 2.
_TINY = torch.finfo(torch.float32).tiny
# w is kept finite so that pi_j * w with pi_j = 0 gives 0, never inf * 0 = NaN.
_W_MAX = 1e30


@dataclass
class RowSums:
    """Sums over the whole vocabulary for each token, already reduced across tensor-parallel ranks.

    ``others`` and ``*_head`` exclude the target, which is summed separately (target_exp) so that
    1 - pi_x = others / S stays accurate when pi_x rounds to 1.
    """

    target_exp: torch.Tensor  # e_x                          [n]
    target_shifted: torch.Tensor  # d_x                      [n]
    others: torch.Tensor  # sum_{a != x} e_a                 [n]
    head_others: torch.Tensor  # sum_{a in K, a != x} e_a    [n]
    xlogx_others: torch.Tensor  # sum_{a != x} e_a d_a       [n]
    xlogx_head: torch.Tensor  # sum_{a in K, a != x} e_a d_a [n]
    target_in_head: torch.Tensor  # x in K (bool)            [n]
    target_rank: torch.Tensor  # #{a: z_a > z_x} (float)     [n]


@dataclass
class ShapedRows:
    """Per-token outputs: the loss, the stats, and the coefficients the backward needs."""

    loss: torch.Tensor
    nll: torch.Tensor
    entropy: torch.Tensor
    topk_mass: torch.Tensor
    target_prob: torch.Tensor
    # grad_j = e_j * head_scale (j in K, j != x), e_j * tail_scale (j not in K, j != x); grad_x.
    head_scale: torch.Tensor
    tail_scale: torch.Tensor
    target_grad: torch.Tensor


def positive_weight(
    log_target_prob: torch.Tensor, other_prob: torch.Tensor, cfg: ShapedLossConfig
) -> torch.Tensor:
    """w = pi_x * r_pos, with q = 1 - pi_x passed in (computed as the mass of the other tokens).

    power:   w = pi_x ^ (1 - q^beta) = exp(log pi_x + |log pi_x| * q^beta)
    product: w = q ^ beta
    The power form's extra exponent |log pi_x| q^beta -> q^(1+beta) -> 0 as q -> 0 is evaluated in
    log space: log|log pi_x| = -inf (a one-hot row) then gives exactly 0, never inf * 0.
    """
    if cfg.beta == 0.0:
        return torch.ones_like(log_target_prob)
    log_q = other_prob.clamp(min=_TINY).log()
    if cfg.positive_form == "product":
        w = torch.exp(cfg.beta * log_q)
    else:
        extra = torch.exp(torch.log(-log_target_prob) + cfg.beta * log_q)
        w = torch.exp(log_target_prob + extra)
    return w.clamp(max=_W_MAX)


def shaped_rows(sums: RowSums, cfg: ShapedLossConfig) -> ShapedRows:
    """Loss, stats and backward coefficients for each token from its reduced row sums."""
    e_x, d_x, others = sums.target_exp, sums.target_shifted, sums.others
    total = others + e_x  # S >= 1: the max token contributes exp(0)
    # log S = log1p(S - 1); e_x - 1 is exact near 1, so a confident target keeps log S = log1p(others).
    log_total = torch.log1p((e_x - 1.0) + others)
    # log pi_x: -log1p(others / e_x) is accurate when the target dominates, d_x - log S otherwise.
    log_target_prob = torch.where(
        e_x > others, -torch.log1p(others / e_x.clamp(min=_TINY)), d_x - log_total
    )
    target_prob = torch.exp(log_target_prob)
    other_prob = others / total  # 1 - pi_x, accurate to relative fp32 precision
    head_prob = sums.head_others / total  # P_head, target excluded
    tail_prob = ((others - sums.head_others) / total).clamp(min=0.0)  # P_tail, target excluded

    w = positive_weight(log_target_prob, other_prob, cfg)
    negative_mass = cfg.topk_negative_reward * head_prob + cfg.tail_negative_reward * tail_prob
    coupling = w + negative_mass  # C

    # sum_{a in set} pi_a log pi_a = (sum e_a d_a) / S - P_set log S
    head_plogp = sums.xlogx_head / total - head_prob * log_total
    tail_plogp = (sums.xlogx_others - sums.xlogx_head) / total - tail_prob * log_total
    loss = -w * log_target_prob
    if cfg.topk_negative_reward != 0.0:
        loss = loss - cfg.topk_negative_reward * head_plogp
    if cfg.tail_negative_reward != 0.0:
        loss = loss - cfg.tail_negative_reward * tail_plogp

    xlogx_all = sums.xlogx_others + e_x * d_x
    entropy = log_total - xlogx_all / total
    topk_mass = head_prob + torch.where(sums.target_in_head, target_prob, 0.0)

    # pi_x C - w written as -(1 - pi_x) w + pi_x * (negative terms): no cancellation, no inf - inf.
    target_grad = -(other_prob * w) + target_prob * negative_mass
    return ShapedRows(
        loss=loss,
        nll=-log_target_prob,
        entropy=entropy,
        topk_mass=topk_mass,
        target_prob=target_prob,
        head_scale=(coupling - cfg.topk_negative_reward) / total,
        tail_scale=(coupling - cfg.tail_negative_reward) / total,
        target_grad=target_grad,
    )
